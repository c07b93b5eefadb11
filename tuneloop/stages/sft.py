"""Stage: supervised LoRA fine-tuning of the student with TRL's SFTTrainer and PEFT.

Training rows are prompt-completion conversations built by `programs.rag.build_messages`, the
exact prompt used when serving, so loss is computed on the answer only (TRL's default for
prompt-completion data). The run itself (resume, artifact, registration) is `stages.training`.
"""
from __future__ import annotations

import math
import random
from functools import partial
from pathlib import Path

from sqlalchemy import select

from tuneloop.config import LoraSettings, Project, SFTSettings
from tuneloop.errors import StateError
from tuneloop.evalsets import references, split_examples
from tuneloop.filters import copied_span
from tuneloop.lineage import ancestry
from tuneloop.metrics import is_yes_no_reference, yes_no_reference_label
from tuneloop.programs.rag import Passage, Retriever, build_messages
from tuneloop.progress import Reporter
from tuneloop.stages.common import balance_labels, training_parent
from tuneloop.stages.methods import METHODS
from tuneloop.stages.policy import load_policy
from tuneloop.stages.training import (
    Finished,
    Run,
    Trained,
    TrainResult,
    build_trainer,
    estimated_steps,
    train_and_register,
    train_model,
    trl_rows,
)
from tuneloop.store import Example, ModelVersion, Session

SFT = METHODS["sft"]


def select_examples(session: Session, settings: SFTSettings, seed: int,
                    parent: ModelVersion | None = None) -> tuple[list[Example], list[Example]]:
    """(new, replay): the seeds (all of them when `seeds_every_cycle`, else those not trained on
    yet) + the other examples not trained on yet, yes/no answers balanced when `balance_yes_no`
    and the rarer answer kind repeated up to `min_kind_share` (`balance_kinds`); and a replay
    share of the examples trained on before.

    "Trained on" means by `parent` or one of its ancestors (the weights training continues), or
    by any version when `parent` is None. So the data of a rejected candidate is new again for
    the next cycle, which trains from the champion: what the rejected adapter learnt was dropped
    with it, and without this rule the next cycle would see that data only as a 10% replay."""
    versions = ancestry(session, parent) if parent is not None else session.scalars(select(ModelVersion))
    trained_on: set[int] = set()
    for version in versions:
        trained_on.update(version.training_example_ids or [])
    train = split_examples(session, "train")

    def always(e: Example) -> bool:  # trained on in every cycle, never replayed
        return e.kind == "seed" and settings.seeds_every_cycle

    seeds = [e for e in train if always(e)]
    new = [e for e in train if not always(e) and e.id not in trained_on]
    old = [e for e in train if not always(e) and e.id in trained_on]
    n_replay = min(len(old), round(settings.replay_fraction * max(1, len(new))))
    rng = random.Random(seed)
    replay = rng.sample(old, n_replay)
    fresh = seeds + new
    if settings.balance_yes_no:
        fresh = balance_yes_no(fresh, rng)
    return balance_kinds(fresh, settings.min_kind_share), replay


MAX_REPEATS = 4  # `balance_kinds` shows an example at most this many times in one run


def balance_kinds(examples: list[Example], min_share: float) -> list[Example]:
    """`examples` plus repeats of the rarer answer kind (yes/no or extraction), round-robin, until
    it makes up `min_share` of the rows, each example at most `MAX_REPEATS` times in all.

    Seed-question transfer labels far more yes/no questions than extraction ones (168 of 182 rows
    on CUAD); trained on that mix, the student answered "Yes" or "No" to extraction questions too.
    Repeating the rarer kind is the mixing rule of multi-task fine-tuning (T5, FLAN): a small task
    is up-sampled, with a cap so that a few examples are not memorised."""
    if min_share <= 0:
        return examples
    yes_no = [e for e in examples if is_yes_no_reference(e.answer)]
    other = [e for e in examples if not is_yes_no_reference(e.answer)]
    if not yes_no or not other:
        return examples
    minority, majority = sorted((yes_no, other), key=len)
    wanted = math.ceil(min_share * len(majority) / (1 - min_share))  # min_share <= 0.5 (SFTSettings)
    extra = min(wanted, MAX_REPEATS * len(minority)) - len(minority)
    return examples + [minority[i % len(minority)] for i in range(max(0, extra))]


