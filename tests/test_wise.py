"""WiSE-FT: exact LoRA-delta averaging of champion and candidate, alpha chosen on the dev split."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy import select
from typer.testing import CliRunner

from tests.helpers import deep_merge, ingest_project, tiny_settings, write_settings
from tuneloop.errors import StateError
from tuneloop.progress import SilentReporter
from tuneloop.stages import wise
from tuneloop.stages.seeds import import_pairs
from tuneloop.store import Example, ModelVersion, open_store
from tuneloop.versions import ensure_base_version

DEV = [
    {"question": "Which country's law governs the master services agreement?", "answer": "Germany",
     "source": "01-master-services-agreement.md"},
    {"question": "How long is the notice period in the office lease?", "answer": "ninety days",
     "source": "06-office-lease.md"},
    {"question": "Is the distributor exclusive?", "answer": "Yes", "source": "03-distribution-agreement.md"},
]


def make_adapter(model_dir: Path, out: Path, r: int, lora_alpha: int, seed: int) -> Path:
    """A LoRA adapter with random (non-zero) A and B on q_proj/v_proj of the tiny model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                     init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.5)
    peft_model.save_pretrained(str(out))
    return out


def deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """Base-model weight name -> scaling * B @ A, from the saved adapter files."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scaling = cfg["lora_alpha"] / cfg["r"]
    t = load_file(str(adapter / "adapter_model.safetensors"))
    out = {}
    for key, a in t.items():
        if ".lora_A." in key:
            b = t[key.replace(".lora_A.", ".lora_B.")]
            name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            out[name] = scaling * (b @ a)
    return out


def merged_weights(model_dir: Path, adapter: Path | None) -> dict[str, torch.Tensor]:
    from tuneloop.models.local import LocalChatModel

    return {k: v.detach().clone() for k, v in LocalChatModel(model_dir, adapter).model.state_dict().items()}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("wise-adapters")
    champ = make_adapter(tiny_model_dir, root / "champ", r=4, lora_alpha=8, seed=1)
    cand = make_adapter(tiny_model_dir, root / "cand", r=4, lora_alpha=16, seed=2)
    return root, champ, cand


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_average_is_exact_in_delta_space(adapters, tiny_model_dir):
    root, champ, cand = adapters
    w0 = merged_weights(tiny_model_dir, None)
    d_ch, d_ca = deltas(champ), deltas(cand)
    assert d_ch.keys() == d_ca.keys() and len(d_ch) == 4  # q_proj, v_proj in 2 layers
    for alpha in (0.0, 0.5, 1.0):
        out = wise.average_adapters(tiny_model_dir, champ, cand, alpha, root / f"avg-{alpha}")
        merged = merged_weights(tiny_model_dir, out)
        assert merged.keys() == w0.keys()
        for name, w in w0.items():
            expected = w + (1 - alpha) * d_ch[name] + alpha * d_ca[name] if name in d_ch else w
            assert _close(merged[name], expected), (alpha, name)
        if alpha in (0.0, 1.0):  # the end points are the champion and the candidate themselves
            ref = merged_weights(tiny_model_dir, champ if alpha == 0.0 else cand)
            assert all(_close(merged[k], ref[k]) for k in ref)
    assert json.loads((root / "avg-0.5" / "adapter_config.json").read_text())["r"] == 8  # ranks concatenated


def test_max_rank_truncates_the_average_by_svd(adapters, tiny_model_dir):
    """Ranks 4 + 4 = 8 > max_rank: the saved adapter has rank max_rank; at max_rank 8 (the delta's
    true rank) it is still exact; at 2 it is the best rank-2 approximation of the same delta."""
    root, champ, cand = adapters
    w0 = merged_weights(tiny_model_dir, None)
    d_ch, d_ca = deltas(champ), deltas(cand)
    exact = {k: 0.5 * d_ch[k] + 0.5 * d_ca[k] for k in d_ch}
    for max_rank in (8, 2):
        out = wise.average_adapters(tiny_model_dir, champ, cand, 0.5, root / f"rank-{max_rank}", max_rank=max_rank)
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["r"] == max_rank
        merged = merged_weights(tiny_model_dir, out)
        for name, delta in exact.items():
            got = merged[name] - w0[name]
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            best = u[:, :max_rank] @ torch.diag(s[:max_rank]) @ vh[:max_rank]
            assert torch.allclose(got, best, atol=1e-4), (max_rank, name)
            if max_rank == 2:
                assert not torch.allclose(got, delta, atol=1e-3)  # truncation really dropped something


def test_base_champion_scales_the_candidate_delta(adapters, tiny_model_dir):
    root, _, cand = adapters
    w0 = merged_weights(tiny_model_dir, None)
    d_ca = deltas(cand)
    for alpha in (0.0, 0.25, 1.0):
        merged = merged_weights(tiny_model_dir, wise.average_adapters(tiny_model_dir, None, cand, alpha,
                                                                       root / f"base-{alpha}"))
        for name, w in w0.items():
            expected = w + alpha * d_ca[name] if name in d_ca else w
            assert _close(merged[name], expected), (alpha, name)


def _wise_project(tmp_path, tiny_model_dir, alphas, dev=True):
    import shutil

    from tests.helpers import CONTRACTS, SEEDS
    from tuneloop.config import load_project

    root = tmp_path / "proj"
    root.mkdir()
    shutil.copytree(CONTRACTS, root / "documents")
    write_settings(root, deep_merge(tiny_settings(tiny_model_dir), {"continual": {"wise_ft": True,
                                                                                   "wise_alphas": alphas}}))
    project = load_project(root)
    dev_file = tmp_path / "dev.jsonl"
    dev_file.write_text("\n".join(json.dumps(r) for r in DEV) + "\n")
    with open_store(project.store_url)() as s:
        import_pairs(s, SEEDS, "train")
        if dev:
            import_pairs(s, dev_file, "dev")
        s.commit()
    return project


def _setup_versions(project, s, champ_adapter, cand_adapter):
    base = ensure_base_version(project, s)
    champ = base
    if champ_adapter is not None:
        base.status = "retired"
        champ = ModelVersion(name="v1", parent_id=base.id, base_model=base.base_model, adapter_path=str(champ_adapter),
                             method="sft", status="champion")
        s.add(champ)
        s.flush()
    cand = ModelVersion(name="v2" if champ_adapter else "v1", parent_id=champ.id, base_model=base.base_model,
                        adapter_path=str(cand_adapter),
                        method="sft", status="candidate", training_example_ids=[1, 2])
    s.add(cand)
    s.flush()
    return champ, cand


def test_choose_alpha_picks_the_best_dev_score_and_registers_a_wise_version(tmp_path, tiny_model_dir, adapters,
                                                                             monkeypatch):
    _, champ_adapter, cand_adapter = adapters
    project = _wise_project(tmp_path, tiny_model_dir, [1.0, 0.25, 0.5, 0.75])
    scripted = {0.25: 0.1, 0.5: 0.4, 0.75: 0.4, 1.0: float("nan")}  # tie 0.5 / 0.75 -> 0.5
    seen = []

    def fake_score(project_, adapter, examples, retriever, reporter):
        alpha = float(adapter.name.removeprefix("alpha-"))
        seen.append((alpha, [e.split for e in examples]))
        assert (adapter / "adapter_model.safetensors").is_file()
        return scripted[alpha]

    monkeypatch.setattr(wise, "score_adapter", fake_score)
    with open_store(project.store_url)() as s:
        champ, cand = _setup_versions(project, s, champ_adapter, cand_adapter)
        r = wise.choose_alpha(project, s, champ, cand, None, SilentReporter())
        s.commit()
        assert r.alpha == 0.5
        assert [a for a, _ in seen] == [0.25, 0.5, 0.75, 1.0]
        assert all(splits == ["dev"] * len(DEV) for _, splits in seen)
        assert r.scores[0.5] == 0.4 and math.isnan(r.scores[1.0])
        v = s.scalar(select(ModelVersion).where(ModelVersion.method == "wise"))
        assert v.id == r.version.id and v.status == "candidate" and v.parent_id == cand.id and v.cycle_id is None
        assert v.hyperparams["alpha"] == 0.5 and v.hyperparams["champion"] == "v1"
        assert v.hyperparams["candidate"] == "v2" and v.hyperparams["scores"]["0.75"] == 0.4
        assert v.adapter_path == str(r.artifact) and r.artifact.name == "wise-v2"
        # the registered adapter is the alpha-0.5 average
        expected = wise.average_adapters(tiny_model_dir, champ_adapter, cand_adapter, 0.5, tmp_path / "check")
        got, want = load_file(str(r.artifact / "adapter_model.safetensors")), load_file(
            str(expected / "adapter_model.safetensors"))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
        assert not (project.artifacts / ".work" / "wise-v2").exists()
        # resumed: the artifact is reused, nothing rescored, no second version
        seen.clear()
        again = wise.choose_alpha(project, s, champ, cand, None, SilentReporter())
        assert again.version.id == v.id and again.alpha == 0.5 and seen == []
        assert len(s.scalars(select(ModelVersion).where(ModelVersion.method == "wise")).all()) == 1


def test_choose_alpha_scores_with_the_real_answerer(tmp_path, tiny_model_dir, adapters):
    _, _, cand_adapter = adapters
    project = _wise_project(tmp_path, tiny_model_dir, [0.5, 1.0])
    project.settings.continual.anchor = True  # the averages answer the real anchor set too
    retriever = ingest_project(project)
    with open_store(project.store_url)() as s:
        champ, cand = _setup_versions(project, s, None, cand_adapter)  # champion: the base model
        r = wise.choose_alpha(project, s, champ, cand, retriever, SilentReporter())
        s.commit()
        assert set(r.scores) == {0.5, 1.0} and set(r.anchor) == {0.5, 1.0}
        assert all(0.0 <= v <= 1.0 for v in r.anchor.values())
        from tuneloop.store import EvalRun  # the champion's anchor run is stored for the gate; the averages' are not
        assert [run.model_version_id for run in s.scalars(select(EvalRun))] == [champ.id]
        assert all(0.0 <= v <= 1.0 for v in r.scores.values() if not math.isnan(v))
        assert r.alpha in (0.5, 1.0) and r.version.method == "wise" and r.version.hyperparams["champion"] == "base"
        assert r.version.name == "v2" and r.version.hyperparams["candidate"] == "v1"
        assert (r.artifact / "adapter_config.json").is_file()


def test_choose_alpha_without_dev_split_is_a_state_error(tmp_path, tiny_model_dir, adapters):
    _, _, cand_adapter = adapters
    project = _wise_project(tmp_path, tiny_model_dir, [0.5], dev=False)
    with open_store(project.store_url)() as s:
        champ, cand = _setup_versions(project, s, None, cand_adapter)
        with pytest.raises(StateError, match=r"--split dev") as err:
            wise.choose_alpha(project, s, champ, cand, None, SilentReporter())
        assert "\n" not in str(err.value)
        assert s.scalars(select(ModelVersion).where(ModelVersion.method == "wise")).all() == []


def test_seeds_import_split_dev(tmp_path, monkeypatch):
    from tuneloop.cli import app

    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()
    root = tmp_path / "proj"
    assert runner.invoke(app, ["init", str(root)]).exit_code == 0
    dev_file = tmp_path / "dev.jsonl"
    dev_file.write_text("\n".join(json.dumps(r) for r in DEV) + "\n")
    res = runner.invoke(app, ["seeds", "import", str(dev_file), "--split", "dev", "-p", str(root)])
    assert res.exit_code == 0, res.output
    assert "imported 3 pairs into split 'dev'" in res.output
    res = runner.invoke(app, ["seeds", "import", str(dev_file), "--split", "bogus", "-p", str(root)])
    assert res.exit_code != 0 and "'train', 'eval' or 'dev'" in res.output
    from tuneloop.config import load_project

    with open_store(load_project(root).store_url)() as s:
        assert [e.split for e in s.scalars(select(Example))] == ["dev"] * 3


def test_cycle_runs_wise_and_gates_the_averaged_version(project, monkeypatch):
    """With continual.wise_ft the cycle averages champion and SFT candidate; the gate judges the average."""
    from tests.helpers import FakeTeacher, use_teacher
    from tuneloop import loop
    from tuneloop.store import CycleStep, EvalRun

    p = project({"continual": {"wise_ft": True, "wise_alphas": [0.5, 1.0]}})
    with open_store(p.store_url)() as s:
        for i in range(3):
            s.add(Example(kind="seed", split="dev", question=f"Dev question {i}?", answer="Yes",
                          document=None, content_hash=f"dev-{i}"))
        s.commit()
    use_teacher(monkeypatch, FakeTeacher())
    monkeypatch.setattr(wise, "score_adapter", lambda proj, adapter, *a: {"alpha-0.5": 0.7}.get(adapter.name, 0.2))
    cycle = loop.run_cycle(p, SilentReporter(), trigger="test")
    with open_store(p.store_url)() as s:
        versions = {v.name: v for v in s.scalars(select(ModelVersion))}
        sft, avg = versions["v1"], versions["v2"]
        assert (sft.method, sft.status, avg.method, avg.parent_id) == ("sft", "superseded", "wise", sft.id)
        assert avg.hyperparams["alpha"] == 0.5 and avg.status in ("champion", "rejected")
        step = s.scalar(select(CycleStep).where(CycleStep.cycle_id == cycle.id, CycleStep.name == "wise"))
        assert step.result["version"] == "v2" and step.result["alpha"] == 0.5
        assert avg.id in {r.model_version_id for r in s.scalars(select(EvalRun))}


class _Run:
    def __init__(self, score):
        self.metrics = {"anchor_score": score}


def _screened(tmp_path, tiny_model_dir, adapters, monkeypatch, dev, anchor, champion_anchor=0.667):
    """choose_alpha with the anchor screen on, dev and anchor scores scripted per alpha."""
    _, champ_adapter, cand_adapter = adapters
    project = _wise_project(tmp_path, tiny_model_dir, sorted(dev))
    project.settings.continual.anchor = True
    screened = []
    monkeypatch.setattr(wise, "score_adapter",
                        lambda proj, adapter, *a: dev[float(adapter.name.removeprefix("alpha-"))])

    def fake_anchor(proj, adapter, reporter, label):
        alpha = float(adapter.name.removeprefix("alpha-"))
        assert (adapter / "adapter_model.safetensors").is_file()  # the average itself answers
        screened.append(alpha)
        return anchor[alpha]

    monkeypatch.setattr(wise, "screen_anchor", fake_anchor)
    monkeypatch.setattr(wise, "evaluate_anchor", lambda proj, s, version, *a: _Run(champion_anchor))
    with open_store(project.store_url)() as s:
        champ, cand = _setup_versions(project, s, champ_adapter, cand_adapter)
        r = wise.choose_alpha(project, s, champ, cand, None, SilentReporter())
        s.commit()
        return r, screened


def test_choose_alpha_passes_over_alphas_that_lose_the_anchor(tmp_path, tiny_model_dir, adapters, monkeypatch):
    dev = {0.25: 0.1, 0.5: 0.4, 0.75: 0.6, 1.0: 0.7}  # the dev set alone would take 1.0
    anchor = {0.25: 0.7, 0.5: 0.633, 0.75: 0.6, 1.0: 0.55}  # champion 0.667, tolerance 0.05: 0.25 and 0.5 keep it
    r, screened = _screened(tmp_path, tiny_model_dir, adapters, monkeypatch, dev, anchor)
    assert screened == [0.25, 0.5, 0.75, 1.0]
    assert r.alpha == 0.5 and r.anchor == anchor
    assert r.version.hyperparams["anchor_scores"]["0.75"] == 0.6 and r.version.hyperparams["champion_anchor"] == 0.667


def test_choose_alpha_keeps_the_best_dev_score_when_no_alpha_keeps_the_anchor(tmp_path, tiny_model_dir, adapters,
                                                                              monkeypatch):
    dev = {0.5: 0.4, 1.0: 0.7}
    r, _ = _screened(tmp_path, tiny_model_dir, adapters, monkeypatch, dev, {0.5: 0.5, 1.0: 0.4})
    assert r.alpha == 1.0  # the gate refuses it on the anchor; the choice is still the best on dev


def test_choose_alpha_without_the_anchor_guard_ranks_on_dev_only(tmp_path, tiny_model_dir, adapters, monkeypatch):
    _, champ_adapter, cand_adapter = adapters
    project = _wise_project(tmp_path, tiny_model_dir, [0.5, 1.0])
    project.settings.continual.anchor = True
    project.settings.continual.wise_anchor_guard = False
    monkeypatch.setattr(wise, "score_adapter", lambda proj, adapter, *a: {"alpha-0.5": 0.2}.get(adapter.name, 0.9))
    monkeypatch.setattr(wise, "screen_anchor", lambda *a: pytest.fail("the anchor screen is off"))
    with open_store(project.store_url)() as s:
        champ, cand = _setup_versions(project, s, champ_adapter, cand_adapter)
        r = wise.choose_alpha(project, s, champ, cand, None, SilentReporter())
    assert r.alpha == 1.0 and r.anchor == {} and "anchor_scores" not in r.version.hyperparams


def test_cycle_skips_wise_until_there_is_a_dev_set(project, monkeypatch):
    from tests.helpers import FakeTeacher, use_teacher
    from tuneloop import loop
    from tuneloop.store import CycleStep

    p = project({"continual": {"wise_ft": True, "wise_alphas": [0.5, 1.0]}})
    use_teacher(monkeypatch, FakeTeacher())
    monkeypatch.setattr(wise, "score_adapter", lambda *a: pytest.fail("no dev set: nothing to score"))
    cycle = loop.run_cycle(p, SilentReporter(), trigger="test")
    with open_store(p.store_url)() as s:
        step = s.scalar(select(CycleStep).where(CycleStep.cycle_id == cycle.id, CycleStep.name == "wise"))
        assert "no dev set" in step.result["skipped"] and "feedback.dev_fraction" in step.result["skipped"]
        assert s.scalars(select(ModelVersion).where(ModelVersion.method == "wise")).all() == []
        assert {v.method for v in s.scalars(select(ModelVersion))} >= {"sft"}
