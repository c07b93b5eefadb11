"""POST /v1/chat/completions: retrieve, answer (one model, or an A/B pair), store, respond.

The prompt is the student's training prompt (`build_messages`) built from the last user message
and the retrieved passages, or the version's compiled DSPy program (`LoadedModel.conversation`).
Each answer is stored as an Interaction once it is complete; its public id (random, not the row id)
comes back in the body (`interaction_id`, and `chatcmpl-<id>`) and in the `X-Interaction-Id` header.

Limits: `max_tokens` may not exceed `serve.max_tokens_limit` (422); a key whose generated tokens
are over `serve.tokens_per_minute` gets 429 before anything is generated, and each answer's tokens
are charged when it is complete. Every generation stops at `serve.generation_timeout_seconds` and
the answer so far is returned with finish_reason "length"; a model that fails after that deadline
(an endpoint that timed out without any text) is answered 504. Each loaded model generates one
answer at a time (its lock), so a request waits for those ahead of it, each at most the deadline.
"""
from __future__ import annotations

import json
import logging
import random
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session, sessionmaker

from tuneloop.config import Project
from tuneloop.models.base import GenerationParams
from tuneloop.programs.rag import Passage
from tuneloop.serve.auth import Caller
from tuneloop.serve.errors import INTERNAL_MESSAGE, ApiError, error_body
from tuneloop.serve.limits import KeyLimits
from tuneloop.serve.schemas import CHAMPION_ALIASES, ChatRequest, check_question
from tuneloop.serve.state import LoadedModel, Served, Usage
from tuneloop.store import Interaction, new_public_id

log = logging.getLogger("tuneloop.serve")
AB_MODEL_NAME = "tuneloop"  # the `model` of an A/B response: which arm is which is not revealed
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class Arm:
    """One model answering: `role` is champion/challenger in A/B mode, else None."""

    model: LoadedModel
    role: str | None = None
    answer: str = ""
    usage: Usage | None = None
    latency_ms: float = 0.0


def select_model(name: str | None, served: Served) -> LoadedModel:
    """The model a request names: none/"tuneloop"/"champion", "challenger", or a served version's name."""
    if name is None or name in CHAMPION_ALIASES or name == served.champion.name:
        return served.champion
    if name == "challenger" or (served.challenger is not None and name == served.challenger.name):
        if served.challenger is None:
            raise ApiError(404, "there is no challenger model right now", "model_not_found")
        return served.challenger
    raise ApiError(404, f"model '{name}' is not served here (GET /v1/models lists them)", "model_not_found")


def plan_arms(req: ChatRequest, served: Served, ab_mode: bool, rng: random.Random) -> list[Arm]:
    """One arm, or champion and challenger in random order when A/B applies.

    A/B applies when the body says `ab: true`, or the server runs in A/B mode and the body neither
    says `ab: false` nor names a specific model; and only while a challenger exists.
    """
    chosen = select_model(req.model, served)
    ab = req.ab if req.ab is not None else (ab_mode and req.model in (None, *CHAMPION_ALIASES))
    if not ab or served.challenger is None:
        return [Arm(chosen)]
    arms = [Arm(served.champion, "champion"), Arm(served.challenger, "challenger")]
    rng.shuffle(arms)
    return arms


def generation_params(req: ChatRequest, project: Project) -> GenerationParams:
    """Sampling settings of a request: max_tokens within serve.max_tokens_limit (else 422), the deadline."""
    role, serve = project.settings.models.student, project.settings.serve
    for name in ("max_tokens", "max_completion_tokens"):
        asked = getattr(req, name)
        if asked is not None and asked > serve.max_tokens_limit:
            raise ApiError(422, f"{name}: at most {serve.max_tokens_limit} (serve.max_tokens_limit), not {asked}")
    temperature = role.temperature if req.temperature is None else req.temperature
    return GenerationParams(
        max_new_tokens=req.max_tokens or req.max_completion_tokens or min(role.max_new_tokens, serve.max_tokens_limit),
        temperature=temperature, seed=secrets.randbelow(2**31) if temperature > 0 else 0,
        max_time=serve.generation_timeout_seconds)


def finish_reason(arm: Arm, params: GenerationParams) -> str:
    """"length" when the answer was cut by max_tokens or by the deadline, else "stop"."""
    usage = arm.usage
    if usage is None:
        return "stop"
    cut = usage.completion_tokens >= params.max_new_tokens
    late = params.max_time is not None and usage.seconds >= params.max_time
    return "length" if cut or late else "stop"


def citations(passages: list[Passage]) -> list[dict[str, Any]]:
    return [{"n": i + 1, "chunk_id": p.chunk_id, "document": p.document, "text": p.text}
            for i, p in enumerate(passages)]


def store_interactions(sessions: sessionmaker[Session], question: str, passages: list[Passage], arms: list[Arm],
                       document: str | None, client: str, ids: list[str]) -> str | None:
    """Store one Interaction per arm with its public id (one transaction); returns the A/B pair id."""
    ab_pair = uuid.uuid4().hex if len(arms) > 1 else None
    with sessions() as s:
        s.add_all([Interaction(question=question, answer=a.answer, chunk_ids=[p.chunk_id for p in passages],
                               model_version_id=a.model.version_id, latency_ms=a.latency_ms, document=document,
                               ab_pair=ab_pair, arm=a.role, client=client, public_id=public_id)
                   for a, public_id in zip(arms, ids)])
        s.commit()
    return ab_pair


