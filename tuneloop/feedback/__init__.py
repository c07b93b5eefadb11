"""Usage as training data: people's feedback captured, routed into datasets and exported.

* `routing`: the rules that turn thumbs, A/B choices, corrections and ratings into KTO examples,
  preference pairs and rewards (contradiction rule, duplicate merging, serving prompts rebuilt
  from the stored chunks with `programs.prompts.PromptBuilder`). Pure reads plus an idempotent store update.
* `export`: `tuneloop feedback export`, the datasets artifact (preferences / kto / rewards).

The cycle's steps that use them live in `tuneloop/stages/`: `feedback` (routing + feedback ->
examples) and `rlaif` (AI feedback, calibrated against routing's human pairs).
"""
from tuneloop.feedback.routing import (  # noqa: F401
    RULES,
    KTORow,
    PairRow,
    RewardRow,
    Routed,
    Vote,
    normalize_answer,
    resolve_votes,
    route_feedback,
    store_human,
)
