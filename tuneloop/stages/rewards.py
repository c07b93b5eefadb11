"""GRPO reward functions (`align.reward`): a reference metric, or the AI judge's rubric.

TRL's GRPOTrainer calls each reward function with the sampled `completions` and every extra
dataset column as a keyword argument (here `reference`, `question` and `excerpts`, see
`align_data`), and logs it under its `__name__`.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from transformers import TrainerCallback

from tuneloop.metrics import token_f1
from tuneloop.models.base import ChatModel, GenerationParams
from tuneloop.programs.dspy_bridge import predict_many
from tuneloop.programs.judge import JudgePrograms, parsed_score, score_to_reward


def _text(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else str(completion)


def f1_reward(completions, reference, **_) -> list[float]:
    """Token F1 of each sampled answer against the example's reference answer."""
    return [float(token_f1(_text(c), [ref])) for c, ref in zip(completions, reference)]


@dataclass
class JudgeReward:
    """The judge grades each sampled answer 1-5 (correctness against the excerpts, faithfulness,
    brevity: the RLAIF rubric) -> reward (score - 3) / 2 in [-1, 1]. A reply with no parseable
    score gets 0.0 (neutral) and is counted, so a judge that cannot follow the rubric shows up in
    the run's meta instead of silently steering training.

    The judge is built by `make_judge` on the first call, in the process that trains (this one, or
    each Ray Train worker): the object travels to the workers unbuilt. Each process keeps its own
    counts (`counts`); `merged_stats` adds up those the processes saved."""

    make_judge: Callable[[], tuple[ChatModel, object]]  # -> (judge, its dspy.Adapter)
    params: GenerationParams  # greedy
    batch_size: int | str = 8
    calls: int = 0
    unparsed: int = 0
    score_sum: float = 0.0
    scored: int = 0
    __name__ = "judge_reward"  # TRL logs rewards under the function's name

    @cached_property
    def _built(self) -> tuple[ChatModel, object, JudgePrograms]:
        judge, adapter = self.make_judge()
        return judge, adapter, JudgePrograms()

    def __call__(self, completions, question, excerpts, **_) -> list[float]:
        judge, adapter, programs = self._built
        inputs = [{"excerpts": ex, "question": q, "answer": _text(c)}
                  for c, q, ex in zip(completions, question, excerpts)]
        results = predict_many(programs.score, adapter, judge, inputs, self.params, batch=self.batch_size)
        rewards = []
        for parsed, _reply in results:
            self.calls += 1
            score = parsed_score(parsed)
            if score is None:
                self.unparsed += 1
                rewards.append(0.0)
            else:
                self.score_sum, self.scored = self.score_sum + score, self.scored + 1
                rewards.append(score_to_reward(score))
        return rewards

    def counts(self) -> dict:
        """This process's calls, unparsed replies and score total, and the judge's name."""
        name = self._built[0].name if "_built" in self.__dict__ else None
        return {"judge": name, "calls": self.calls, "unparsed": self.unparsed, "score_sum": self.score_sum,
                "scored": self.scored}

    def stats(self) -> dict:
        return merged_stats([self.counts()])


def merged_stats(counts: list[dict]) -> dict:
    """The judge's name, calls, unparsed replies and mean score over the `counts` of each process."""
    scored = sum(c["scored"] for c in counts)
    return {"judge": next((c["judge"] for c in counts if c["judge"]), None),
            "calls": sum(c["calls"] for c in counts), "unparsed": sum(c["unparsed"] for c in counts),
            "mean_score": round(sum(c["score_sum"] for c in counts) / scored, 4) if scored else None}


class SaveJudgeCounts(TrainerCallback):
    """When training ends, each process writes its reward's `counts` to <folder>/<process index>.json."""

    def __init__(self, reward: JudgeReward, folder: Path):
        self.reward, self.folder = reward, folder

    def on_train_end(self, args, state, control, **kwargs):
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"{args.process_index}.json").write_text(json.dumps(self.reward.counts()))


def saved_judge_stats(folder: Path) -> dict:
    """`merged_stats` of the counts every process saved in `folder`."""
    return merged_stats([json.loads(f.read_text(encoding="utf-8")) for f in sorted(folder.glob("*.json"))])
