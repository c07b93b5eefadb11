"""Request bodies of the serving API, with type and size limits.

Numbers and booleans are strict (`"3"` is not a rating, `"yes"` is not `true`). Limits that come
from the project settings (question and feedback text lengths) are checked by `check_question`
and `check_feedback`, which raise 422 errors naming the field. The chat body ignores unknown
fields, as OpenAI-compatible servers do (clients send `n`, `top_p`, `stream_options`, ...);
the feedback body is tuneloop's own and rejects unknown fields.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from tuneloop.serve.errors import ApiError

StrictBool = Annotated[bool, Field(strict=True)]
Id = Annotated[int, Field(strict=True, ge=1, le=2**62)]
MAX_MESSAGES = 50
CHAMPION_ALIASES = ("tuneloop", "champion")


class TextPart(BaseModel):
    """One part of a message's content in the list form (`[{"type": "text", "text": ...}]`)."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(BaseModel):
    """POST /v1/chat/completions: the OpenAI body plus tuneloop's `document` and `ab`."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(None, max_length=200)
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: StrictBool = False
    max_tokens: Annotated[int, Field(strict=True, ge=1, le=1024)] | None = None
    max_completion_tokens: Annotated[int, Field(strict=True, ge=1, le=1024)] | None = None  # newer clients
    temperature: Annotated[float, Field(strict=True, ge=0.0, le=2.0)] | None = None
    document: str | None = Field(None, max_length=500)
    ab: StrictBool | None = None

    def question(self) -> str:
        """The last user message."""
        for message in reversed(self.messages):
            if message.role == "user":
                return message.text()
        raise ApiError(422, "messages: needs at least one message with role 'user'")


class FeedbackRequest(BaseModel):
    """POST /v1/feedback: feedback on one answer, or the choice between the two answers of an A/B pair."""

    model_config = ConfigDict(extra="forbid")
    interaction_id: Id | None = None
    thumbs: Literal["up", "down"] | None = None
    rating: Annotated[int, Field(strict=True, ge=1, le=5)] | None = None
    comment: str | None = None
    corrected_answer: str | None = None
    ab_pair: str | None = Field(None, min_length=1, max_length=40)
    preferred_interaction_id: Id | None = None

    @property
    def is_choice(self) -> bool:
        return self.ab_pair is not None or self.preferred_interaction_id is not None


def check_question(question: str, max_chars: int) -> str:
    """The stripped question, or a 422 when it is empty or longer than `max_chars`."""
    text = question.strip()
    if not text:
        raise ApiError(422, "messages: the last user message is empty")
    if len(text) > max_chars:
        raise ApiError(422, f"messages: the question is longer than {max_chars} characters")
    return text


def _text(value: str | None) -> str | None:
    """Empty or blank text counts as not given (a web form sends empty fields)."""
    return value.strip() if value is not None and value.strip() else None


def check_feedback(body: FeedbackRequest, max_chars: int) -> FeedbackRequest:
    """Normalise blank texts and check the field combination and text sizes (422 on failure)."""
    body = body.model_copy(update={"comment": _text(body.comment), "corrected_answer": _text(body.corrected_answer)})
    for name in ("comment", "corrected_answer"):
        value = getattr(body, name)
        if value is not None and len(value) > max_chars:
            raise ApiError(422, f"{name}: longer than {max_chars} characters")
    if body.is_choice:
        if body.ab_pair is None:
            raise ApiError(422, "ab_pair: required with preferred_interaction_id")
        if body.preferred_interaction_id is None:
            raise ApiError(422, "preferred_interaction_id: required with ab_pair")
        extra = [n for n in ("thumbs", "rating", "corrected_answer") if getattr(body, n) is not None]
        if extra:
            raise ApiError(422, f"{extra[0]}: not allowed in an A/B choice (send it as separate feedback)")
        return body
    if body.interaction_id is None:
        raise ApiError(422, "interaction_id: field required")
    if all(getattr(body, n) is None for n in ("thumbs", "rating", "comment", "corrected_answer")):
        raise ApiError(422, "feedback: give at least one of thumbs, rating, comment, corrected_answer")
    return body
