"""The store mirrored in MLflow (`tracking.mlflow: true`; the `tuneloop[mlflow]` extra).

tuneloop's store stays the system of record: `sync` brings an MLflow tracking store up to it,
whatever MLflow missed before (a server that was down), and changes nothing in the store.

* The experiment `tracking.experiment` (default: the project's name) holds a run per cycle
  ("cycle 3": its trigger and outcome, each finished step's numbers and seconds, the HTML report
  when the cycle ends) with child runs: one per model version the cycle trained ("sft v4": the
  hyperparameters, the training data's content hash, the loss curve and every other number the
  trainer logged, the adapter folder with its meta.json), one for the eval step (each version's
  metrics with their confidence intervals, the anchor score) and one for the gate (its decision
  and reason). Versions made outside a cycle (the base model, `tuneloop train`) get a run of their own.
* The registered model `tracking.registered_model` (default: the project's name) has one model
  version per tuneloop version (tag `tuneloop.version`, source: its run's `model` artifacts, tag
  `tuneloop.status` kept in step) and the aliases `champion` (the champion), `challenger` (the
  newest version waiting as a candidate: what `tuneloop serve --ab` serves beside the champion)
  and `candidate` (the latest cycle's candidate, whatever the gate said). MLflow stages are
  deprecated; aliases replace them.

Idempotent: each run carries the tag `tuneloop.key`; a run is filled once and then tagged
`tuneloop.complete` (a run found without it was cut short: it is deleted and made again); a
cycle's run gains the steps finished since the last sync. Only the `MlflowClient` API is used
(no fluent API, no process-wide active run).
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from tuneloop.config import Project
from tuneloop.errors import ConfigError, TuneloopError
from tuneloop.lineage import training_data
from tuneloop.report import write_report
from tuneloop.store import Cycle, CycleStep, ModelVersion, Session
from tuneloop.versions import NOT_CANDIDATES, Status, adapter_folder, champion, cycle_candidate

try:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
except ImportError as exc:  # the `mlflow` extra is not installed
    raise ConfigError("tracking.mlflow needs MLflow: pip install 'tuneloop[mlflow]'") from exc

KEY, COMPLETE = "tuneloop.key", "tuneloop.complete"
VERSION_TAG, STATUS_TAG = "tuneloop.version", "tuneloop.status"
PARENT = "mlflow.parentRunId"  # MLflow's own tag of a nested run
MODEL_PATH = "model"  # a version's run artifacts registered as its model version
TRAINING_STEPS = ("dapt", "sft", "align", "wise")
MAX_PARAM = 500  # characters of a parameter value (MLflow takes 6000; a longer value is a list of ids)
BATCH = 1000  # MLflow's limit of metrics per log_batch
NOT_MIRRORED = ("train.jsonl", "checkpoint-*")  # training rows (users' questions) and leftovers stay here


class TrackingUnavailable(TuneloopError):
    """The tracking store could not be reached or refused a write."""


@dataclass
class Synced:
    """What one `sync` did."""

    runs_created: int = 0
    steps_logged: int = 0
    versions_registered: int = 0
    aliases: dict[str, str | None] = field(default_factory=dict)  # alias -> tuneloop version name


def tracking_uri(project: Project) -> str:
    return project.settings.tracking.mlflow_uri or f"sqlite:///{project.root / 'mlflow.db'}"


def artifact_location(project: Project) -> str | None:
    """Where a new experiment keeps its files: a tracking server decides for itself; a database URI
    would put them in ./mlruns of whatever folder the command ran in, so <project>/mlartifacts."""
    if tracking_uri(project).startswith(("http://", "https://", "databricks")):
        return None
    return (project.root / "mlartifacts").as_uri()


def sync(project: Project, session: Session) -> Synced:
    """Mirror the store's cycles, versions and statuses in MLflow; `TrackingUnavailable` when the
    tracking store cannot be reached."""
    settings = project.settings.tracking
    uri = tracking_uri(project)
    _check_reachable(uri, settings.timeout_seconds)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial MLflow database tables"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        return _Mirror(project, session, client).run()
    except MlflowException as exc:
        raise TrackingUnavailable(f"MLflow at {uri}: {exc.message.splitlines()[0] if exc.message else exc}") from None


def _check_reachable(uri: str, timeout: float) -> None:
    """A tracking server that does not answer its health check fails in `timeout` seconds (MLflow's
    client would retry for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            response.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingUnavailable(f"tracking.mlflow_uri {uri}: no MLflow server answers ({reason})") from None


class _Mirror:
    def __init__(self, project: Project, session: Session, client: MlflowClient):
        self.project, self.session, self.client = project, session, client
        self.done = Synced()
        name = project.settings.tracking.experiment or project.settings.project
        experiment = client.get_experiment_by_name(name)
        self.experiment_id = experiment.experiment_id if experiment else \
            client.create_experiment(name, artifact_location=artifact_location(project))
        self.model_name = project.settings.tracking.registered_model or project.settings.project
        self.runs = self._runs_by_key()

    def run(self) -> Synced:
        cycle_runs = {c.id: self._cycle(c) for c in self.session.scalars(select(Cycle).order_by(Cycle.id))}
        versions = list(self.session.scalars(select(ModelVersion).order_by(ModelVersion.id)))
        version_runs = {v.id: self._version(v, cycle_runs.get(v.cycle_id)) for v in versions}
        self._registry(versions, version_runs)
        return self.done

    # ------------------------------------------------------------------ runs

    def _runs_by_key(self) -> dict[str, Any]:
        found, token = {}, None
        while True:
            page = self.client.search_runs([self.experiment_id], max_results=1000, page_token=token)
            for run in page:
                key = run.data.tags.get(KEY)
                if key is None:
                    continue
                if COMPLETE not in run.data.tags and not _grows(key):  # cut short: make it again
                    self.client.delete_run(run.info.run_id)
                    continue
                found[key] = run
            token = page.token
            if not token:
                return found

    def _new_run(self, key: str, name: str, parent: str | None, started: datetime | None, tags: dict[str, str]):
        tags = {KEY: key, **tags, **({PARENT: parent} if parent else {})}
        run = self.client.create_run(self.experiment_id, start_time=_ms(started), tags=tags, run_name=name)
        self.done.runs_created += 1
        return run

    def _finish(self, run_id: str, ended: datetime | None, status: str = "FINISHED") -> None:
        self.client.set_tag(run_id, COMPLETE, "1")
        self.client.set_terminated(run_id, status, end_time=_ms(ended))

    def _cycle(self, cycle: Cycle) -> str:
        """The cycle's run, with the numbers of each step finished since the last sync."""
        key = f"cycle-{cycle.id}"
        run = self.runs.get(key)
        if run is None:
            run = self._new_run(key, f"cycle {cycle.id}", None, cycle.started_at, {"tuneloop.cycle_id": str(cycle.id)})
            self.client.log_batch(run.info.run_id, params=[Param("trigger", _short(cycle.trigger))])
        run_id = run.info.run_id
        if COMPLETE in run.data.tags:
            return run_id
        logged = set(run.data.metrics)
        steps = self.session.scalars(select(CycleStep).where(CycleStep.cycle_id == cycle.id, CycleStep.status == "done")
                                     .order_by(CycleStep.id))
        for step in steps:
            if f"{step.name}.seconds" in logged:
                continue
            if step.name in ("eval", "gate"):
                self._step_run(cycle, step, run_id)
            stamp = _ms(step.finished_at)
            numbers = {f"{step.name}.{k}": v for k, v in _numbers(step.result).items()}
            numbers[f"{step.name}.seconds"] = (step.finished_at - step.started_at).total_seconds()  # logged last
            self._log_metrics(run_id, [Metric(k, v, stamp, 0) for k, v in numbers.items()])
            self.done.steps_logged += 1
        if cycle.status in ("done", "failed"):
            if cycle.outcome:
                self.client.set_tag(run_id, "tuneloop.outcome", _short(cycle.outcome, 5000))
            self._log_report(run_id)
            self._finish(run_id, cycle.finished_at, "FINISHED" if cycle.status == "done" else "FAILED")
        return run_id

    def _step_run(self, cycle: Cycle, step: CycleStep, parent: str) -> None:
        """The eval step's (each version's metrics and intervals) or the gate's (decision, reason) child run."""
        key = f"cycle-{cycle.id}/{step.name}"
        if key in self.runs:
            return
        run_id = self._new_run(key, f"{step.name} (cycle {cycle.id})", parent, step.started_at, {}).info.run_id
        texts = {k: v for k, v in step.result.items() if isinstance(v, str)}
        tags = [RunTag(f"tuneloop.{k}", _short(v, 5000)) for k, v in texts.items()]
        if step.name == "gate":
            tags.append(RunTag("tuneloop.decision", "promoted" if step.result.get("promoted") else "rejected"))
        stamp = _ms(step.finished_at)
        self._log_metrics(run_id, [Metric(k, v, stamp, 0) for k, v in _numbers(step.result).items()])
        self.client.log_batch(run_id, tags=tags)
        self._finish(run_id, step.finished_at)

    def _version(self, version: ModelVersion, cycle_run: str | None) -> str:
        """The version's run (a child of its cycle's): what trained it, its loss curve, its files."""
        key = f"version-{version.name}"
        if key in self.runs:
            return self.runs[key].info.run_id
        name = f"{version.method} {version.name}"
        run_id = self._new_run(key, name, cycle_run, version.created_at, {VERSION_TAG: version.name}).info.run_id
        params = {"method": version.method, "base_model": version.base_model,
                  "parent": self._name_of(version.parent_id),
                  "training_data_hash": training_data(self.session, version).data_hash or "none",
                  **{f"hp.{k}": v for k, v in _flat(version.hyperparams).items()}}
        self.client.log_batch(run_id, params=[Param(_key(k), _short(v)) for k, v in params.items()])
        stamp = _ms(version.created_at)
        metrics = [Metric(k, v, stamp, 0) for k, v in _numbers(version.metrics).items()]
        folder = adapter_folder(version)
        if folder is not None and (folder / "log_history.json").is_file():
            metrics += _curves(json.loads((folder / "log_history.json").read_text(encoding="utf-8")), stamp)
        self._log_metrics(run_id, metrics)
        with tempfile.TemporaryDirectory() as tmp:
            files = Path(tmp) / MODEL_PATH
            if folder is not None and folder.is_dir():  # the training rows stay in the store (people's questions)
                shutil.copytree(folder, files, ignore=shutil.ignore_patterns(*NOT_MIRRORED))
            else:  # the base model: a note of what it is (MLflow needs files to register)
                files.mkdir()
                note = {"version": version.name, "base_model": version.base_model, "adapter": None}
                (files / "version.json").write_text(json.dumps(note, indent=2), encoding="utf-8")
            self.client.log_artifacts(run_id, str(files), MODEL_PATH)
        self._finish(run_id, version.created_at)
        return run_id

    def _log_report(self, run_id: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            write_report(self.project, self.session, Path(tmp) / "report.html")
            self.client.log_artifact(run_id, str(Path(tmp) / "report.html"))

    def _log_metrics(self, run_id: str, metrics: list) -> None:
        for start in range(0, len(metrics), BATCH):
            self.client.log_batch(run_id, metrics=metrics[start:start + BATCH])

    def _name_of(self, version_id: int | None) -> str:
        parent = self.session.get(ModelVersion, version_id) if version_id else None
        return parent.name if parent else "none"

    # ------------------------------------------------------------------ registry

    def _registry(self, versions: list[ModelVersion], runs: dict[int, str]) -> None:
        client, name = self.client, self.model_name
        try:
            model = client.get_registered_model(name)
        except MlflowException:
            model = client.create_registered_model(name, description=f"tuneloop project {name}")
        registered = {mv.tags.get(VERSION_TAG): mv for mv in client.search_model_versions(f"name='{name}'")}
        numbers: dict[int, str] = {}
        for version in versions:
            mv = registered.get(version.name)
            if mv is None:
                run = client.get_run(runs[version.id])
                mv = client.create_model_version(name, f"{run.info.artifact_uri}/{MODEL_PATH}", run_id=run.info.run_id,
                                                 tags={VERSION_TAG: version.name, STATUS_TAG: version.status},
                                                 await_creation_for=0)  # files already logged: nothing to wait for
                self.done.versions_registered += 1
            elif mv.tags.get(STATUS_TAG) != version.status:
                client.set_model_version_tag(name, mv.version, STATUS_TAG, version.status)
            numbers[version.id] = str(mv.version)
        current = dict(model.aliases or {})  # alias -> MLflow version number
        for alias, version in self._wanted_aliases().items():
            self.done.aliases[alias] = version.name if version else None
            if version is None:
                if alias in current:
                    client.delete_registered_model_alias(name, alias)
            elif current.get(alias) != numbers[version.id]:
                client.set_registered_model_alias(name, alias, numbers[version.id])

    def _wanted_aliases(self) -> dict[str, ModelVersion | None]:
        s = self.session
        waiting = s.scalars(select(ModelVersion).where(ModelVersion.status == Status.CANDIDATE.value)
                            .order_by(ModelVersion.id.desc())).first()
        last_cycle = s.scalar(select(ModelVersion.cycle_id).where(ModelVersion.cycle_id.is_not(None),
                                                                  ModelVersion.status.not_in(NOT_CANDIDATES))
                              .order_by(ModelVersion.id.desc()).limit(1))
        return {"champion": champion(s), "challenger": waiting,
                "candidate": cycle_candidate(s, last_cycle) if last_cycle is not None else None}


# ---------------------------------------------------------------------- values


def _grows(key: str) -> bool:
    """A cycle's own run is filled step by step (complete when the cycle ends); the others at once."""
    return key.startswith("cycle-") and "/" not in key


def _ms(when: datetime | None) -> int:
    if when is None:
        return int(time.time() * 1000)
    return int((when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp() * 1000)  # the store keeps UTC


def _short(value: Any, limit: int = MAX_PARAM) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _key(name: str) -> str:
    """An MLflow key: letters, digits and _-. /: anything else becomes _."""
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in name)[:250]


def _flat(values: dict, prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys; a list becomes its length and a short hash (lists of ids)."""
    out: dict[str, Any] = {}
    for k, v in (values or {}).items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, name + "."))
        elif isinstance(v, list) and len(json.dumps(v, default=str)) > MAX_PARAM:
            out[name] = f"{len(v)} items, sha256 {hashlib.sha256(json.dumps(v, default=str).encode()).hexdigest()[:16]}"
        else:
            out[name] = v
    return out


def _numbers(values: dict) -> dict[str, float]:
    """The finite numbers of a (nested) result as dotted metric keys; booleans count as 0/1."""
    out = {}
    for k, v in _flat(values).items():
        if isinstance(v, bool):
            out[_key(k)] = float(v)
        elif isinstance(v, int | float) and v == v and abs(v) != float("inf"):
            out[_key(k)] = float(v)
    return out


def _curves(log_history: list[dict], stamp: int) -> list:
    """Every number the trainer logged at a step (loss, learning rate, rewards, ...) as `train.<name>`
    metrics at that step."""
    out = []
    for row in log_history:
        step = int(row.get("step", 0))
        for k, v in _numbers({k: v for k, v in row.items() if k not in ("step", "epoch")}).items():
            out.append(Metric(f"train.{k}", v, stamp, step))
    return out
