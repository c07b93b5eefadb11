"""`compute.engine: ray` plumbing on a local Ray cluster started by the test (no dashboard, no
local_mode): joining a cluster, mapping items over an actor pool, clear errors for bad addresses,
and nothing importing Ray when the engine is local."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
from pydantic import ValidationError

from tests.helpers import free_port
from tuneloop.config import ComputeSettings
from tuneloop.errors import ConfigError

ray = pytest.importorskip("ray")
from tuneloop.compute import ray_engine  # noqa: E402 - after the skip when Ray is missing


@pytest.fixture
def cluster(ray_cluster):
    return ComputeSettings(engine="ray", workers=2, cpus_per_worker=0.5)


class Doubler:
    """A stand-in for a model actor: built once per actor, says which actor answered."""

    def __init__(self, factor: int) -> None:
        self.factor, self.actor_id = factor, uuid.uuid4().hex

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        return {"out": [x * self.factor for x in batch["x"]], "actor": [self.actor_id] * len(batch["x"]),
                "pid": [os.getpid()] * len(batch["x"])}


def test_items_map_over_the_actor_pool_in_order_each_actor_built_once(cluster):
    items = [{"x": i, "tag": f"item-{i}"} for i in range(40)]
    rows = ray_engine.map_with_actors(items, Doubler, (3,), cluster, batch_size=4)
    assert [r["out"] for r in rows] == [3 * i for i in range(40)]  # every item once, in order
    assert [r["tag"] for r in rows] == [f"item-{i}" for i in range(40)]  # input columns come back
    assert 1 <= len({r["actor"] for r in rows}) <= cluster.workers  # 10 batches, at most 2 actors built
    assert os.getpid() not in {r["pid"] for r in rows}  # the work ran in the actors' processes
    assert ray_engine.map_with_actors([], Doubler, (3,), cluster) == []


def test_an_address_where_nothing_listens_is_a_one_line_error_naming_the_setting():
    port = free_port()  # nothing listens there
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(ConfigError, match=r"compute.address '.*': no Ray cluster answers there"):
            ray_engine._check_reachable(address)


@pytest.mark.parametrize("address", ["", "auto", "10.0.0.5:6379", "ray://head.example:10001"])
def test_ray_addresses_the_settings_accept(address):
    assert ComputeSettings(engine="ray", address=address).address == address


@pytest.mark.parametrize("address", ["head.example", "ray://head", "10.0.0.5:port", "http://x:1/"])
def test_a_malformed_address_is_refused_by_the_settings(address):
    with pytest.raises(ValidationError, match="not a Ray address"):
        ComputeSettings(engine="ray", address=address)


def test_the_local_engine_imports_no_ray():
    code = ("import sys, tuneloop.cli, tuneloop.loop, tuneloop.serve, tuneloop.compute; "
            "from tuneloop.config import Settings; assert Settings().compute.engine == 'local'; "
            "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


class DiesOnce:
    """Kills its own process on its first batch (once per test, marked by a file): a worker lost mid-map."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        if not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return {"out": [x + 1 for x in batch["x"]]}


def test_an_actor_killed_mid_map_is_replaced_and_no_item_is_lost_or_doubled(cluster, tmp_path):
    items = [{"x": i} for i in range(24)]
    rows = ray_engine.map_with_actors(items, DiesOnce, (str(tmp_path / "died"),), cluster, batch_size=4)
    assert (tmp_path / "died").exists()  # an actor did die
    assert [r["out"] for r in rows] == [i + 1 for i in range(24)]
