"""Training on Ray Train (`compute.engine: ray`): one data-parallel run (DDP: gloo on CPU, NCCL on
GPU) of `compute.workers` workers, each running the same training loop.

The loop (`stages/training.py`) builds the stage's transformers/TRL trainer in the worker, hands it
to `prepare` (Ray's `RayTrainReportCallback` and `prepare_trainer`) and trains, resuming from the
last complete checkpoint in its work folder, which lives in the project's artifacts folder: every
node must reach it (a shared filesystem). A worker that dies restarts the group from that
checkpoint (`FailureConfig(max_failures=compute.max_failures)`); a killed driver reruns the step
and resumes the same way. Rank 0 alone saves the trained adapter.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tuneloop.config import ComputeSettings
from tuneloop.errors import ConfigError, TuneloopError

# Ray is imported on first use, not here: the training runner imports this module, and with
# compute.engine: local nothing may import Ray (the extra may not even be installed).


def _ray_train():
    try:
        import ray.train
        import ray.train.huggingface.transformers
        import ray.train.torch
    except ImportError as exc:  # the `ray` extra is not installed
        raise ConfigError("compute.engine: ray needs Ray Train: pip install 'tuneloop[ray]'") from exc
    return ray.train


def run_data_parallel(loop: Callable[[], None], settings: ComputeSettings, storage: Path, name: str) -> None:
    """Run `loop` on `compute.workers` Ray Train workers (each `cpus_per_worker` CPUs and
    `gpus_per_worker` GPUs) until it ends; Ray keeps its run state under `storage`/`name`.
    A tuneloop error raised in a worker (bad data, bad settings) is raised here as it is."""
    train = _ray_train()
    from tuneloop.compute.ray_engine import connect  # imports Ray: only on this path

    connect(settings)
    use_gpu = settings.gpus_per_worker > 0
    resources = {"CPU": settings.cpus_per_worker, **({"GPU": settings.gpus_per_worker} if use_gpu else {})}
    trainer = train.torch.TorchTrainer(
        loop,
        scaling_config=train.ScalingConfig(num_workers=settings.workers, use_gpu=use_gpu,
                                           resources_per_worker=resources),
        run_config=train.RunConfig(name=name, storage_path=str(storage),
                                   failure_config=train.FailureConfig(max_failures=settings.max_failures)),
        torch_config=train.torch.TorchConfig(backend="nccl" if use_gpu else "gloo"))
    try:
        trainer.fit()
    except train.WorkerGroupError as exc:
        for failure in exc.worker_failures.values():
            cause = failure
            while cause is not None and not isinstance(cause, TuneloopError):
                cause = cause.__cause__
            if cause is not None:
                raise cause from None
        raise


def prepare(trainer, threads: int):
    """A worker's trainer made ready for Ray Train: metrics and checkpoints reported to Ray
    (`RayTrainReportCallback`), Ray Data iterables understood (`prepare_trainer`), torch on
    `threads` threads."""
    import torch

    hf = _ray_train().huggingface.transformers
    torch.set_num_threads(threads)
    trainer.add_callback(hf.RayTrainReportCallback())
    return hf.prepare_trainer(trainer)


def is_rank_zero() -> bool:
    return _ray_train().get_context().get_world_rank() == 0
