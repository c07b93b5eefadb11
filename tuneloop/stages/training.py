"""The one training runner of SFT, DAPT, DPO/ORPO/KTO/GRPO and RLOO.

A run: resolve the student's base model and the parent's adapter, train in artifacts/.work/<run>
(resuming from the last complete checkpoint a killed run left there), save the trained adapter as
an artifact (`write_artifact`: complete or absent), register its model version, and remove the
work folder. A rerun of a finished run finds the complete artifact and only registers it (once).

`train_model` trains in this process, or with `compute.engine: ray` on Ray Train workers
(`compute/ray_train.py`, data-parallel); either way the trained adapter is saved in
<work>/final and the artifact, its meta.json and the version are the same.

What differs between methods is a `methods.METHODS` entry (TRL config/trainer, data kind,
reference model) and the stage's function that picks the data and builds the trainer.
On CPU training runs in fp32 (bf16 is far slower without bf16 units); on CUDA with bf16 support
it uses bf16 (`policy.device_args`).
"""
from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Any

from transformers import PrinterCallback, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from tuneloop.artifacts import (
    artifact_path,
    clean_leftovers,
    is_complete,
    read_meta,
    run_name,
    write_artifact,
    write_jsonl,
)
from tuneloop.compute import ray_train
from tuneloop.config import ComputeSettings, Project
from tuneloop.errors import ConfigError
from tuneloop.models.defaults import resolve_model_path
from tuneloop.progress import Reporter
from tuneloop.safety import safe_rmtree
from tuneloop.stages.common import save_trained_adapter, train_losses
from tuneloop.stages.methods import METHODS, TRL_COLUMNS, Method
from tuneloop.stages.policy import Policy, device_args
from tuneloop.store import ModelVersion, Session
from tuneloop.versions import adapter_folder, register_adapter

KIND = "adapters"


@dataclass
class TrainResult:
    """A registered training run: its version and adapter artifact."""

    version: ModelVersion
    artifact: Path
    method: str
    first_loss: float | None
    last_loss: float | None


@dataclass
class Run:
    """Who a run is: `stage` ("sft", "dapt", "align") and `method` name its artifact
    (<stage>-<method> when they differ), `parent` is the version it continues."""

    project: Project
    stage: str
    method: str
    parent: ModelVersion
    cycle_id: int | None = None
    name: str | None = None  # default: deterministic inside a cycle, else timestamped
    status: str = "candidate"

    @property
    def prefix(self) -> str:
        return self.stage if self.stage == self.method else f"{self.stage}-{self.method}"

    @cached_property
    def model_dir(self) -> Path:
        """The student's base model folder (resolved when training starts: it may convert a model)."""
        return resolve_model_path(self.project.settings.models.student.model, self.project.cache)

    @property
    def parent_adapter(self) -> Path | None:
        return adapter_folder(self.parent)


@dataclass
class Finished:
    """A finished training run: the trained adapter, its tokenizer and log_history.json in `folder`."""

    folder: Path
    log_history: list[dict]

    @property
    def global_step(self) -> int:
        return max((int(h.get("step", 0)) for h in self.log_history), default=0)


@dataclass
class Trained:
    """What a stage's training function hands back: the finished run and what to save with it."""

    finished: Finished
    rows: list[dict]  # saved as train.jsonl
    meta: dict  # the stage's own meta.json fields (hyperparams, ...)
    extra_files: Callable[[Path], None] | None = None  # writes more files into the artifact


def alignment_meta(run: Run, hyperparams: dict, finished: Finished) -> dict:
    """The meta.json fields of an alignment run: its method and the KL term's reference model."""
    return {"method": run.method, "reference": METHODS[run.method].reference_note(run.parent.name),
            "hyperparams": hyperparams, "global_step": finished.global_step}


def train_and_register(session: Session, run: Run, train: Callable[[Path], Trained]) -> TrainResult:
    """Train (unless the run's artifact is complete), save and register; `train(work_dir)` does the
    stage's own part: data, trainer, `fit`. Caller commits."""
    artifacts = run.project.artifacts
    name = run.name or run_name(run.prefix, run.cycle_id)
    clean_leftovers(session, artifacts, KIND, run.prefix)
    path = artifact_path(artifacts, KIND, name)
    if not is_complete(path):
        work_dir = artifacts / ".work" / name
        path = _save(run, name, train(work_dir))
        safe_rmtree(work_dir, inside=artifacts, ignore_errors=True)
    return _register(session, path, run)


def _save(run: Run, name: str, done: Trained) -> Path:
    losses = train_losses(done.finished.log_history)

    def write(tmp: Path) -> None:
        shutil.copytree(done.finished.folder, tmp, dirs_exist_ok=True)
        write_jsonl(tmp / "train.jsonl", done.rows)
        if done.extra_files is not None:
            done.extra_files(tmp)

    meta = {"stage": run.stage, "cycle_id": run.cycle_id, "base_model": run.project.settings.models.student.model,
            "parent": run.parent.name, "parent_adapter": run.parent.adapter_path, **done.meta,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}
    return write_artifact(run.project.artifacts, KIND, name, meta, write)


