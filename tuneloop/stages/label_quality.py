"""Stage (part of synth): how good the synthetic labels are, not only how many, when labels exist.

With `synth.label_check: FILE` (question/answer pairs in the seed format, e.g. a labelled dev set
of the team's own documents, or CUAD's lawyer labels), each synthetic example whose (question,
document) is in the file is scored against it: the share of Yes/No labels that agree (precision
of the labels kept, overall and per answer) and the token F1 of other answers against the file's
answer and evidence spans. The synth report gets these per strategy; the file is only read, never
imported (nothing in it is trained on).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from tuneloop import metrics
from tuneloop.config import Project
from tuneloop.splits import question_key
from tuneloop.stages.seeds import read_pairs


def load_labels(path: Path) -> dict[tuple[str, str], list[str]]:
    """(question, document) -> [answer, *evidence spans] of a seed-format file."""
    labels: dict[tuple[str, str], list[str]] = {}
    for row in read_pairs(path):
        refs = [str(row["answer"]), *[r for r in (row.get("references") or []) if r]]
        labels[question_key(str(row["question"]), row["document"])] = refs
    return labels


def label_quality(rows: list[dict], labels: dict[tuple[str, str], list[str]]) -> dict[str, dict]:
    """Per strategy: how many kept rows had a label, and how well they agree with it."""
    groups: dict[str, list[tuple[dict, list[str]]]] = defaultdict(list)
    for row in rows:
        refs = labels.get(question_key(row["question"], row.get("document")))
        if refs:
            groups[row.get("strategy") or "-"].append((row, refs))
    return {strategy: _quality(pairs) for strategy, pairs in sorted(groups.items())}


def _quality(pairs: list[tuple[dict, list[str]]]) -> dict:
    yes_no = [(metrics.yes_no_label(r["answer"]), metrics.yes_no_reference_label(refs[0])) for r, refs in pairs
              if metrics.is_yes_no_reference(refs[0])]
    free = [metrics.token_f1(r["answer"], refs) for r, refs in pairs if not metrics.is_yes_no_reference(refs[0])]

    def precision(label: str | None) -> float | None:
        chosen = [gold for pred, gold in yes_no if label is None or pred == label]
        return round(sum(1 for pred, gold in yes_no if (label is None or pred == label) and pred == gold)
                     / len(chosen), 4) if chosen else None

    return {"checked": len(pairs), "yes_no_checked": len(yes_no),
            "yes_no_label_precision": precision(None), "yes_precision": precision("yes"),
            "no_precision": precision("no"),
            "gold_yes_share": round(sum(1 for _, g in yes_no if g == "yes") / len(yes_no), 4) if yes_no else None,
            "extraction_checked": len(free),
            "extraction_token_f1": round(sum(free) / len(free), 4) if free else None}


def with_label_quality(project: Project, rows: list[dict], report: dict) -> dict:
    """The synth report with "label_quality" added when `synth.label_check` names a file."""
    check = project.settings.synth.label_check
    if not check:
        return report
    path = Path(check) if Path(check).is_absolute() else project.root / check
    return {**report, "label_quality": label_quality(rows, load_labels(path))}
