"""GRPO reward functions (`align.reward`): a reference metric, or the AI judge's rubric.

TRL's GRPOTrainer calls each reward function with the sampled `completions` and every extra
dataset column as a keyword argument (here `reference`, `question` and `excerpts`, see
`align_data`), and logs it under its `__name__`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

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
    the run's meta instead of silently steering training."""

    judge: ChatModel
    adapter: object  # a dspy.Adapter (plain-chat for small local judges)
    params: GenerationParams  # greedy
    batch_size: int | str = 8
    calls: int = 0
    unparsed: int = 0
    scores: list[float] = field(default_factory=list)
    __name__ = "judge_reward"  # TRL logs rewards under the function's name

    def __post_init__(self):
        self.programs = JudgePrograms()

    def __call__(self, completions, question, excerpts, **_) -> list[float]:
        inputs = [{"excerpts": ex, "question": q, "answer": _text(c)}
                  for c, q, ex in zip(completions, question, excerpts)]
        results = predict_many(self.programs.score, self.adapter, self.judge, inputs, self.params,
                               batch=self.batch_size)
        rewards = []
        for parsed, _reply in results:
            self.calls += 1
            score = parsed_score(parsed)
            if score is None:
                self.unparsed += 1
                rewards.append(0.0)
            else:
                self.scores.append(score)
                rewards.append(score_to_reward(score))
        return rewards

    def stats(self) -> dict:
        return {"calls": self.calls, "unparsed": self.unparsed,
                "mean_score": round(sum(self.scores) / len(self.scores), 4) if self.scores else None}