class ChatHandler:
    """Answers chat requests against the current models; one per app."""

    def __init__(self, project: Project, sessions: sessionmaker[Session], limits: KeyLimits):
        self.project, self.sessions, self.limits = project, sessions, limits
        self.settings = project.settings.serve
        self.rng = random.Random()

    def __call__(self, req: ChatRequest, served: Served, caller: Caller) -> JSONResponse | Iterator[str]:
        """The JSON response, or (for `stream: true`) the server-sent events to stream.

        Blocking (retrieval and generation): call it from a worker thread. Request errors (and a
        key over its token budget) are raised as ApiError before anything is generated.
        """
        question = check_question(req.question(), self.settings.max_question_chars)
        document = req.document.strip() if req.document and req.document.strip() else None
        if document is not None and document not in served.documents:
            raise ApiError(404, f"unknown document '{document}'", "document_not_found")
        arms = plan_arms(req, served, self.settings.ab_mode, self.rng)
        params = generation_params(req, self.project)
        wait = self.limits.tokens_wait(caller)
        if wait is not None:
            raise ApiError(429, f"too many tokens: this key may generate {self.settings.tokens_per_minute} per minute "
                                f"(serve.tokens_per_minute); retry in {wait} s", "token_limit_exceeded",
                           {"Retry-After": str(wait)})
        start = time.perf_counter()
        passages = served.retrieve(question, document)
        retrieval_ms = (time.perf_counter() - start) * 1000
        ids = [new_public_id() for _ in arms]
        if req.stream:
            return self._stream(question, document, passages, params, arms, retrieval_ms, caller, ids)
        for arm in arms:
            t = time.perf_counter()
            try:
                arm.answer, arm.usage = arm.model.chat(question, passages, params)
            except Exception:
                _raise_if_late(t, params)
                raise
            finally:
                self.limits.charge_tokens(caller, arm.usage.completion_tokens if arm.usage else 0)
            arm.latency_ms = retrieval_ms + (time.perf_counter() - t) * 1000
        ab_pair = store_interactions(self.sessions, question, passages, arms, document, caller.name, ids)
        body = {
            "id": f"chatcmpl-{ids[0]}", "object": "chat.completion", "created": int(time.time()),
            "model": _model_name(arms),
            "choices": [{"index": i, "message": {"role": "assistant", "content": a.answer},
                         "finish_reason": finish_reason(a, params)} for i, a in enumerate(arms)],
            "usage": _usage(arms), "interaction_id": ids[0], "citations": citations(passages),
            **_ab_fields(ids, ab_pair),
        }
        return JSONResponse(body, headers={"X-Interaction-Id": ids[0]})

    def _stream(self, question: str, document: str | None, passages: list[Passage], params: GenerationParams,
                arms: list[Arm], retrieval_ms: float, caller: Caller, ids: list[str]) -> Iterator[str]:
        """Server-sent `chat.completion.chunk` events; A/B arms are streamed one after the other."""
        base = {"id": f"chatcmpl-{ids[0]}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": _model_name(arms)}

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            return "data: " + json.dumps({**base, "choices": choices, **extra}) + "\n\n"

        try:
            for index, arm in enumerate(arms):
                yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
                t, usage, parts = time.perf_counter(), Usage(), []
                try:
                    for piece in arm.model.stream(question, passages, params, usage):
                        parts.append(piece)
                        yield chunk([{"index": index, "delta": {"content": piece}, "finish_reason": None}])
                finally:
                    self.limits.charge_tokens(caller, usage.completion_tokens)
                arm.answer, arm.usage = "".join(parts), usage
                arm.latency_ms = retrieval_ms + (time.perf_counter() - t) * 1000
            ab_pair = store_interactions(self.sessions, question, passages, arms, document, caller.name, ids)
        except Exception:
            log.exception("streamed answer failed")
            yield "data: " + json.dumps(error_body(500, INTERNAL_MESSAGE)) + "\n\n"
            return
        finals = [{"index": i, "delta": {}, "finish_reason": finish_reason(a, params)} for i, a in enumerate(arms)]
        yield chunk(finals, usage=_usage(arms), interaction_id=ids[0], citations=citations(passages),
                    **_ab_fields(ids, ab_pair))
        yield "data: [DONE]\n\n"


def _model_name(arms: list[Arm]) -> str:
    return AB_MODEL_NAME if len(arms) > 1 else arms[0].model.name


def _usage(arms: list[Arm]) -> dict[str, int]:
    prompt = max((a.usage.prompt_tokens for a in arms if a.usage), default=0)
    completion = sum(a.usage.completion_tokens for a in arms if a.usage)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _raise_if_late(started: float, params: GenerationParams) -> None:
    """A generation that failed after the deadline timed out (an endpoint gave up): 504, not 500."""
    if params.max_time is not None and time.perf_counter() - started >= params.max_time:
        log.warning("no answer within the %s s deadline", params.max_time, exc_info=True)
        raise ApiError(504, f"no answer within {params.max_time:g} s (serve.generation_timeout_seconds)",
                       "generation_timeout")


def _ab_fields(ids: list[str], ab_pair: str | None) -> dict[str, Any]:
    return {"ab_pair": ab_pair, "interaction_ids": ids} if ab_pair else {}
