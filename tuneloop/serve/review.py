"""The expert review queue over HTTP: `GET /v1/review/queue`, `POST /v1/review/{id}` (what the
`/review` page calls). Reviewer keys and the admin token only; a client key gets 403. Verdicts go
through `review.queue.record`, as `tuneloop review` and `tuneloop review import` do."""
from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam

from tuneloop.review.queue import (
    AlreadyReviewed,
    ReviewItemNotFound,
    find_item,
    item_json,
    open_count,
    open_items,
    record,
)
from tuneloop.serve.auth import Caller, caller_of
from tuneloop.serve.errors import ApiError
from tuneloop.serve.schemas import PUBLIC_ID_PATTERN, ReviewQueueView, ReviewRecorded, ReviewVerdict


def reviewer_of(request: Request) -> Caller:
    """The caller, when it may review (a reviewer key or the admin token); else 403."""
    caller = caller_of(request)
    if not caller.sees_everything:
        raise ApiError(403, "the review queue needs a reviewer key or the admin token", "reviewer_only")
    return caller


def add_review_routes(app: FastAPI, errors: dict[int | str, dict[str, Any]], dependencies: list) -> None:
    @app.get("/v1/review/queue", response_model=ReviewQueueView, responses=errors, dependencies=dependencies)
    def review_queue(request: Request, limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> dict[str, Any]:
        reviewer_of(request)
        with request.app.state.sessions() as s:
            return {"object": "list", "data": [item_json(s, it) for it in open_items(s, limit)], "open": open_count(s)}

    responses = {**errors, 404: errors[403], 409: errors[403]}

    @app.post("/v1/review/{item_id}", response_model=ReviewRecorded, responses=responses, dependencies=dependencies)
    def review_item(item_id: Annotated[str, PathParam(min_length=1, max_length=64, pattern=PUBLIC_ID_PATTERN)],
                    body: ReviewVerdict, request: Request) -> dict[str, Any]:
        caller = reviewer_of(request)
        state = request.app.state
        answer = (body.answer or "").strip()
        if body.verdict == "correct" and not answer:
            raise ApiError(422, "answer: a correction needs the right answer")
        if len(answer) > state.project.settings.serve.max_feedback_chars:
            raise ApiError(422, f"answer: longer than {state.project.settings.serve.max_feedback_chars} characters")
        with state.write_lock, state.sessions() as s:
            try:
                item = find_item(s, item_id)
                done = record(s, state.project.settings.feedback, item, body.verdict, caller.name, answer or None)
            except ReviewItemNotFound as err:
                raise ApiError(404, str(err), "not_found") from None
            except AlreadyReviewed as err:
                raise ApiError(409, str(err), "already_reviewed") from None
            s.commit()
            example = done.example
            return {"id": item.public_id, "status": item.status, "reviewer": caller.name,
                    "example_id": example.id if example else None, "split": example.split if example else None,
                    "new_example": done.new_example}
