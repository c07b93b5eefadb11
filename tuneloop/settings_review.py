"""The `review:` settings: the expert review queue (`stages/review.py` builds it, `tuneloop review`
and the `/review` page work through it, `review/queue.py` stores what reviewers say)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tuneloop.settings_base import Section


class ReviewWeights(Section):
    """How much each doubt counts in an item's informativeness (a weighted mean over the doubts
    an item has: an extraction question has no yes/no margin, the judge doubt needs `review.judge`)."""

    margin: float = Field(1.0, ge=0.0, le=10.0)  # yes/no: calibrated probability close to the threshold
    disagreement: float = Field(1.0, ge=0.0, le=10.0)  # the sampled answers disagree
    retrieval: float = Field(0.5, ge=0.0, le=10.0)  # low or flat passage scores, BM25 and dense disagree
    judge: float = Field(1.0, ge=0.0, le=10.0)  # the judge grades the answer low


class ReviewSettings(Section):
    """The expert review queue: what the model is least sure of, asked of the people who know."""

    enabled: bool = True  # the cycle's last step (`review`) rebuilds the queue with the champion
    per_cycle: int = Field(20, ge=1, le=10_000)  # items a queue shows (the most informative, diverse)
    pool: int = Field(60, ge=1, le=100_000)  # candidates scored per rebuild (forward passes: pool x samples)
    # where candidates come from: questions people asked that have no known answer yet, and the
    # experts' seed questions asked of other documents (synth.transfer's pairs not in the store)
    sources: list[Literal["interactions", "transfer"]] = ["interactions", "transfer"]
    samples: int = Field(3, ge=2, le=16)  # answers per candidate: the top passages greedily, then sampled
    temperature: float = Field(0.7, ge=0.0, le=2.0)  # of the sampled answers (0: greedy on wider passage sets)
    judge: bool = False  # the judge grades each candidate's answer (a capable judge only: slow, noisy at 135M)
    weights: ReviewWeights = ReviewWeights()
    # each item already in the queue of the same document, or with the same question, multiplies a
    # candidate's informativeness by this (1: no diversity; 0: one item per document and question)
    diversity: float = Field(0.5, ge=0.0, le=1.0)
    # the monitoring signal `review_queue`: the share of people's unanswered questions whose
    # informativeness is at least `unsure_score`; fires when, in the queue built after a cycle, it
    # is at least `trigger_share` and no lower than in the queue before (the model stays unsure)
    unsure_score: float = Field(0.5, ge=0.0, le=1.0)
    trigger_share: float = Field(0.5, ge=0.0, le=1.0)
    trigger_min: int = Field(10, ge=1)  # no verdict on fewer of people's questions in the queue's pool

    @model_validator(mode="after")
    def _pool_holds_queue(self) -> ReviewSettings:
        if self.pool < self.per_cycle:
            raise ValueError(f"pool ({self.pool}) is smaller than per_cycle ({self.per_cycle}): the queue "
                             "could never be filled")
        return self