def _register(session: Session, path: Path, run: Run) -> TrainResult:
    meta = read_meta(path)
    method = meta.get("method", meta["stage"])
    version = register_adapter(
        session, path, run.parent, run.cycle_id, method=method, base_model=meta["base_model"], status=run.status,
        hyperparams=meta["hyperparams"], training_example_ids=meta.get("example_ids"),
        artifact_meta={"stage": meta["stage"], "method": method} if meta["stage"] != method else None,
        metrics={"train_first_loss": meta["first_loss"], "train_last_loss": meta["last_loss"]})
    return TrainResult(version, path, method, meta["first_loss"], meta["last_loss"])


# --------------------------------------------------------------------------- trainer and training


def train_args(s, work_dir: Path, device: str, dtype, epochs: float | None = None, sampling: bool = False) -> dict:
    """The config fields every method shares, from its settings section `s` (`sft` or `align`)."""
    batch = s.batch_size * s.num_generations if sampling else s.batch_size  # a group per prompt
    return {"output_dir": str(work_dir), "num_train_epochs": s.epochs if epochs is None else epochs,
            "learning_rate": s.learning_rate, "per_device_train_batch_size": batch,
            "gradient_accumulation_steps": s.grad_accum, "seed": s.seed, "logging_steps": 1, "report_to": [],
            "save_strategy": "steps", "save_steps": s.save_steps, "save_total_limit": 1, "disable_tqdm": True,
            **device_args(device, dtype)}


def trl_rows(rows: list[dict], method: Method) -> list[dict]:
    """The columns of `rows` that TRL reads for the method's data kind."""
    cols = TRL_COLUMNS[method.data]
    return [{c: r[c] for c in cols} for r in rows]


def build_trainer(method: Method, policy: Policy, rows: list[dict], s, work_dir: Path,
                  epochs: float | None = None, **extra):
    """The method's TRL trainer on `rows` (already its columns), training `policy`'s model;
    `extra`: trainer arguments of its own (reward functions)."""
    from datasets import Dataset  # imported on use: slow to import, and most commands never train

    config_class, trainer_class = method.classes()
    args = config_class(**train_args(s, work_dir, policy.device, policy.dtype, epochs, method.sampling),
                        **method.options(s))
    trainer = trainer_class(model=policy.model, args=args, train_dataset=Dataset.from_list(rows),
                            processing_class=policy.tokenizer, peft_config=policy.peft_config, **extra)
    trainer.remove_callback(PrinterCallback)  # our progress bar replaces its per-step log dicts
    return trainer


class ProgressCallback(TrainerCallback):
    """Moves our progress bar (TRL's own tqdm bar is turned off)."""

    def __init__(self, advance):
        self.advance = advance

    def on_step_end(self, args, state, control, **kwargs):
        self.advance(1)


def estimated_steps(n_rows: int, s, epochs: float | None = None) -> int:
    """Optimiser steps of `n_rows` rows (the progress bar's total when TRL does not say)."""
    per_epoch = max(1, -(-n_rows // (s.batch_size * s.grad_accum)))
    return max(1, int(per_epoch * (s.epochs if epochs is None else epochs) + 0.999))


Build = Callable[[Path], tuple[Any, Any]]  # work folder -> (trainer, tokenizer); picklable for Ray
FINAL = "final"  # the work folder's subfolder that holds the trained adapter


def train_model(build: Build, work_dir: Path, label: str, total: int, reporter: Reporter,
                project: Project) -> Finished:
    """Build the stage's trainer and train it (resuming from the last complete checkpoint), in this
    process or, with `compute.engine: ray`, on Ray Train workers (`build` then runs in each of
    them); `total`: the expected steps (the progress bar's total when the trainer has no max_steps).
    The trainer also reports to `tracking.report_to` (`Loggers`)."""
    loggers = Loggers(tuple(project.settings.tracking.report_to), project.root / "runs" / work_dir.name)
    compute = project.settings.compute
    if compute.engine == "ray":
        return _train_on_ray(build, work_dir, label, total, reporter, compute, loggers)
    trainer, tokenizer = build(work_dir)
    loggers.attach(trainer)
    fit(trainer, work_dir, label, total, reporter)
    return finish(trainer, tokenizer, work_dir)


@dataclass(frozen=True)
class Loggers:
    """`tracking.report_to`: transformers' own integrations, added to a built trainer (TensorBoard
    writes to `folder`, <project>/runs/<run>, which outlives the run's work folder)."""

    report_to: tuple[str, ...]
    folder: Path

    def attach(self, trainer) -> None:
        for name in self.report_to:
            trainer.add_callback(self._callback(name))

    def _callback(self, name: str):
        from transformers.integrations import TensorBoardCallback, get_reporting_integration_callbacks

        try:
            if name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(self.folder)))
            (callback,) = get_reporting_integration_callbacks([name])
            return callback()
        except (ImportError, RuntimeError, ValueError) as exc:  # the logger's package is not installed
            raise ConfigError(f"tracking.report_to: {name} cannot be used here ({exc}); "
                              f"pip install {name}, or remove it from tracking.report_to") from None


