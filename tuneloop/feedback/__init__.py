"""Usage as training data: people's feedback routed into datasets, and AI feedback (RLAIF).

* `routing`: the rules that turn thumbs, A/B choices, corrections and ratings into KTO examples,
  preference pairs and rewards (contradiction rule, duplicate merging, serving prompts rebuilt
  from the stored chunks). Pure reads plus an idempotent store update.
* `export`: `tuneloop feedback export`, the datasets artifact (preferences / kto / rewards).
* `rlaif`: `tuneloop rlaif`, sampled candidates judged pairwise in both orders (or by rubric),
  with a calibration against people's choices.

These live together, apart from `tuneloop/stages/`, because calibration (rlaif) and export both
need routing's human pairs, and neither is a step of the training cycle yet.
"""
from tuneloop.feedback.routing import (  # noqa: F401
    RULES, KTORow, PairRow, PromptBuilder, PromptInfo, RewardRow, Routed, Vote, normalize_answer, resolve_votes,
    route_feedback, store_human,
)
