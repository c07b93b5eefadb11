"""Request and response bodies of the serving API, with type and size limits.

Numbers and booleans are strict (`"3"` is not a rating, `"yes"` is not `true`). Text must be valid
Unicode: a lone UTF-16 surrogate (JSON `"\\ud800"`) cannot be stored or tokenized, so it is a 422
naming the field. Limits that come from the project settings (question and feedback text lengths,
max_tokens) are checked by `check_question`, `check_feedback` and the chat handler, which raise 422
errors naming the field. The chat body ignores unknown fields, as OpenAI-compatible servers do
(clients send `n`, `top_p`, `stream_options`, ...); the feedback body is tuneloop's own and rejects
unknown fields. The response models document the answers in the OpenAPI schema (/openapi.json).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from tuneloop.serve.errors import ApiError

SURROGATE_MESSAGE = "not valid Unicode (contains a lone UTF-16 surrogate)"


def valid_unicode(value: str) -> str:
    """The text, or a ValueError when it cannot be encoded as UTF-8 (a lone surrogate)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(SURROGATE_MESSAGE) from None
    return value


Text = Annotated[str, AfterValidator(valid_unicode)]
StrictBool = Annotated[bool, Field(strict=True)]
PUBLIC_ID_PATTERN = r"^[A-Za-z0-9_-]+$"
PublicId = Annotated[str, Field(min_length=1, max_length=64, pattern=PUBLIC_ID_PATTERN)]  # an interaction's id
MAX_MESSAGES = 50
MAX_TOKENS = 2**31 - 1  # the schema's bound; serve.max_tokens_limit is the real one
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

    @field_validator("content")
    @classmethod
    def _valid_unicode(cls, value: str | list[TextPart] | None) -> str | list[TextPart] | None:
        for text in ([value] if isinstance(value, str) else [p.text for p in value or []]):
            valid_unicode(text)
        return value

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(BaseModel):
    """POST /v1/chat/completions: the OpenAI body plus tuneloop's `document` and `ab`."""

    model_config = ConfigDict(extra="ignore")
    model: Annotated[Text, Field(max_length=200)] | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: StrictBool = False
    # at most serve.max_tokens_limit (checked by the chat handler: the limit is a setting)
    max_tokens: Annotated[int, Field(strict=True, ge=1, le=MAX_TOKENS)] | None = None
    max_completion_tokens: Annotated[int, Field(strict=True, ge=1, le=MAX_TOKENS)] | None = None  # newer clients
    temperature: Annotated[float, Field(strict=True, ge=0.0, le=2.0)] | None = None
    document: Annotated[Text, Field(max_length=500)] | None = None
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
    interaction_id: PublicId | None = None
    thumbs: Literal["up", "down"] | None = None
    rating: Annotated[int, Field(strict=True, ge=1, le=5)] | None = None
    comment: Text | None = None
    corrected_answer: Text | None = None
    ab_pair: Annotated[Text, Field(min_length=1, max_length=40)] | None = None
    preferred_interaction_id: PublicId | None = None

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


# --------------------------------------------------------------------------- responses


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None


class ErrorBody(BaseModel):
    """Every error: `{"error": {"message", "type", "code"}}` (the OpenAI shape)."""

    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    owned_by: str
    role: Literal["champion", "challenger"]


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Citation(BaseModel):
    n: int
    chunk_id: int
    document: str
    text: str


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]  # length: max_tokens or serve.generation_timeout_seconds reached


class TokenUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    """A non-streamed answer (`stream: true` sends `chat.completion.chunk` server-sent events instead)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: TokenUsage
    interaction_id: str  # the id to send feedback with (and to GET /v1/interactions/{id})
    citations: list[Citation]
    ab_pair: str | None = None  # A/B answers only
    interaction_ids: list[str] | None = None  # A/B answers only, in the order of `choices`


class FeedbackStored(BaseModel):
    id: int
    interaction_id: str


class InteractionView(BaseModel):
    id: str
    question: str
    answer: str
    citations: list[Citation]
    model: str | None
    document: str | None
    ab_pair: str | None
    created_at: str | None
    feedback_count: int


class AdminSummary(BaseModel):
    interactions: int
    feedback_per_day: list[dict[str, Any]]
    versions: list[dict[str, Any]]
    cycles: list[dict[str, Any]]
    primary_metric: str


# --------------------------------------------------------------------------- the review queue


class ReviewVerdict(BaseModel):
    """POST /v1/review/{id}: a reviewer's verdict on one queued question."""

    model_config = ConfigDict(extra="forbid")
    verdict: Literal["confirm", "correct", "skip"]
    answer: Text | None = None  # the right answer (verdict "correct")


class ReviewPassage(BaseModel):
    chunk_id: int
    document: str
    text: str


class ReviewItemView(BaseModel):
    id: str
    question: str
    document: str | None
    answer: str
    passages: list[ReviewPassage]
    informativeness: float
    doubts: dict[str, Any]
    source: str
    question_type: str
    queue: int
    rank: int
    status: str


class ReviewQueueView(BaseModel):
    object: Literal["list"] = "list"
    data: list[ReviewItemView]
    open: int  # open items in the queue (data holds at most `limit`)


class ReviewRecorded(BaseModel):
    id: str
    status: str  # confirmed | corrected | skipped
    reviewer: str
    example_id: int | None  # the example it became (None: skipped)
    split: str | None
    new_example: bool  # False: the question already was an example, kept as it was
