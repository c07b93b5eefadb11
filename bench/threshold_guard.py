"""How often the yes/no threshold leaves 0, with and without signal, and what it buys out of sample.

`programs/decide.choose_threshold` picks the threshold with the best balanced accuracy on the dev
split's yes/no questions, and keeps 0 (the model's own preference) unless a threshold chosen that
way beats 0 on questions it was not chosen on (`_holds_out_of_sample`). The earlier guard tested
the chosen threshold on the very questions it was chosen from (in-sample paired bootstrap, p <=
0.05). This simulates both on synthetic margins, so the selection bias can be counted:

- *zero is best*: Yes questions' margins sit `--effect` standard deviations above No's, centred
  on 0, so threshold 0 is the best there is and any move costs accuracy;
- *no signal*: Yes and No margins draw from one normal distribution shifted by `--shift` (a model
  that leans to one answer and cannot tell them apart): moving can neither help nor hurt much;
- *shifted*: the first case moved by `--shift`, so a threshold other than 0 really is better;
- *zero is best, by document*: the first case with the questions spread over `--documents`
  documents, each moving its questions' margins by its own offset (sd `--document-sd`), and the
  fresh questions drawn from new documents (as held-out contracts are).

Three rules: *unguarded* (the best threshold on dev), *in_sample* (kept when it beats 0 on the same
questions, p <= 0.05) and *out_of_sample* (`choose_threshold`: kept when thresholds chosen on one
half of the documents beat 0 on the other half, p <= 0.05).

For each, the share of draws in which the threshold moves, and the mean balanced accuracy on 2,000
fresh questions from the same distribution at the chosen threshold minus at 0 (what moving bought
or cost out of sample).

    .venv/bin/python bench/threshold_guard.py [--n 20] [--draws 200]
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from tuneloop.metrics import balanced_accuracy
from tuneloop.programs.decide import THRESHOLD_P, _best_threshold, choose_threshold, decide
from tuneloop.stats import paired_bootstrap


def in_sample_guard(margins: list[float], golds: list[str]) -> float:
    """The earlier rule: the best threshold, kept when it beats 0 on the same questions at p <= 0.05."""
    best = _best_threshold(margins, golds)
    if best == 0.0:
        return 0.0

    def at(t: float):
        return lambda idx: balanced_accuracy([golds[i] for i in idx], [decide(margins[i], t).lower() for i in idx])

    return best if paired_bootstrap(len(golds), at(best), at(0.0), 1000).p_value <= THRESHOLD_P else 0.0


def draw(rng: np.random.Generator, n: int, effect: float, shift: float, documents: int = 0,
         document_sd: float = 0.0) -> tuple[list[float], list[str], list[str] | None]:
    """n questions, half Yes; with `documents`, spread over that many documents (in turn), each
    document moving all its questions' margins by its own normal offset (sd `document_sd`)."""
    golds = ["yes"] * (n // 2) + ["no"] * (n - n // 2)
    docs = [f"d{i % documents}" for i in range(n)] if documents else None
    offset = {d: float(rng.normal(0.0, document_sd)) for d in set(docs or [])}
    margins = [float(rng.normal(shift + (effect / 2 if g == "yes" else -effect / 2), 1.0))
               + (offset[docs[i]] if docs else 0.0) for i, g in enumerate(golds)]
    return margins, golds, docs


def fresh_gain(rng: np.random.Generator, threshold: float, effect: float, shift: float,
               document_sd: float) -> float:
    margins, golds, _ = draw(rng, 2000, effect, shift, 400 if document_sd else 0, document_sd)
    return (balanced_accuracy(golds, [decide(m, threshold).lower() for m in margins])
            - balanced_accuracy(golds, [decide(m, 0.0).lower() for m in margins]))


def scenario(n: int, draws: int, effect: float, shift: float, seed: int, documents: int = 0,
             document_sd: float = 0.0) -> dict:
    rng = np.random.default_rng(seed)
    moved = {"unguarded": 0, "in_sample": 0, "out_of_sample": 0}
    gain = dict.fromkeys(moved, 0.0)
    for _ in range(draws):
        margins, golds, docs = draw(rng, n, effect, shift, documents, document_sd)
        chosen = {"unguarded": _best_threshold(margins, golds), "in_sample": in_sample_guard(margins, golds),
                  "out_of_sample": choose_threshold(margins, [g == "yes" for g in golds], "dev", docs).value}
        for rule, t in chosen.items():
            moved[rule] += t != 0.0
            gain[rule] += fresh_gain(rng, t, effect, shift, document_sd) if t != 0.0 else 0.0
    return {rule: {"moved_share": round(moved[rule] / draws, 3), "mean_fresh_gain": round(gain[rule] / draws, 4)}
            for rule in moved}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20, help="dev yes/no questions (half Yes)")
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--effect", type=float, default=1.0, help="Yes margins this many sd above No")
    parser.add_argument("--shift", type=float, default=-1.5, help="where the margins sit relative to 0")
    parser.add_argument("--documents", type=int, default=4, help="dev documents in the by-document case")
    parser.add_argument("--document-sd", type=float, default=1.0, help="sd of each document's margin offset")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = {"n": args.n, "draws": args.draws, "effect": args.effect, "shift": args.shift,
              "zero_is_best": scenario(args.n, args.draws, args.effect, 0.0, args.seed),
              "no_signal": scenario(args.n, args.draws, 0.0, args.shift, args.seed + 1),
              "shifted": scenario(args.n, args.draws, args.effect, args.shift, args.seed + 2),
              "zero_is_best_by_document": scenario(args.n, args.draws, args.effect, 0.0, args.seed + 3,
                                                   args.documents, args.document_sd)}
    print(json.dumps(result, indent=2))
    print(f"reproduce: .venv/bin/python bench/threshold_guard.py --n {args.n} --draws {args.draws} "
          f"--effect {args.effect} --shift {args.shift} --documents {args.documents} "
          f"--document-sd {args.document_sd} --seed {args.seed}")


if __name__ == "__main__":
    main()
