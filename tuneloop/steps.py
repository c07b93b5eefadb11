"""Typed results of the cycle's steps, stored as JSON in `CycleStep.result`.

Each step of `loop.STEPS` returns one of these models; `run_step` stores `to_row(result)` and the
readers (the report, the benchmarks) turn a stored row back into the typed result with
`step_result(name, row)`. This module imports only pydantic, so anything may read results without
importing the stages.

Stored rows keep the keys they have always had, so rows written before these models read back:
* a field that is None is not stored, and a missing key reads back as its default (None);
* unknown keys (a row of another version, the prompts optimiser's report) are kept
  (`extra="allow"`), readable through `model_extra` and written back unchanged.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from tuneloop.errors import StateError


class StepResult(BaseModel):
    """What every step's result may hold: why it was skipped, or why it failed."""

    model_config = ConfigDict(extra="allow")

    skipped: str | None = None  # the reason the step did nothing
    error: str | None = None  # a failed step's error


class IngestStepResult(StepResult):
    """Documents added, changed and unchanged; or, without `documents:`, whether the index was rebuilt."""

    added: int | None = None
    changed: int | None = None
    unchanged: int | None = None
    embedded: int | None = None  # chunk texts embedded (new and changed chunks only)
    reused: int | None = None  # kept chunks whose vectors came from the index
    index_rebuilt: bool | None = None


class RoutedCounts(BaseModel):
    """Human preference pairs and rewards the feedback step added, updated or superseded in the store."""

    model_config = ConfigDict(extra="allow")

    pairs_added: int = 0
    pairs_updated: int = 0
    pairs_superseded: int = 0
    rewards_added: int = 0
    rewards_updated: int = 0
    rewards_superseded: int = 0


class FeedbackStepResult(StepResult):
    """Feedback routed to the store, and the examples made of corrected and approved answers."""

    routed: RoutedCounts | None = None
    corrections: int | None = None
    approvals: int | None = None
    added_train: int | None = None
    added_eval: int | None = None
    added_dev: int | None = None  # only when a dev split is routed
    already_examples: int | None = None

    def examples_added(self) -> int | None:
        """Examples added to any split, None when the step added none (skipped, or before routing)."""
        values = [v for v in (self.added_train, self.added_eval, self.added_dev) if v is not None]
        return sum(values) if values else None


class SynthStepResult(StepResult):
    generated: int | None = None
    kept: int | None = None
    rejected: dict[str, int] | None = None  # rejected items per filter
    artifact: str | None = None


class TrainStepResult(StepResult):
    """A training step's new version, its parent and the training loss."""

    version: str | None = None
    parent: str | None = None
    first_loss: float | None = None
    last_loss: float | None = None
    artifact: str | None = None


class DaptStepResult(TrainStepResult):
    pass


class SftStepResult(TrainStepResult):
    pass


class AlignStepResult(TrainStepResult):
    method: str | None = None


class RlaifStepResult(StepResult):
    student: str | None = None
    prompts: int | None = None
    pairs_judged: int | None = None
    kept_pairs: int | None = None
    reference_pairs: int | None = None  # decided by the expert's answer
    new_pairs: int | None = None
    consistency_rate: float | None = None
    artifact: str | None = None


class SelectStepResult(StepResult):
    candidate: str | None = None
    dev_scores: dict[str, float] | None = None  # dev primary metric per version name
    dev_n: int | None = None


class WiseStepResult(StepResult):
    version: str | None = None
    alpha: float | None = None
    dev_scores: dict[str, float] | None = None  # dev primary metric per alpha (as text)
    anchor_scores: dict[str, float] | None = None  # anchor score per alpha, when the anchor guard ran
    averaged: str | None = None  # the candidate averaged with the champion