def finish(trainer, tokenizer, work_dir: Path) -> Finished:
    """Save a trained trainer's adapter, tokenizer and log history in <work_dir>/final."""
    folder = work_dir / FINAL
    save_trained_adapter(folder, trainer, tokenizer)
    return Finished(folder, trainer.state.log_history)


def _train_on_ray(build: Build, work_dir: Path, label: str, total: int, reporter: Reporter,
                  compute: ComputeSettings, loggers: Loggers) -> Finished:
    reporter.log(f"{label}: on Ray Train, {compute.workers} data-parallel workers")
    total = -(-total // compute.workers)  # each step takes a batch per worker
    resume = last_complete_checkpoint(work_dir)  # the workers resume from it (the work folder is shared)
    start = checkpoint_step(resume) if resume else 0
    steps = work_dir / STEP_FILE
    steps.unlink(missing_ok=True)  # a killed run's last step is not this run's
    with reporter.task(label, total) as advance:
        if resume:
            reporter.log(f"resuming training from {resume}")
            advance(start)
        with following_steps(steps, advance, start):
            ray_train.run_data_parallel(partial(_fit_on_worker, build, work_dir, max(1, int(compute.cpus_per_worker)),
                                                loggers), compute, work_dir / "ray", work_dir.name)
    folder = work_dir / FINAL
    return Finished(folder, json.loads((folder / "log_history.json").read_text(encoding="utf-8")))


def _fit_on_worker(build: Build, work_dir: Path, threads: int, loggers: Loggers) -> None:
    """One Ray Train worker: the stage's trainer, trained data-parallel; rank 0 writes each step
    for the driver's progress bar, reports to the loggers and saves the adapter."""
    trainer, tokenizer = build(work_dir)
    trainer = ray_train.prepare(trainer, threads)
    if ray_train.is_rank_zero():
        trainer.add_callback(StepFile(work_dir / STEP_FILE))
        loggers.attach(trainer)
    trainer.train(resume_from_checkpoint=last_complete_checkpoint(work_dir))
    if ray_train.is_rank_zero():
        finish(trainer, tokenizer, work_dir)


STEP_FILE = "step"  # in the work folder: the last optimiser step a Ray Train run finished


class StepFile(TrainerCallback):
    """Writes the global step to `path` after each step (a Ray Train worker cannot reach the
    driver's progress bar; the work folder is shared, and the driver reads the file)."""

    def __init__(self, path: Path):
        self.path = path

    def on_step_end(self, args, state, control, **kwargs):
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(str(state.global_step), encoding="utf-8")
        os.replace(tmp, self.path)  # the reader sees the old step or the new one, never half a number


@contextmanager
def following_steps(path: Path, advance: Callable[[int], None], start: int, every_s: float = 0.5) -> Iterator[None]:
    """While the block runs, move the bar (`advance`) up to the step last written to `path`
    (from `start`), checking every `every_s` seconds and once more when the block ends."""
    shown = start
    stop = threading.Event()

    def catch_up() -> None:
        nonlocal shown
        try:
            step = int(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # not written yet
            return
        if step > shown:
            advance(step - shown)
            shown = step

    def poll() -> None:
        while not stop.wait(every_s):
            catch_up()

    thread = threading.Thread(target=poll, name="ray-train-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        catch_up()


def checkpoint_step(checkpoint: str) -> int:
    """The optimiser step of a checkpoint folder (checkpoint-<step>)."""
    return int(Path(checkpoint).name.split("-")[-1])


def fit(trainer, work_dir: Path, label: str, total: int, reporter: Reporter) -> None:
    """Train with a progress bar, resuming from the last complete checkpoint in `work_dir`;
    `total`: the expected steps (used when the trainer has no `max_steps`)."""
    total = trainer.args.max_steps if trainer.args.max_steps > 0 else total
    resume = last_complete_checkpoint(work_dir)
    with reporter.task(label, total) as advance:
        if resume:
            reporter.log(f"resuming training from {resume}")
            advance(checkpoint_step(resume))
        trainer.add_callback(ProgressCallback(advance))
        trainer.train(resume_from_checkpoint=resume)


def last_complete_checkpoint(work_dir: Path) -> str | None:
    """The newest checkpoint that was fully written, removing any a kill left half-written.

    Trainer writes a checkpoint folder in place and its trainer_state.json last; a run killed while
    saving leaves a folder without it (or with it cut short), and resuming from that folder fails
    on every later attempt.
    """
    if not work_dir.is_dir():
        return None
    while (last := get_last_checkpoint(str(work_dir))) is not None:
        try:
            json.loads((Path(last) / "trainer_state.json").read_text(encoding="utf-8"))
            return last
        except (OSError, ValueError):
            safe_rmtree(last, inside=work_dir, ignore_errors=True)
            if Path(last).exists():  # could not remove it: do not loop forever
                return None
    return None
