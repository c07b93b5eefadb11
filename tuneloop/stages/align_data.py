"""Training data for `tuneloop train align`: TRL conversational rows, and the replay buffer.

Every row carries a content `key` (sha256 of its training fields). An alignment version records
the keys it was trained on in `hyperparams["data"]["keys"]`; later runs treat rows with a known
key as "old". A run trains on every *fresh* row plus a replay share of old rows
(`align.replay_fraction` x the fresh count, sampled with the run's seed):

* dpo / orpo: rows `{"prompt", "chosen", "rejected"}` from the store's PreferencePair rows (human A/B
  choices, corrections and the AI judge's pairs; superseded rows skipped) or from a feedback export
  folder's `preferences.jsonl` (`--data`). Replay = earlier cycles' pairs (seed Q/A pairs have no
  rejected answer, so they cannot anchor a pairwise loss). With `align.balance_yes_no`, fresh
  pairs whose chosen answer is a bare Yes or No are down-sampled to equal counts (corrections
  of a model that says "Yes" too often are nearly all "No"; DPO on them teaches "always No").
* kto: rows `{"prompt", "completion", "label"}` from routed thumbs plus every preference pair
  unpaired (chosen -> desirable, rejected -> undesirable), or `kto.jsonl` (`--data`). Replay =
  earlier rows and the seeds as desirable examples.
* grpo: rows `{"prompt", "reference", "question", "excerpts"}` from the train split (seeds and
  synthetic examples); the reward (`stages/rewards`) is token F1 of the sampled answer against
  `reference`, or the judge's rubric score given `question` and `excerpts`. Replay = earlier prompts.

The example ids / pair ids are kept in hyperparams too, never in `training_example_ids`: that
column drives SFT's own replay selection (an example counted there is no longer "new" for SFT).

Rows whose question (with its document) is a held-out or dev example are left out, counted in
the run's data summary: a correction of a held-out question must not train the candidate the
held-out set judges.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from tuneloop.artifacts import read_jsonl
from tuneloop.errors import ConfigError, StateError
from tuneloop.feedback.routing import PromptBuilder, route_feedback
from tuneloop.metrics import yes_no_reference_label
from tuneloop.programs.rag import Retriever, build_messages
from tuneloop.programs.synth import number_passages
from tuneloop.splits import question_key
from tuneloop.stages.common import balance_labels
from tuneloop.stages.methods import ALIGN_METHODS, METHODS, TRL_COLUMNS
from tuneloop.store import Example, ModelVersion, PreferencePair, Session

KEY_COLUMNS = {**TRL_COLUMNS, "prompts": ("prompt", "reference")}  # per data kind: what makes a row the same row


@dataclass
class AlignData:
    method: str
    source: str  # "store" or the --data folder
    fresh: list[dict]
    replay: list[dict]
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def rows(self) -> list[dict]:
        return self.fresh + self.replay

    def trl_rows(self) -> list[dict]:
        cols = TRL_COLUMNS[METHODS[self.method].data]
        return [{c: r[c] for c in cols} for r in self.rows]

    def summary(self) -> dict:
        keys = sorted(r["key"] for r in self.rows)
        return {"source": self.source, "n_fresh": len(self.fresh), "n_replay": len(self.replay),
                "counts": self.counts, "keys": keys,
                "sha256": hashlib.sha256("\n".join(keys).encode()).hexdigest(),
                "pair_ids": sorted({i for r in self.rows for i in r.get("pair_ids", [])}),
                "example_ids": sorted({r["example_id"] for r in self.rows if r.get("example_id") is not None})}


def row_key(method: str, row: dict) -> str:
    cols = KEY_COLUMNS[METHODS[method].data]
    payload = json.dumps([method] + [row[c] for c in cols], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def trained_keys(session: Session) -> set[str]:
    keys: set[str] = set()
    for hp in session.scalars(select(ModelVersion.hyperparams)):
        keys.update(((hp or {}).get("data") or {}).get("keys") or [])
    return keys


def _prompt(question: str, document: str | None, meta: dict, retriever: Retriever | None) -> list[dict]:
    if meta.get("prompt_messages"):
        return meta["prompt_messages"]
    if retriever is None:
        raise StateError("a preference pair has no stored prompt and there is no retrieval index to rebuild it: "
                         "run `tuneloop ingest` first")
    return build_messages(question, retriever.retrieve(question, document))


def _read_export(data_dir: Path, name: str) -> list[dict]:
    path = Path(data_dir) / f"{name}.jsonl"
    if not path.is_file():
        raise ConfigError(f"{path} not found: pass a `tuneloop feedback export` folder to --data")
    return read_jsonl(path)


def heldout_keys(session: Session) -> set[tuple[str, str]]:
    """The question keys (`splits.question_key`) of every example not in the train split (the
    held-out and dev sets): alignment never trains on them, whatever produced the pair."""
    return {question_key(e.question, e.document)
            for e in session.scalars(select(Example).where(Example.split != "train"))}


def preference_rows(session: Session, retriever: Retriever | None, data_dir: Path | None,
                    held: set[tuple[str, str]] | None = None) -> list[dict]:
    """DPO/ORPO rows; `held`: the held-out question keys (`heldout_keys`, read here when not given)."""
    if data_dir is not None:
        return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
                 "pair_ids": r.get("preference_pair_ids") or [], "origin": r.get("source", "export")}
                for r in _read_export(data_dir, "preferences")]
    rows, held = [], heldout_keys(session) if held is None else held
    for p in session.scalars(select(PreferencePair).order_by(PreferencePair.id)):
        meta = p.meta or {}
        if meta.get("superseded") or p.chosen == p.rejected:
            continue
        rows.append({"prompt": _prompt(p.prompt, meta.get("document"), meta, retriever),
                     "chosen": assistant(p.chosen), "rejected": assistant(p.rejected),
                     "pair_ids": [p.id], "origin": p.source,
                     "held_out": question_key(p.prompt, meta.get("document")) in held})
    return rows


def kto_rows(session: Session, retriever: Retriever | None, data_dir: Path | None, rule: str) -> list[dict]:
    if data_dir is not None:
        return [{"prompt": r["prompt"], "completion": r["completion"], "label": bool(r["label"]),
                 "origin": r.get("source", "export")} for r in _read_export(data_dir, "kto")]
    held = heldout_keys(session)
    rows = [{"prompt": k.prompt, "completion": assistant(k.completion), "label": bool(k.label), "origin": "thumbs",
             "held_out": question_key(k.question, k.document) in held}
            for k in route_feedback(session, PromptBuilder(session, retriever), rule).kto]
    for p in preference_rows(session, retriever, None, held):  # a pair, unpaired: one good and one bad answer
        for label, side in ((True, "chosen"), (False, "rejected")):
            rows.append({"prompt": p["prompt"], "completion": p[side], "label": label, "pair_ids": p["pair_ids"],
                         "origin": f"{p['origin']}-pair", "held_out": p["held_out"]})
    return rows


def _example_rows(examples: list[Example], retriever: Retriever, kind: str) -> list[dict]:
    """Rows of data `kind` "prompts" (GRPO) or "unpaired" (KTO: the answer as a desirable one)."""
    rows = []
    for e in examples:
        passages = retriever.retrieve(e.question, e.document)
        prompt = build_messages(e.question, passages)
        if kind == "prompts":  # question and excerpts: what the judge reward reads
            rows.append({"prompt": prompt, "reference": e.answer, "question": e.question,
                         "excerpts": number_passages(passages), "example_id": e.id, "origin": e.kind})
        else:
            rows.append({"prompt": prompt, "completion": assistant(e.answer), "label": True, "example_id": e.id,
                         "origin": e.kind})
    return rows


def _train_examples(session: Session, kinds: tuple[str, ...]) -> list[Example]:
    return list(session.scalars(select(Example).where(Example.split == "train", Example.kind.in_(kinds))
                                .order_by(Example.id)))


def chosen_label(row: dict) -> str | None:
    """"yes"/"no" when a pair's chosen answer is a bare Yes or No (the label balancing looks at), else None."""
    text = row["chosen"][-1]["content"] if isinstance(row["chosen"], list) else str(row["chosen"])
    return yes_no_reference_label(text)