class PromptsStepResult(StepResult):
    """The compiled program of the candidate, and the optimiser's report (its keys as they were stored)."""

    version: str | None = None
    optimizer: str | None = None
    trainset: int | None = None
    demos: int | None = None
    bootstrapped_demos: int | None = None
    instructions_changed: bool | None = None
    program: str | None = None


class RetrieverStepResult(StepResult):
    """The candidate's fine-tuned embedder and index (`stages/retriever.py`), or why it kept the champion's."""

    version: str | None = None
    examples: int | None = None  # training examples read
    pairs: int | None = None  # (question, evidence passage) pairs trained on
    not_paired: dict[str, int] | None = None  # reason -> examples that gave no pair
    embedder: str | None = None
    index: str | None = None
    loss_before: float | None = None  # MultipleNegativesRankingLoss on the pairs
    loss_after: float | None = None
    steps: int | None = None
    hard_negatives: bool | None = None
    inherited: str | None = None  # skipped: the champion's retriever the candidate keeps
    dense_weight: float | None = None  # the BM25/dense fusion weight chosen on the dev split
    dev_items: int | None = None  # dev questions with a textual reference it was chosen on
    dev_hit: dict[str, float] | None = None  # weight -> share of them whose evidence was retrieved
    fusion_kept: str | None = None  # why no weight was chosen (ingest.dense_weight stays)
    top_k: int | None = None  # the passages per prompt chosen on the dev split
    top_k_scores: dict[str, float] | None = None  # top_k -> the candidate's primary metric on dev
    top_k_p: float | None = None  # paired bootstrap p of the best top_k against ingest.top_k
    top_k_kept: str | None = None  # why ingest.top_k stays


class EvalStepResult(StepResult):
    """Held-out (and anchor) metrics per version; stored with the version names as keys."""

    def versions(self) -> dict[str, dict[str, float]]:
        """The metrics per version name (the row's keys other than `skipped` and `error`)."""
        return dict(self.model_extra or {})


class GateStepResult(StepResult):
    promoted: bool | None = None
    reason: str | None = None
    candidate: str | None = None
    champion_before: str | None = None
    pairwise: dict[str, Any] | None = None  # the judge's pairwise win rate, when recorded


class ReviewStepResult(StepResult):
    """The expert review queue rebuilt with the champion (`stages/review.py`)."""

    queue: int | None = None  # the queue's number
    candidates: int | None = None  # scored
    opened: int | None = None  # shown to reviewers (review.per_cycle)
    by_source: dict[str, int] | None = None  # open items per source (interaction, transfer)
    mean_informativeness: float | None = None  # of the open items
    unsure_share: float | None = None  # of people's questions in the pool (the review_queue signal)
    version: str | None = None  # the champion that answered


RESULT_TYPES: dict[str, type[StepResult]] = {
    "ingest": IngestStepResult, "feedback": FeedbackStepResult, "synth": SynthStepResult,
    "dapt": DaptStepResult, "sft": SftStepResult, "rlaif": RlaifStepResult, "align": AlignStepResult,
    "select": SelectStepResult, "wise": WiseStepResult, "prompts": PromptsStepResult,
    "retriever": RetrieverStepResult, "eval": EvalStepResult, "gate": GateStepResult, "review": ReviewStepResult,
}


def result_type(name: str) -> type[StepResult]:
    """The result model of step `name` (the plain `StepResult` for a name this version does not know)."""
    return RESULT_TYPES.get(name, StepResult)


def to_row(result: StepResult) -> dict[str, Any]:
    """The JSON stored for `result`: its fields that are not None, and any unknown keys it carries."""
    return result.model_dump(mode="json", exclude_none=True)


def step_result(name: str, row: dict[str, Any] | None) -> StepResult:
    """The stored `row` of step `name` as its typed result; a row without a key reads the default.

    A value of the wrong type (a row edited by hand) raises `StateError` naming the step."""
    try:
        return result_type(name).model_validate(row or {})
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise StateError(f"the stored result of step {name}: {where}: {first['msg']}") from None
