"""The Ray side of `compute.engine: ray`: connecting to a cluster, and mapping items over a pool
of actors that each load their model once (Ray Data).

Ray Data's actor-pool API has changed across releases (`compute=ActorPoolStrategy(...)` replaced
the `concurrency=` argument, deprecated since Ray 2.51); `map_with_actors` is the one place that
calls it. Results come back to the driver in input order: the driver alone writes the store.

The dashboard is never started (`include_dashboard=False`): it has had remote-code CVEs, and a
cluster's own dashboard should stay bound to localhost (README, "Running on a cluster").
"""
from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

from tuneloop.errors import ConfigError
from tuneloop.settings_compute import ComputeSettings, ray_host_port

try:
    import ray
    import ray.data
except ImportError as exc:  # the `ray` extra is not installed
    raise ConfigError("compute.engine: ray needs Ray: pip install 'tuneloop[ray]'") from exc

INDEX = "__tuneloop_index"  # the column that carries each item's position through the pool
CONNECT_TIMEOUT_S = 5.0


def connect(settings: ComputeSettings) -> None:
    """Join the cluster at `compute.address`, or start a local Ray with the CPUs that
    `workers` x `cpus_per_worker` need (address ""). Once Ray is started in the process, a
    second call only checks that the address still answers."""
    address = settings.address
    if address not in ("", "auto"):
        _check_reachable(address)
    if ray.is_initialized():
        return
    context = ray.data.DataContext.get_current()  # the driver's output is tuneloop's progress, not Ray's
    context.enable_progress_bars, context.print_on_execution_start = False, False
    try:
        if address:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(num_cpus=max(1, round(settings.workers * settings.cpus_per_worker)),
                     num_gpus=round(settings.workers * settings.gpus_per_worker),
                     include_dashboard=False, log_to_driver=False)
    except ConnectionError as exc:
        raise ConfigError(f"compute.address {address!r}: no Ray cluster could be joined ({exc})") from None
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # (set by ray.init) a line per dataset otherwise


def _check_reachable(address: str) -> None:
    """Fail in seconds, with the setting named, when nothing listens at HOST:PORT (Ray itself
    retries for a minute before it gives up)."""
    host_port = ray_host_port(address)
    assert host_port is not None, address  # the settings accept no other form
    try:
        with socket.create_connection(host_port, timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ConfigError(f"compute.address {address!r}: no Ray cluster answers there ({exc.strerror or exc})") \
            from None


def map_with_actors(items: list[dict[str, Any]], actor: type, actor_args: tuple, settings: ComputeSettings,
                    batch_size: int = 16, on_row: Callable[[dict[str, Any]], None] | None = None
                    ) -> list[dict[str, Any]]:
    """`actor(*actor_args)` built once in each of `compute.workers` actors (each with
    `cpus_per_worker` and `gpus_per_worker`), called on batches of `items` (a dict of columns in,
    a dict of columns out, one value per row); each item with the actor's columns added, in the
    order of `items`. `on_row` sees each finished row as it streams back (progress)."""
    if not items:
        return []
    connect(settings)
    rows = [{**item, INDEX: i} for i, item in enumerate(items)]
    blocks = -(-len(rows) // batch_size)  # a block per batch: every actor of the pool gets work
    dataset = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
        _Indexed, fn_constructor_args=(actor, actor_args), batch_size=batch_size, batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=settings.workers),
        num_cpus=settings.cpus_per_worker, num_gpus=settings.gpus_per_worker)
    out = []
    for row in dataset.iter_rows():  # streamed: rows arrive while other batches still run
        out.append(row)
        if on_row is not None:
            on_row(row)
    out.sort(key=lambda row: row[INDEX])
    if [row[INDEX] for row in out] != list(range(len(items))):
        raise RuntimeError(f"Ray returned {len(out)} rows for {len(items)} items (lost or duplicated rows)")
    return [{k: v for k, v in row.items() if k != INDEX} for row in out]


class _Indexed:
    """Wraps the user's actor: passes the index column through, hands the rest to the actor."""

    def __init__(self, actor: type, actor_args: tuple) -> None:
        self.inner: Callable[[dict[str, list]], dict[str, list]] = actor(*actor_args)

    def __call__(self, batch):
        columns = {c: batch[c].tolist() for c in batch.columns if c != INDEX}
        result = self.inner(columns)
        out = batch.copy()
        for name, values in result.items():
            out[name] = list(values)
        return out
