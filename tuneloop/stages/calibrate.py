"""Stage (part of eval): choose a model version's yes/no threshold before it is evaluated.

The student answers a yes/no question "Yes" when log P(Yes) - log P(No) of its first answer token
reaches the version's threshold (`programs/decide.py`). Here the threshold is chosen to maximise
balanced accuracy on the yes/no questions of the dev split (never trained on, never the held-out
set), answered with retrieval exactly as eval and serving answer them; it moves from 0 only when a
threshold chosen on half of the dev documents beats 0 on the other half (`decide.choose_threshold`);
it is stored in
`ModelVersion.hyperparams["yes_no_threshold"]` with where it was chosen. Evaluation, the gate and
`tuneloop serve` then decide with that one value.

When the dev split lacks a Yes or a No question, the training split's are used instead and the
stored `source` says "train" (optimistic for a model trained on them: import a dev split with
`tuneloop seeds import FILE --split dev` to avoid it). With neither, the threshold stays 0 (the
likelier of the two tokens) and `source` is "none".
"""
from __future__ import annotations

from tuneloop import metrics
from tuneloop.config import Project
from tuneloop.evalsets import split_examples
from tuneloop.models.registry import build_chat_model, generation_params
from tuneloop.programs.decide import (
    THRESHOLD_KEY,
    Threshold,
    choose_threshold,
    decides,
    is_yes_no_question,
    stored_threshold,
)
from tuneloop.programs.rag import RagAnswerer, Retriever, rag_program_path
from tuneloop.progress import Reporter
from tuneloop.store import Example, ModelVersion, Session
from tuneloop.versions import adapter_folder


def yes_no_examples(session: Session, split: str) -> list[Example]:
    """The split's questions that are yes/no by their wording and answered Yes or No."""
    return [e for e in split_examples(session, split)
            if is_yes_no_question(e.question) and metrics.is_yes_no_reference(e.answer)]


def _both_answers(examples: list[Example]) -> bool:
    labels = {metrics.yes_no_reference_label(e.answer) for e in examples}
    return labels >= {"yes", "no"}


def calibration_set(session: Session) -> tuple[list[Example], str]:
    """The yes/no questions the threshold is chosen on, and their split ("none": there are none)."""
    for split in ("dev", "train"):
        examples = yes_no_examples(session, split)
        if _both_answers(examples):
            return examples, split
    return [], "none"


def calibrate_version(project: Project, session: Session, version: ModelVersion, retriever: Retriever,
                      reporter: Reporter) -> Threshold | None:
    """Choose and store `version`'s threshold unless it has one; None when its answers are not
    decided (a compiled DSPy program, or a model that gives no token probabilities)."""
    stored = stored_threshold(version.hyperparams)
    if stored is not None:
        return stored
    role = project.settings.models.student
    adapter = adapter_folder(version)
    model = build_chat_model(project, role, adapter)
    if not decides(model, rag_program_path(version)):
        return None
    examples, source = calibration_set(session)
    if examples:
        reporter.log(f"choosing {version.name}'s yes/no threshold on {len(examples)} {source}-split questions")
        answers = RagAnswerer(retriever, model, generation_params(role)).answer_many(
            [(e.question, e.document) for e in examples], reporter, role.batch_size)
        labels = [metrics.yes_no_reference_label(e.answer) == "yes" for e in examples]
        threshold = choose_threshold([a.yes_no_margin if a.yes_no_margin is not None else 0.0 for a in answers],
                                     labels, source, [e.document for e in examples])
    else:
        threshold = Threshold(value=0.0, source="none", n=0, balanced_accuracy=None)
    version.hyperparams = {**(version.hyperparams or {}), THRESHOLD_KEY: threshold.as_dict()}
    session.flush()
    return threshold