def select_align_data(session: Session, method: str, retriever: Retriever | None, data_dir: Path | None,
                      replay_fraction: float, seed: int, contradiction_rule: str = "majority",
                      balance_yes_no: bool = False) -> AlignData:
    """The fresh rows and the replay rows of one alignment run (see the module docstring)."""
    kind = METHODS[method].data if method in ALIGN_METHODS else None
    anchors: list[dict] = []
    if kind == "pairs":
        rows = preference_rows(session, retriever, data_dir)
        if not rows:
            raise StateError("no preference pairs: collect A/B choices or corrections with `tuneloop serve`, "
                             "or create AI preferences with `tuneloop rlaif`")
    elif kind == "unpaired":
        rows = kto_rows(session, retriever, data_dir, contradiction_rule)
        if not rows:
            raise StateError(f"no thumbs-up/down feedback or preference pairs for {method.upper()}: collect "
                             "feedback with `tuneloop serve`")
        if retriever is not None:
            anchors = _example_rows(_train_examples(session, ("seed",)), retriever, kind)
    elif kind == "prompts":
        if retriever is None:
            raise StateError(f"{method.upper()} needs the retrieval index to build prompts: "
                             "run `tuneloop ingest` first")
        rows = _example_rows(_train_examples(session, ("seed", "synthetic")), retriever, kind)
        if not rows:
            raise StateError(f"no training questions for {method.upper()}: import seeds (`tuneloop seeds import`) "
                             "or run `tuneloop synth`")
    else:
        raise ConfigError(f"align method {method!r} is not implemented yet (use one of {', '.join(ALIGN_METHODS)})")
    # a question of the held-out (or dev) set is never trained on: corrections and RLAIF pairs
    # come from live questions, and some of those are held out (`feedback.heldout_fraction`)
    kept = [r for r in rows if not r.pop("held_out", False)]
    held_out, rows = len(rows) - len(kept), kept
    if not rows:
        raise StateError(f"all {held_out} {method} training rows are about held-out questions: "
                         "collect feedback on other questions")
    for r in rows + anchors:
        r["key"] = row_key(method, r)
    unique: dict[str, dict] = {}
    for r in rows:
        unique.setdefault(r["key"], r)
    rows = list(unique.values())
    done = trained_keys(session)
    fresh = [r for r in rows if r["key"] not in done]
    if not fresh:
        raise StateError(f"no new {method} training data: every row was used by an earlier alignment run")
    left_out = 0
    if balance_yes_no and kind == "pairs":  # the rows left out stay fresh for a later run
        balanced = balance_labels(fresh, chosen_label, random.Random(seed))
        fresh, left_out = balanced, len(fresh) - len(balanced)
    pool = [r for r in rows if r["key"] in done] + [a for a in anchors if a["key"] not in unique]
    n_replay = min(len(pool), round(replay_fraction * len(fresh)))
    replay = random.Random(seed).sample(pool, n_replay)
    counts = {f"origin_{o}": sum(1 for r in fresh + replay if r.get("origin") == o)
              for o in sorted({r.get("origin") for r in fresh + replay})}
    if left_out:
        counts["left_out_by_yes_no_balance"] = left_out
    if held_out:
        counts["left_out_held_out_questions"] = held_out
    return AlignData(method, str(data_dir) if data_dir is not None else "store", fresh, replay, counts)
