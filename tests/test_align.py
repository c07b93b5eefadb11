"""Preference alignment on the tiny model: each method trains, DPO raises the margin, runs resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy import select
from transformers import TrainerCallback

from tests.helpers import RecordingReporter, ingest_project
from tuneloop.artifacts import read_meta, write_jsonl
from tuneloop.errors import ConfigError, StateError
from tuneloop.progress import SilentReporter
from tuneloop.stages import align as align_stage
from tuneloop.stages.align import train_align
from tuneloop.stages.rewards import f1_reward
from tuneloop.store import Example, ModelVersion, PreferencePair, open_store
from tuneloop.versions import ensure_base_version

ALIGN = {"align": {"batch_size": 2, "max_length": 64, "max_completion_length": 6, "num_generations": 2,
                   "learning_rate": 5e-3, "save_steps": 1000, "replay_fraction": 0.0}}
QUESTIONS = ["What law governs the agreement?", "Who are the parties?", "When does the agreement end?",
             "Can the agreement be assigned?", "Is there a non-compete?", "What is the notice period?",
             "Who pays the fees?", "Is the license exclusive?"]
CHOSEN, REJECTED = "the laws of Ontario", "No"


def prompt(question: str) -> list[dict]:
    return [{"role": "system", "content": "Answer from the excerpts."}, {"role": "user", "content": question}]


def add_pairs(session, n: int = 8, with_messages: bool = True) -> None:
    for q in QUESTIONS[:n]:
        meta = {"prompt_messages": prompt(q)} if with_messages else {}
        session.add(PreferencePair(prompt=q, chosen=CHOSEN, rejected=REJECTED, source="human", meta=meta))
    session.flush()


def make_champion(project, session, tmp: Path) -> ModelVersion:
    """A champion 'v1' with a LoRA adapter whose weights are all non-zero (so its copy is recognisable)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = ensure_base_version(project, session)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(project.settings.models.student.model)
    s = project.settings.lora
    model = get_peft_model(model, LoraConfig(r=s.r, lora_alpha=s.alpha, target_modules="all-linear",
                                             task_type="CAUSAL_LM", init_lora_weights=False))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.mul_(0.1)
    path = tmp / "champion-adapter"
    model.save_pretrained(str(path))
    base.status = "retired"
    v1 = ModelVersion(name="v1", parent_id=base.id, base_model=base.base_model, adapter_path=str(path),
                      method="sft", status="champion")
    session.add(v1)
    session.flush()
    return v1


def adapter(path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "adapter_model.safetensors"))


def assert_changed(before: dict, after: dict) -> None:
    assert set(before) == set(after), sorted(set(before) ^ set(after))[:4]
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.fixture
def aligned_project(project, tmp_path):
    def make(overrides=None, champion_adapter=True, pairs=8):
        from tests.helpers import deep_merge
        p = project(deep_merge(ALIGN, overrides or {}))
        with open_store(p.store_url)() as s:
            champ = make_champion(p, s, tmp_path) if champion_adapter else ensure_base_version(p, s)
            if pairs:
                add_pairs(s, pairs)
            s.commit()
            return p, champ.adapter_path
    return make


def capture_trainers(monkeypatch, callback=None) -> list:
    seen = []
    real = align_stage.build_trainer

    def build(*a, **kw):
        trainer, tok = real(*a, **kw)
        if callback is not None:
            trainer.add_callback(callback)
        seen.append(trainer)
        return trainer, tok

    monkeypatch.setattr(align_stage, "build_trainer", build)
    return seen


def completion_logp(model, tokenizer, messages, answer: str) -> float:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    ans = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    x = torch.tensor([list(ids) + ans])
    with torch.no_grad():
        logp = torch.log_softmax(model(x).logits[0, :-1].float(), -1)
    targets = x[0, 1:]
    picked = logp.gather(1, targets[:, None])[:, 0]
    return picked[-len(ans):].sum().item()


