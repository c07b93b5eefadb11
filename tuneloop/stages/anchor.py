"""The general-ability anchor set: everyday instructions every version answers, so forgetting
shows up as a number.

Fine-tuning a small model on contracts can erode what it knew before (catastrophic forgetting).
The anchor set (`tuneloop/sample/anchor.jsonl`, written for tuneloop: 120 everyday questions with
short references: capitals, arithmetic, science, animals, words, translations) is asked without
retrieval, as a plain chat message. An answer counts when it
contains one of its references as whole words (`anchor_score`, the share of such answers); token
F1 is kept too. Each version's run is stored once per anchor set, like held-out eval runs.

Why 120 and not 30: greedy answers of a 135M model flip under small weight changes, and on 30
questions one flip is 0.033, so a 0.05 tolerance refused on two flips. In the continuous bench a
WiSE-FT average 10% of the way from the champion to the candidate already lost 2 of 30 (and the
champion itself had answered 5 more than the base model). On 120 the same tolerance is 6 flips
net.
"""
from __future__ import annotations

from pathlib import Path

from tuneloop.config import Project
from tuneloop.evalsets import anchor_items, anchor_set_hash
from tuneloop.metrics import normalize_tokens, token_f1
from tuneloop.models.registry import build_chat_model, generation_params
from tuneloop.progress import Reporter, batched_chat
from tuneloop.stages.eval import stored_eval_run
from tuneloop.store import EvalRun, ModelVersion, Session
from tuneloop.versions import adapter_folder

KIND = "anchor"


def contains_reference(prediction: str, references: list[str]) -> bool:
    """True when some reference occurs in the prediction as a run of whole normalised words."""
    pred = normalize_tokens(prediction)
    for ref in references:
        ref_tokens = normalize_tokens(ref)
        n = len(ref_tokens)
        if n and any(pred[i : i + n] == ref_tokens for i in range(len(pred) - n + 1)):
            return True
    return False


def score_anchor(predictions: list[str], items: list[dict]) -> tuple[list[dict], dict]:
    rows = []
    for pred, item in zip(predictions, items):
        refs = item["references"]
        rows.append({"instruction": item["instruction"], "references": refs, "prediction": pred,
                     "match": contains_reference(pred, refs), "token_f1": token_f1(pred, refs)})
    n = max(1, len(rows))
    return rows, {"anchor_score": sum(r["match"] for r in rows) / n,
                  "anchor_token_f1": sum(r["token_f1"] for r in rows) / n, "anchor_n": len(rows)}


def answer_anchor(project: Project, adapter: Path | None, items: list[dict], reporter: Reporter,
                  label: str) -> tuple[list[dict], dict]:
    """The student with `adapter` (None: the base model) answers `items`; the scored rows and metrics
    (nothing stored: WiSE-FT screens its unsaved averages with this)."""
    role = project.settings.models.student
    model = build_chat_model(project, role, adapter)
    reporter.log(f"anchor set: {label} answers {len(items)} everyday questions")
    convs = [[{"role": "user", "content": i["instruction"]}] for i in items]
    preds = batched_chat(model, convs, generation_params(role), reporter, "anchor set", role.batch_size)
    return score_anchor(preds, items)


def evaluate_anchor(project: Project, session: Session, version: ModelVersion, reporter: Reporter,
                    cycle_id: int | None = None) -> EvalRun:
    """Answer the anchor set with `version` (no retrieval) and store the run (once per version)."""
    items = anchor_items()
    set_hash = anchor_set_hash(items)

    def score() -> tuple[list[dict], dict]:
        return answer_anchor(project, adapter_folder(version), items,
                             reporter, version.name)

    return stored_eval_run(project, session, version, set_hash, KIND, f"{version.name}-{set_hash[7:19]}", "anchor",
                           score, cycle_id)
