"""`tracking.mlflow`: the store mirrored in a real MLflow tracking store (SQLite in a temp folder,
and an `mlflow server` on loopback): the cycle's runs, metrics and files, one registered model
version per tuneloop version, and the aliases after a promotion and a rollback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from pydantic import ValidationError
from sqlalchemy import select
from typer.testing import CliRunner

from tests.helpers import FakeTeacher, RecordingReporter, free_port, use_teacher
from tests.test_cycle import force_promotion
from tuneloop import loop
from tuneloop.cli import app
from tuneloop.config import Settings
from tuneloop.stages import gate as gate_stage
from tuneloop.store import CycleStep, EvalRun, Example, ModelVersion, open_store, text_hash
from tuneloop.tracking import mlflow_mirror

KEYS = {"cycle-1", "cycle-1/eval", "cycle-1/gate", "version-base", "version-v1"}


def runs_by_key(client: MlflowClient, experiment: str) -> dict:
    exp = client.get_experiment_by_name(experiment)
    return {r.data.tags["tuneloop.key"]: r for r in client.search_runs([exp.experiment_id])}


def aliases(client: MlflowClient, model: str) -> dict[str, str]:
    """alias -> tuneloop version name"""
    numbers = client.get_registered_model(model).aliases
    return {a: client.get_model_version(model, n).tags["tuneloop.version"] for a, n in numbers.items()}


def cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_settings_name_a_bad_uri_and_an_unknown_key():
    with pytest.raises(ValidationError, match="is not an MLflow tracking URI"):
        Settings.model_validate({"tracking": {"mlflow": True, "mlflow_uri": "localhost:5000"}})
    with pytest.raises(ValidationError, match="mlflow_url"):
        Settings.model_validate({"tracking": {"mlflow_url": "http://127.0.0.1:5000"}})
    assert Settings().tracking.mlflow is False  # off by default


def test_a_cycle_is_mirrored_and_the_champion_alias_follows_promotion_and_rollback(project, monkeypatch, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = project({"tracking": {"mlflow": True, "mlflow_uri": uri}, "continual": {"anchor": True}})
    use_teacher(monkeypatch, FakeTeacher())
    monkeypatch.setattr(gate_stage, "gate", force_promotion)  # the gate promotes v1
    reporter = RecordingReporter()
    cycle = loop.run_cycle(p, reporter, trigger="test")
    assert not [m for m in reporter.messages if "MLflow" in m]  # no warning
    client = MlflowClient(uri, registry_uri=uri)
    runs = runs_by_key(client, p.settings.project)
    assert set(runs) == KEYS
    parent = runs["cycle-1"]
    assert parent.info.status == "FINISHED" and parent.data.params["trigger"] == "test"
    assert parent.data.tags["tuneloop.outcome"].startswith("promoted v1")
    with open_store(p.store_url)() as s:
        steps = {st.name: st for st in s.scalars(select(CycleStep).where(CycleStep.cycle_id == cycle.id))}
        v1 = s.scalar(select(ModelVersion).where(ModelVersion.name == "v1"))
        evals = {s.get(ModelVersion, r.model_version_id).name: r.metrics for r in s.scalars(select(EvalRun))
                 if "anchor_score" not in r.metrics}  # the held-out runs
        hashes = sorted(s.scalars(select(Example.content_hash).where(Example.id.in_(v1.training_example_ids))))
        v1_hyperparams, v1_folder = v1.hyperparams, Path(v1.adapter_path)
    for name, st in steps.items():  # each step's seconds and data volumes
        assert parent.data.metrics[f"{name}.seconds"] == pytest.approx(
            (st.finished_at - st.started_at).total_seconds(), abs=1e-3)
    assert parent.data.metrics["synth.kept"] == steps["synth"].result["kept"] > 0
    assert parent.data.metrics["ingest.added"] == 6
    assert "report.html" in {a.path for a in client.list_artifacts(parent.info.run_id)}

    trained = runs["version-v1"]
    assert trained.data.tags["mlflow.parentRunId"] == parent.info.run_id and trained.info.run_name == "sft v1"
    assert trained.data.params["training_data_hash"] == text_hash(*hashes)  # as `tuneloop models diff` and export
    assert trained.data.params["hp.learning_rate"] == str(v1_hyperparams["learning_rate"])
    history = [h for h in json.loads((v1_folder / "log_history.json").read_text()) if "loss" in h]
    curve = sorted(client.get_metric_history(trained.info.run_id, "train.loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in curve] == [(h["step"], pytest.approx(h["loss"])) for h in history]
    files = {a.path for a in client.list_artifacts(trained.info.run_id, "model")}
    assert {"model/adapter_model.safetensors", "model/meta.json"} <= files and "model/train.jsonl" not in files
    assert (v1_folder / "train.jsonl").is_file()  # people's questions stay in the store's artifacts
    meta = Path(client.download_artifacts(trained.info.run_id, "model/meta.json", str(tmp_path)))
    assert json.loads(meta.read_text()) == json.loads((v1_folder / "meta.json").read_text())
    stored = p.root / "mlartifacts"  # in the project, never in the folder the command ran from
    assert trained.info.artifact_uri.startswith(stored.as_uri()) and (stored / trained.info.run_id).is_dir()
    assert not (Path.cwd() / "mlruns").exists()

    ev = runs["cycle-1/eval"].data.metrics
    for version, metrics in evals.items():  # every number, confidence intervals included
        ci = f"{version}.{p.settings.eval.primary_metric}_ci_low"
        assert ev[ci] == pytest.approx(metrics[ci.split(".", 1)[1]])
    for version in ("base", "v1"):  # the anchor set's score (general ability kept)
        assert ev[f"{version}.anchor_score"] == pytest.approx(steps["eval"].result[version]["anchor_score"])
    gate = runs["cycle-1/gate"].data
    assert (gate.tags["tuneloop.decision"], gate.tags["tuneloop.reason"], gate.metrics["promoted"]) == (
        "promoted", "forced by test", 1.0)

    model = p.settings.project
    versions = {mv.tags["tuneloop.version"]: mv for mv in client.search_model_versions(f"name='{model}'")}
    assert set(versions) == {"base", "v1"} and versions["v1"].run_id == trained.info.run_id
    assert versions["v1"].tags["tuneloop.status"] == "champion"
    assert aliases(client, model) == {"champion": "v1", "candidate": "v1"}  # no candidate waits: no challenger

    assert "promoted base to champion" in cli("models", "promote", "base", "--project", str(p.root))  # rollback
    assert aliases(client, model) == {"champion": "base", "candidate": "v1"}
    statuses = {mv.tags["tuneloop.version"]: mv.tags["tuneloop.status"]
                for mv in client.search_model_versions(f"name='{model}'")}
    assert statuses == {"base": "champion", "v1": "retired"}

    # a second sync finds everything there: no run, metric point or version twice
    out = cli("tracking", "sync", "--project", str(p.root))
    assert "0 runs created, 0 cycle steps logged, 0 versions registered" in out
    assert len(client.get_metric_history(trained.info.run_id, "train.loss")) == len(history)
    assert set(runs_by_key(client, model)) == KEYS


def start_mlflow_server(port: int, folder: Path) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'server.db'}", "--artifacts-destination", str(folder / "art")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "MLFLOW_HOME": str(folder)})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            if server.poll() is not None:
                raise AssertionError(server.stderr.read().decode()[-3000:]) from None
            time.sleep(0.5)
    server.kill()
    raise AssertionError("mlflow server did not answer in 120 s")


def test_a_server_that_is_down_never_fails_a_cycle_and_the_next_sync_catches_up(project, monkeypatch, tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    p = project({"tracking": {"mlflow": True, "mlflow_uri": uri, "timeout_seconds": 1}})
    use_teacher(monkeypatch, FakeTeacher())
    reporter = RecordingReporter()
    cycle = loop.run_cycle(p, reporter, trigger="test")
    assert cycle.status == "done"
    warnings = [m for m in reporter.messages if "MLflow not updated" in m]
    assert len(warnings) == len(loop.STEPS) + 1  # after each step and at the end
    assert f"tracking.mlflow_uri {uri}: no MLflow server answers" in warnings[0]
    result = CliRunner().invoke(app, ["tracking", "sync", "--project", str(p.root)])  # by hand: an error
    assert result.exit_code != 0 and "no MLflow server answers" in result.output and "Traceback" not in result.output

    server = start_mlflow_server(port, tmp_path / "mlflow-server")
    try:
        out = cli("tracking", "sync", "--project", str(p.root))
        assert f"{len(KEYS)} runs created" in out and "2 versions registered" in out
        client = MlflowClient(uri)
        runs = runs_by_key(client, p.settings.project)
        assert set(runs) == KEYS and runs["cycle-1"].info.status == "FINISHED"
        # the gate rejected v1 (random weights): base stays champion, v1 is the cycle's candidate
        assert aliases(client, p.settings.project) == {"champion": "base", "candidate": "v1"}
        trained = runs["version-v1"]
        with open_store(p.store_url)() as s:
            folder = Path(s.scalar(select(ModelVersion).where(ModelVersion.name == "v1")).adapter_path)
        got = client.download_artifacts(trained.info.run_id, "model/meta.json", str(tmp_path))  # through the server
        assert json.loads(Path(got).read_text()) == json.loads((folder / "meta.json").read_text())
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_without_mlflow_installed_the_setting_names_the_extra(project):
    p = project({"tracking": {"mlflow": True}})
    code = ("import sys; sys.modules['mlflow'] = None  # as if the extra were not installed\n"
            "from pathlib import Path; from tuneloop.config import load_project\n"
            "from tuneloop.errors import ConfigError; from tuneloop.tracking import check_tracking\n"
            f"try: check_tracking(load_project(Path({str(p.root)!r})))\n"
            "except ConfigError as e: print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "tracking.mlflow needs MLflow: pip install 'tuneloop[mlflow]'", out.stderr[-2000:]
    assert mlflow_mirror.tracking_uri(p) == f"sqlite:///{p.root / 'mlflow.db'}"  # the default store