def balance_yes_no(examples: list[Example], rng: random.Random) -> list[Example]:
    """Down-sample the majority yes/no answer to the minority's count (`stages.common.balance_labels`);
    extraction examples are all kept."""
    return balance_labels(examples, lambda e: yes_no_reference_label(e.answer), rng)


def training_rows(examples: list[Example], retriever: Retriever) -> list[dict]:
    rows = []
    for e in examples:
        passages = retriever.retrieve(e.question, e.document)
        rows.append({
            "prompt": build_messages(e.question, passages),
            "completion": [{"role": "assistant", "content": training_target(e, passages)}],
            "example_id": e.id,
        })
    return rows


def training_target(example: Example, passages: list[Passage]) -> str:
    """What the student learns to answer: the example's answer, except that an answer not found in
    the prompt's passages is replaced by an evidence span (`meta["references"]`) that is, copied in
    the document's own words. The student learns to copy the clause it can see ("15th day of June,
    2015") instead of a rewording it cannot ("6/15/2015"); yes/no answers are kept as they are."""
    answer = example.answer
    if is_yes_no_reference(answer) or copied_span(answer, [p.text for p in passages]) is not None:
        return answer
    spans = [copied_span(r, [p.text for p in passages]) for r in references(example)[1:]]
    found = [s for s in spans if s]
    return min(found, key=len) if found else answer


def _build(model_dir: Path, parent_adapter: Path | None, rows: list[dict], s: SFTSettings, lora: LoraSettings,
           work_dir: Path):
    """(trainer, tokenizer) of an SFT run on `rows`, continuing `parent_adapter` (a new LoRA when None)."""
    policy = load_policy(model_dir, parent_adapter, lora, s.precision)
    return build_trainer(SFT, policy, trl_rows(rows, SFT), s, work_dir), policy.tokenizer


def _train(model_dir: Path, parent_adapter: Path | None, rows: list[dict], s: SFTSettings, lora: LoraSettings,
           work_dir: Path, reporter: Reporter, project: Project) -> Finished:
    """Train on `rows` (in this process or on Ray Train, `compute.engine`)."""
    return train_model(partial(_build, model_dir, parent_adapter, rows, s, lora), work_dir, SFT.label,
                       estimated_steps(len(rows), s), reporter, project)


def train_sft(project: Project, session: Session, retriever: Retriever | None, reporter: Reporter,
              cycle_id: int | None = None, parent: ModelVersion | None = None) -> TrainResult:
    """Train a LoRA candidate from the champion (or `parent`: the cycle's DAPT version); write the
    adapter artifact; add a candidate version."""
    parent = training_parent(project, session, parent, "fine-tuned")
    run = Run(project, "sft", "sft", parent, cycle_id)

    def train(work_dir: Path) -> Trained:
        if retriever is None:
            raise StateError("training needs the retrieval index: run `tuneloop ingest` first")
        s = project.settings.sft
        new, replay = select_examples(session, s, s.seed + (cycle_id or 0), parent)
        if not new:
            raise StateError("no training examples: import seeds (`tuneloop seeds import`) or run `tuneloop synth`")
        rows = training_rows(new + replay, retriever)
        finished = _train(run.model_dir, run.parent_adapter, rows, s, project.settings.lora, work_dir, reporter,
                          project)
        return Trained(finished, rows, {
            "example_ids": list(dict.fromkeys(r["example_id"] for r in rows)), "n_new": len(new),
            "n_replay": len(replay), "n_rows": len(rows),
            "hyperparams": {**s.model_dump(), "lora": project.settings.lora.model_dump()}})

    return train_and_register(session, run, train)