def mean_margin(model_dir, adapter_dir) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuneloop.models.local import load_tokenizer
    tok = load_tokenizer(Path(model_dir))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(adapter_dir)).eval()
    margins = [completion_logp(model, tok, prompt(q), CHOSEN) - completion_logp(model, tok, prompt(q), REJECTED)
               for q in QUESTIONS]
    return sum(margins) / len(margins)


# --------------------------------------------------------------------------- tests


def test_dpo_raises_the_margin_against_the_champion_as_reference(aligned_project, monkeypatch):
    p, champ_path = aligned_project({"align": {"epochs": 3, "learning_rate": 1e-2}})
    trainers = capture_trainers(monkeypatch)
    with open_store(p.store_url)() as s:
        result = train_align(p, s, None, SilentReporter(), method="dpo")
        s.commit()
    trainer = trainers[0]
    assert trainer.state.global_step == 12  # 8 pairs / batch 2 x 3 epochs
    # The reference is the champion: TRL's frozen "ref" adapter holds the champion's weights, unchanged.
    champ = adapter(champ_path)
    ref = {n: prm for n, prm in trainer.model.named_parameters() if ".ref." in n}
    assert ref and len(ref) == len(champ)
    for n, prm in ref.items():
        key = n.replace(".ref.", ".")
        assert torch.equal(prm.detach().cpu(), champ[key]), n
    assert_changed(champ, adapter(result.artifact))
    model_dir = p.settings.models.student.model
    before, after = mean_margin(model_dir, champ_path), mean_margin(model_dir, result.artifact)
    assert after > before + 0.5, (before, after)
    with open_store(p.store_url)() as s:
        v = s.get(ModelVersion, result.version.id)
        champion = s.scalar(select(ModelVersion).where(ModelVersion.name == "v1"))
        assert (v.method, v.status, v.parent_id) == ("dpo", "candidate", champion.id)
        data = v.hyperparams["data"]
        assert data["n_fresh"] == 8 and data["n_replay"] == 0 and len(data["keys"]) == 8
        assert len(data["pair_ids"]) == 8 and v.hyperparams["beta"] == 0.1
        assert v.training_example_ids == []
    assert read_meta(result.artifact)["reference"] == "champion v1"
    assert not (result.artifact / "ref").exists()  # only the trained adapter is saved


