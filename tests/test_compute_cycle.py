"""`tuneloop cycle` with `compute.engine: ray` on a local Ray cluster: every step runs, the model
calls go to actors and the training to Ray Train, and the candidate is the one an in-process cycle
with the same seeds gives (same synthetic rows, same adapter within float noise, same eval)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy import select

from tests.helpers import FakeTeacher, free_port, use_teacher
from tuneloop import loop
from tuneloop.config import ComputeSettings
from tuneloop.errors import ConfigError
from tuneloop.progress import SilentReporter
from tuneloop.stages.methods import METHODS
from tuneloop.store import CycleStep, EvalRun, Example, ModelVersion, open_store

ray = pytest.importorskip("ray")
from tuneloop.models.pooled import PooledChatModel  # noqa: E402 - after the skip when Ray is missing

# one worker: Ray Train's single worker trains exactly as this process does (two workers halve the
# steps: tests/test_compute_train.py)
ONE = {"engine": "ray", "workers": 1, "cpus_per_worker": 1, "min_items": 1}


def run(project, monkeypatch, compute: dict | None):
    teacher = FakeTeacher() if compute is None else \
        PooledChatModel(FakeTeacher, (), "fake-teacher", 8, ComputeSettings(**compute))
    use_teacher(monkeypatch, teacher)
    p = project(overrides={"compute": compute} if compute else {})
    cycle = loop.run_cycle(p, SilentReporter(), trigger="test")
    with open_store(p.store_url)() as s:
        steps = {st.name: st.status for st in s.scalars(select(CycleStep).where(CycleStep.cycle_id == cycle.id))}
        synthetic = [(e.question, e.answer) for e in s.scalars(select(Example).where(Example.kind == "synthetic")
                                                              .order_by(Example.id))]
        candidate = s.scalar(select(ModelVersion).where(ModelVersion.name == "v1"))
        metrics = s.scalar(select(EvalRun).where(EvalRun.model_version_id == candidate.id)).metrics
        weights = load_file(f"{candidate.adapter_path}/adapter_model.safetensors")
    return cycle.status, steps, synthetic, metrics, weights, getattr(teacher, "jobs", 0)


@pytest.mark.cluster  # two whole cycles (over a minute): `make test-cluster`
def test_a_cycle_on_ray_gives_the_candidate_of_an_in_process_cycle(project, monkeypatch, ray_cluster):
    status, steps, synthetic, metrics, weights, _ = run(project, monkeypatch, None)
    r_status, r_steps, r_synthetic, r_metrics, r_weights, jobs = run(project, monkeypatch, ONE)
    assert status == r_status == "done" and r_steps == steps and set(steps.values()) <= {"done", "skipped"}
    assert jobs > 0 and r_synthetic == synthetic and synthetic  # the teacher answered on the actors
    assert set(r_weights) == set(weights)
    for name, tensor in weights.items():
        torch.testing.assert_close(r_weights[name], tensor, rtol=1e-4, atol=1e-5)  # float noise: one in 256 moved 7e-6
    assert r_metrics.keys() == metrics.keys()
    for key, value in metrics.items():
        assert r_metrics[key] == pytest.approx(value, abs=1e-6, nan_ok=True), key


def test_a_cycle_with_an_unreachable_cluster_fails_before_any_step(project):
    port = free_port()
    p = project(overrides={"compute": {"engine": "ray", "address": f"127.0.0.1:{port}"}})
    with pytest.raises(ConfigError, match=rf"compute.address '127.0.0.1:{port}': no Ray cluster answers there"):
        loop.run_cycle(p, SilentReporter())
    with open_store(p.store_url)() as s:
        assert s.scalar(select(CycleStep)) is None  # refused before anything was written


@pytest.mark.cluster  # a killed cycle and its rerun on Ray (about a minute): `make test-cluster`
def test_a_driver_killed_during_ray_train_resumes_the_cycle_from_the_checkpoint(project, tmp_path, ray_cluster):
    import json
    import signal
    from pathlib import Path

    from tests.helpers import KILLABLE_PROJECT, RecordingReporter, deep_merge, kill_9_during_training
    from tests.test_cycle import KILL_SCRIPT, REPO
    from tuneloop.store import Cycle

    p = project(deep_merge(KILLABLE_PROJECT, {"compute": {**ONE, "min_items": 32}}))
    assert kill_9_during_training(KILL_SCRIPT.format(repo=str(REPO), root=str(p.root)), p, tmp_path,
                                  timeout=300) == -signal.SIGKILL  # the driver; its local Ray goes with it
    with open_store(p.store_url)() as s:
        (cycle,) = s.scalars(select(Cycle)).all()
        assert cycle.status == "running"
    reporter = RecordingReporter()
    resumed = loop.run_cycle(p, reporter)
    assert resumed.id == cycle.id and resumed.status == "done"
    (message,) = [m for m in reporter.messages if m.startswith("resuming training from")]
    step = int(message.rsplit("-", 1)[-1])
    assert step >= 3
    (bar,) = [advances for label, _, advances in reporter.tasks if label == METHODS["sft"].label]
    assert bar[0] == step and sum(bar) == 40 and len(bar) > 2  # from the checkpoint, then the workers' steps
    with open_store(p.store_url)() as s:
        candidate = s.scalar(select(ModelVersion).where(ModelVersion.method == "sft"))
    history = [h for h in json.loads((Path(candidate.adapter_path) / "log_history.json").read_text()) if "loss" in h]
    assert [h["step"] for h in history] == list(range(1, 41))  # 40 steps, each logged once