@pytest.mark.parametrize("method", ["orpo", "kto"])
def test_orpo_and_kto_train_the_champion_adapter(aligned_project, method):
    p, champ_path = aligned_project(pairs=3)  # KTO: 3 pairs unpaired = 6 rows; ORPO: 3 pairs
    with open_store(p.store_url)() as s:
        result = train_align(p, s, None, SilentReporter(), method=method)
        s.commit()
    history = json.loads((result.artifact / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == ([1, 2] if method == "orpo" else [1, 2, 3])
    assert_changed(adapter(champ_path), adapter(result.artifact))
    assert result.version.method == method


def test_kto_reads_an_export_folder(aligned_project, tmp_path):
    p, champ_path = aligned_project(pairs=0)
    data = tmp_path / "export"
    data.mkdir()
    write_jsonl(data / "kto.jsonl", [
        {"prompt": prompt(q), "completion": [{"role": "assistant", "content": CHOSEN if i % 2 else REJECTED}],
         "label": bool(i % 2), "source": "human"} for i, q in enumerate(QUESTIONS[:4])])
    with open_store(p.store_url)() as s:
        result = train_align(p, s, None, SilentReporter(), method="kto", data_dir=data)
        assert result.version.hyperparams["data"]["source"] == str(data)
        assert result.version.hyperparams["data"]["n_fresh"] == 4
    assert_changed(adapter(champ_path), adapter(result.artifact))


def test_grpo_with_metric_reward_and_a_new_lora_on_the_base_champion(aligned_project, monkeypatch):
    p, _ = aligned_project(champion_adapter=False, pairs=0)
    # The tiny random model's answers share no token with the references, so token F1 is 0 for
    # every sample, every group's advantages are 0, and at the start (lora_B = 0, policy = reference)
    # nothing moves the adapter. A reward that tells the samples apart (shorter is better) does.
    seen = []

    def shorter_is_better(completions, reference, **kw):
        seen.append(f1_reward(completions, reference, **kw))
        return [-len(c[-1]["content"]) / 100 for c in completions]

    monkeypatch.setattr(align_stage, "f1_reward", shorter_is_better)
    retriever = ingest_project(p)
    with open_store(p.store_url)() as s:
        result = train_align(p, s, retriever, SilentReporter(), method="grpo", name="grpo-run")
        s.commit()
        data = result.version.hyperparams["data"]
        assert data["n_fresh"] == 20 and len(data["example_ids"]) == 20  # the sample seeds
        assert result.version.hyperparams["kl_beta"] == 0.04
    history = json.loads((result.artifact / "log_history.json").read_text())
    assert history[-1]["step"] == 10  # 20 prompts / 2 per step
    assert any("reward" in h for h in history)
    assert seen and any(h.get("reward_std", 0) > 0 for h in history)
    b = {k: v for k, v in adapter(result.artifact).items() if "lora_B" in k}
    assert b and any(v.abs().max() > 0 for v in b.values())  # PEFT starts lora_B at zero


def test_judge_reward_maps_rubric_scores_and_counts_unparsed_replies():
    from tests.test_rlaif import FakeJudge
    from tuneloop.models.base import GenerationParams
    from tuneloop.programs.dspy_bridge import PlainChatAdapter
    from tuneloop.stages.rewards import JudgeReward

    judge = FakeJudge()  # "Yes": all criteria 5; "No": "2 - ..."; anything else: no score
    reward = JudgeReward(lambda: (judge, PlainChatAdapter()), GenerationParams(max_new_tokens=16, temperature=0.0))
    completions = [[{"role": "assistant", "content": a}] for a in ("Yes", "No", "Maybe")]
    out = reward(completions, question=["Is it renewable?"] * 3, excerpts=["[1] It renews each year."] * 3,
                 reference=["Yes"] * 3)
    assert out == [1.0, -0.5, 0.0]
    assert reward.stats() == {"judge": "fake-judge", "calls": 3, "unparsed": 1, "mean_score": 3.5}
    assert all("[1] It renews each year." in c[-1]["content"] and "Is it renewable?" in c[-1]["content"]
               for c in judge.sent)


def test_grpo_with_the_judge_as_reward(aligned_project, monkeypatch):
    import tuneloop.models.registry as registry
    from tests.test_rlaif import FakeJudge, field

    p, champ_path = aligned_project({"align": {"reward": "judge"}}, pairs=0)
    retriever = ingest_project(p)
    judge = FakeJudge(score=lambda answer: "4" if len(answer) % 2 else "no idea")
    monkeypatch.setattr(registry, "build_chat_model", lambda project, role, adapter=None, engine=None: judge)
    with open_store(p.store_url)() as s:
        result = train_align(p, s, retriever, SilentReporter(), method="grpo")
        s.commit()
        stats = result.version.hyperparams["judge_reward"]
    sampled = 20 * 2  # 20 seed prompts x num_generations 2, one epoch
    assert stats["judge"] == "fake-judge" and stats["calls"] == sampled == len(judge.sent)
    assert 0 < stats["unparsed"] < sampled and stats["mean_score"] == 4.0
    history = json.loads((result.artifact / "log_history.json").read_text())
    assert any("rewards/judge_reward/mean" in h for h in history)
    # the judge saw each prompt's own question and retrieved excerpts
    with open_store(p.store_url)() as s:
        questions = {e.question for e in s.scalars(select(Example).where(Example.kind == "seed"))}
    asked = {field(c, "Question") for c in judge.sent}
    assert asked <= questions and len(asked) > 1
    assert all("[1]" in c[-1]["content"] for c in judge.sent)
    assert_changed(adapter(champ_path), adapter(result.artifact))


def test_interrupted_run_resumes_from_its_last_checkpoint(aligned_project, monkeypatch):
    p, _ = aligned_project({"align": {"save_steps": 1}}, pairs=6)

    class Crash(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):  # killed right after checkpoint-2 is written
            if state.global_step == 2:
                raise KeyboardInterrupt("killed")

    capture_trainers(monkeypatch, Crash())
    with open_store(p.store_url)() as s:
        with pytest.raises(KeyboardInterrupt):
            train_align(p, s, None, SilentReporter(), method="dpo", name="dpo-run")
    work = p.artifacts / ".work" / "dpo-run"
    assert (work / "checkpoint-2" / "trainer_state.json").is_file()
    trainers = capture_trainers(monkeypatch)
    reporter = RecordingReporter()
    with open_store(p.store_url)() as s:
        result = train_align(p, s, None, reporter, method="dpo", name="dpo-run")
        s.commit()
    assert any("resuming training from" in m and "checkpoint-2" in m for m in reporter.messages)
    assert trainers[0].state.global_step == 3
    history = json.loads((result.artifact / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3]
    assert reporter.tasks[0][2][0] == 2  # progress starts at the resumed step
    with open_store(p.store_url)() as s:
        # a rerun after success registers nothing new
        again = train_align(p, s, None, SilentReporter(), method="dpo", name="dpo-run")
        s.commit()
        assert again.version.id == result.version.id
        assert [v.method for v in s.scalars(select(ModelVersion).order_by(ModelVersion.id))] == ["base", "sft", "dpo"]
    assert not work.exists()


def test_replay_mixes_earlier_pairs_and_refuses_when_nothing_is_new(aligned_project):
    from tuneloop.stages.align_data import select_align_data

    p, _ = aligned_project({"align": {"replay_fraction": 0.5}}, pairs=4)
    with open_store(p.store_url)() as s:
        first = select_align_data(s, "dpo", None, None, 0.5, 0)
        assert len(first.fresh) == 4 and first.replay == []
        s.add(ModelVersion(name="v2", base_model="x", method="dpo", status="retired",
                           hyperparams={"data": first.summary()}))
        with pytest.raises(StateError, match="no new dpo training data"):
            select_align_data(s, "dpo", None, None, 0.5, 0)
        s.add(PreferencePair(prompt="q", chosen="Yes", rejected="No", source="ai",
                             meta={"prompt_messages": prompt("Is it renewable?")}))
        s.add(PreferencePair(prompt="q2", chosen="Yes", rejected="No", source="ai",
                             meta={"prompt_messages": prompt("Is it terminable?")}))
        s.flush()
        second = select_align_data(s, "dpo", None, None, 0.5, 0)
        assert len(second.fresh) == 2 and len(second.replay) == 1
        assert second.replay[0]["key"] in set(first.summary()["keys"])


def test_pairs_are_balanced_by_the_chosen_yes_no_label(aligned_project):
    from tuneloop.stages.align_data import select_align_data

    p, _ = aligned_project({}, pairs=0)
    with open_store(p.store_url)() as s:
        for i in range(9):  # nine corrections to "No", two to "Yes", one extraction pair
            s.add(PreferencePair(prompt=f"n{i}", chosen="No", rejected="Yes", source="correction",
                                 meta={"prompt_messages": prompt(f"Is clause {i} exclusive?")}))
        for i in range(2):
            s.add(PreferencePair(prompt=f"y{i}", chosen="Yes.", rejected="No.", source="correction",
                                 meta={"prompt_messages": prompt(f"Is licence {i} perpetual?")}))
        s.add(PreferencePair(prompt="x", chosen="The courts of Paris.", rejected="Yes", source="correction",
                             meta={"prompt_messages": prompt("Which court hears disputes?")}))
        s.flush()
        balanced = select_align_data(s, "dpo", None, None, 0.0, 0, balance_yes_no=True)
        plain = select_align_data(s, "dpo", None, None, 0.0, 0, balance_yes_no=False)
    chosen = [r["chosen"][-1]["content"] for r in balanced.fresh]
    assert sorted(chosen) == ["No", "No", "The courts of Paris.", "Yes.", "Yes."]
    assert balanced.counts["left_out_by_yes_no_balance"] == 7
    assert len(plain.fresh) == 12 and "left_out_by_yes_no_balance" not in plain.counts


def test_pairs_about_held_out_questions_are_never_trained_on(aligned_project):
    from tuneloop.stages.align_data import select_align_data
    from tuneloop.store import Example

    p, _ = aligned_project({}, pairs=3)
    with open_store(p.store_url)() as s:
        held = s.scalars(select(Example).where(Example.split == "eval")).first()
        s.add(PreferencePair(prompt=held.question.upper(), chosen="the right answer", rejected="a wrong one",
                             source="correction", meta={"document": held.document,
                                                        "prompt_messages": prompt(held.question)}))
        s.flush()
        data = select_align_data(s, "dpo", None, None, 0.0, 0)
        kto = select_align_data(s, "kto", None, None, 0.0, 0)
    assert len(data.fresh) == 3 and data.counts["left_out_held_out_questions"] == 1
    assert all(r["chosen"][-1]["content"] != "the right answer" for r in data.fresh)
    assert kto.counts["left_out_held_out_questions"] == 2  # the pair's two unpaired rows
    assert all(r["completion"][-1]["content"] not in ("the right answer", "a wrong one") for r in kto.fresh)


def test_errors_without_champion_data_or_method(project, aligned_project):
    p = project(ALIGN, pairs=False)
    with open_store(p.store_url)() as s:
        with pytest.raises(StateError, match="champion"):
            train_align(p, s, None, SilentReporter(), method="dpo")
        ensure_base_version(p, s)
        with pytest.raises(StateError, match="no preference pairs"):
            train_align(p, s, None, SilentReporter(), method="dpo")
        with pytest.raises(StateError, match="no preference pairs"):  # rloo's reward model needs pairs too
            train_align(p, s, None, SilentReporter(), method="rloo")
        with pytest.raises(ConfigError, match="not implemented"):
            train_align(p, s, None, SilentReporter(), method="ppo")
        add_pairs(s, 2, with_messages=False)
        with pytest.raises(StateError, match="ingest"):
            train_align(p, s, None, SilentReporter(), method="dpo")


def test_cli_train_align_dpo(project, monkeypatch):
    from typer.testing import CliRunner

    from tuneloop.cli import app

    monkeypatch.setenv("COLUMNS", "200")
    p = project(ALIGN, pairs=False)
    with open_store(p.store_url)() as s:
        ensure_base_version(p, s)  # the base model is champion: a new LoRA, reference = the base model
        add_pairs(s, 4)
        s.commit()
    runner = CliRunner()
    result = runner.invoke(app, ["train", "align", "--method", "dpo", "-p", str(p.root)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "candidate v1 (dpo)" in result.output
    with open_store(p.store_url)() as s:
        v = s.scalar(select(ModelVersion).where(ModelVersion.name == "v1"))
        assert (v.method, v.status) == ("dpo", "candidate") and Path(v.adapter_path).is_dir()
    # nothing new to train on: one red line, no traceback
    result = runner.invoke(app, ["train", "align", "--method", "dpo", "-p", str(p.root)])
    assert result.exit_code != 0 and result.output.startswith("error:") and "no new dpo" in result.output
    result = runner.invoke(app, ["train", "align", "--method", "ppo", "-p", str(p.root)])
    assert result.exit_code != 0 and "not implemented" in result.output


def test_kto_data_from_thumbs_pairs_and_seed_anchors(project):
    from tuneloop.stages.align_data import select_align_data
    from tuneloop.store import Chunk, Feedback, Interaction

    p = project(ALIGN)
    retriever = ingest_project(p)
    with open_store(p.store_url)() as s:
        ids = list(s.scalars(select(Chunk.id).order_by(Chunk.id)))[:2]
        for answer, thumbs in (("The laws of England.", 1), ("Nobody knows.", -1)):
            it = Interaction(question="Which law governs the agreement?", answer=answer, chunk_ids=ids)
            s.add(it)
            s.flush()
            s.add(Feedback(interaction_id=it.id, thumbs=thumbs))
        add_pairs(s, 2)
        data = select_align_data(s, "kto", retriever, None, 0.5, 0)
        by_origin = {}
        for r in data.fresh:
            by_origin.setdefault(r["origin"], []).append((r["completion"][0]["content"], r["label"]))
        assert sorted(by_origin["thumbs"]) == [("Nobody knows.", False), ("The laws of England.", True)]
        assert sorted(by_origin["human-pair"]) == [(REJECTED, False)] * 2 + [(CHOSEN, True)] * 2
        # replay: half the fresh count, drawn from the seeds (no earlier KTO rows yet), all desirable
        assert len(data.replay) == 3 and all(r["origin"] == "seed" and r["label"] for r in data.replay)
        thumbs_prompt = next(r["prompt"] for r in data.fresh if r["origin"] == "thumbs")
        assert "[1] " in thumbs_prompt[1]["content"]  # the stored chunks, as served


def test_grpo_continues_the_champion_adapter_with_it_as_reference(aligned_project, monkeypatch):
    p, champ_path = aligned_project({"align": {"epochs": 0.1}}, pairs=0)  # 20 prompts, 2 per step: 1 step
    retriever = ingest_project(p)
    trainers = capture_trainers(monkeypatch)
    # Random answers rarely share a token with the reference (F1 0 for the whole group: no
    # advantage, no update in one step); answer length always varies within a group.
    monkeypatch.setattr(align_stage, "f1_reward", lambda completions, **_: [
        float(len(c[-1]["content"])) for c in completions])
    with open_store(p.store_url)() as s:
        result = train_align(p, s, retriever, SilentReporter(), method="grpo")
        s.commit()
    trainer = trainers[0]
    assert trainer.state.global_step == 1 and trainer.ref_model is None and trainer.beta == 0.04
    champ = adapter(champ_path)
    ref = {n.replace(".ref.", "."): prm for n, prm in trainer.model.named_parameters() if ".ref." in n}
    assert ref.keys() == champ.keys() and all(torch.equal(ref[k].detach(), champ[k]) for k in champ)
    assert_changed(champ, adapter(result.artifact))


def test_cycle_aligns_the_sft_candidate_when_preference_data_exists(project, monkeypatch):
    """sft -> align(dpo) inside one cycle: the aligned version (parent: the SFT one) is the candidate."""
    from tests.helpers import FakeTeacher, use_teacher
    from tuneloop import loop
    from tuneloop.progress import SilentReporter
    from tuneloop.store import CycleStep, EvalRun

    p = project({"align": {"max_length": 128, "save_steps": 50}})
    use_teacher(monkeypatch, FakeTeacher())
    with open_store(p.store_url)() as s:
        add_pairs(s, n=4)
        s.commit()
    cycle = loop.run_cycle(p, SilentReporter(), trigger="test")
    with open_store(p.store_url)() as s:
        versions = {v.name: v for v in s.scalars(select(ModelVersion))}
        sft, aligned = versions["v1"], versions["v2"]
        assert (sft.method, aligned.method, aligned.parent_id, aligned.cycle_id) == ("sft", "dpo", sft.id, cycle.id)
        step = s.scalar(select(CycleStep).where(CycleStep.cycle_id == cycle.id, CycleStep.name == "align"))
        assert step.status == "done" and step.result["version"] == "v2" and step.result["parent"] == "v1"
        evaluated = {r.model_version_id for r in s.scalars(select(EvalRun))}
        assert aligned.id in evaluated and sft.id not in evaluated  # the gate judged the aligned candidate
        assert aligned.status in ("champion", "rejected")


def test_cycle_skips_align_without_preference_data(project, monkeypatch):
    from tests.helpers import FakeTeacher, use_teacher
    from tuneloop import loop
    from tuneloop.progress import SilentReporter
    from tuneloop.store import CycleStep

    p = project()
    use_teacher(monkeypatch, FakeTeacher())
    cycle = loop.run_cycle(p, SilentReporter(), trigger="test")
    with open_store(p.store_url)() as s:
        step = s.scalar(select(CycleStep).where(CycleStep.cycle_id == cycle.id, CycleStep.name == "align"))
        assert step.status == "done" and "preference" in step.result["skipped"]
        assert {v.method for v in s.scalars(select(ModelVersion))} == {"base", "sft"}


def test_cycle_runs_rlaif_on_the_sft_candidate_and_aligns_on_its_pairs(project, monkeypatch):
    """sft -> rlaif -> align(dpo) in one cycle with no preference data beforehand: the judge's
    consistent verdicts on the SFT candidate's own answers are what DPO trains on."""
    from tests.helpers import FakeTeacher, use_teacher
    from tests.test_rlaif import FakeJudge, FakeStudent
    from tuneloop import loop
    from tuneloop.progress import SilentReporter
    from tuneloop.stages.rlaif import RlaifModels
    from tuneloop.store import CycleStep

    # the prompts carry retrieved passages; every scripted verdict chooses "Yes", which the Yes/No
    # balance would cut to one pair (tested on its own above)
    p = project({"align": {"max_length": 1024, "save_steps": 50, "balance_yes_no": False},
                 "feedback": {"rlaif_prompts": 3, "rlaif_candidates": 3}})
    use_teacher(monkeypatch, FakeTeacher())
    students = []

    def build(project_, session, student=None):
        students.append(student.name)
        return RlaifModels(FakeStudent(), FakeJudge())

    monkeypatch.setattr(loop, "build_rlaif_models", build)
    cycle = loop.run_cycle(p, SilentReporter(), trigger="test")
    with open_store(p.store_url)() as s:
        st = {x.name: x.result for x in s.scalars(select(CycleStep).where(CycleStep.cycle_id == cycle.id))}
        assert students == ["v1"] and st["rlaif"]["student"] == "v1"
        assert st["rlaif"]["prompts"] == 3 and st["rlaif"]["kept_pairs"] == 3 == st["rlaif"]["new_pairs"]
        pairs = s.scalars(select(PreferencePair)).all()
        assert len(pairs) == 3 and all(x.source == "ai" and x.meta["cycle_id"] == cycle.id for x in pairs)
        assert {(x.chosen, x.rejected) for x in pairs} == {("Yes", "No")}  # what the scripted judge prefers
        aligned = s.scalar(select(ModelVersion).where(ModelVersion.name == "v2"))
        assert aligned.method == "dpo" and st["align"]["parent"] == "v1"
        assert aligned.hyperparams["data"]["n_fresh"] == 3
        # no dev set: the aligned version was gated, the SFT one it grew from is an intermediate step
        sft = s.scalar(select(ModelVersion).where(ModelVersion.name == "v1"))
        assert sft.status == "intermediate" and aligned.status in ("champion", "rejected")
        assert sorted(aligned.hyperparams["data"]["pair_ids"]) == sorted(x.id for x in pairs)


def test_prompts_longer_than_max_length_are_a_clear_error(aligned_project):
    p, _ = aligned_project({"align": {"max_length": 32}}, pairs=0)
    with open_store(p.store_url)() as s:
        long_prompt = [{"role": "user", "content": "Read this contract clause carefully. " * 20}]
        s.add(PreferencePair(prompt="q", chosen=CHOSEN, rejected=REJECTED, source="human",
                             meta={"prompt_messages": long_prompt}))
        s.commit()
        with pytest.raises(ConfigError, match="longer than align.max_length"):
            train_align(p, s, None, SilentReporter(), method="dpo")
        assert s.scalar(select(ModelVersion).where(ModelVersion.method == "dpo")) is None
    work = p.artifacts / ".work"
    assert not work.exists() or not any(work.iterdir())  # no empty trainer folder left behind
