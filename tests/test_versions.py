"""The model-version lifecycle (tuneloop/versions.py) and the layering it allows."""
from __future__ import annotations

import ast
from pathlib import Path

from sqlalchemy import select

import tuneloop
from tuneloop.loop import STEPS
from tuneloop.store import ModelVersion, open_store
from tuneloop.versions import NOT_CANDIDATES, Status, champion, promote, promotions, set_status

PACKAGE = Path(tuneloop.__file__).parent


def test_statuses_are_stored_as_the_same_plain_strings(tmp_path):
    assert {s.value for s in Status} == {"champion", "candidate", "rejected", "retired", "intermediate",
                                         "superseded"}
    assert set(NOT_CANDIDATES) == {"intermediate", "superseded"}
    with open_store(f"sqlite:///{tmp_path / 't.db'}")() as s:
        v = ModelVersion(name="v1", base_model="m", method="sft", status="candidate")
        s.add(v)
        set_status(v, Status.REJECTED)
        assert type(v.status) is str and v.status == "rejected"  # not the enum member: JSON, SQL, rich see a str
        s.commit()
        assert s.scalar(select(ModelVersion.status).where(ModelVersion.name == "v1")) == "rejected"


def test_promote_leaves_one_champion_and_returns_the_previous(tmp_path):
    with open_store(f"sqlite:///{tmp_path / 't.db'}")() as s:
        base = ModelVersion(name="base", base_model="m", method="base", status="champion")
        stale = ModelVersion(name="v1", base_model="m", method="sft", status="champion")  # e.g. an old bug's row
        cand = ModelVersion(name="v2", base_model="m", method="sft", status="candidate")
        s.add_all([base, stale, cand])
        s.flush()
        previous = promote(s, cand, "gate")
        assert previous is not None and previous.name in ("base", "v1")
        assert (base.status, stale.status, cand.status) == ("retired", "retired", "champion")
        assert champion(s) is cand
        (record,) = promotions(s)  # the gate's promotion is recorded as a person's is
        assert (record["to"], record["reason"], record["direction"]) == ("v2", "gate", "forward")


def _imported_modules(path: Path) -> set[str]:
    """Every tuneloop module a file imports, at any depth (function-level imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m.startswith("tuneloop.")}


def test_serving_lineage_report_and_feedback_do_not_import_the_stages():
    """They find the champion through versions.py, the eval sets through evalsets.py, answer and
    score through programs/scoring.py and scan documents through ingest/loaders.py."""
    files = [*PACKAGE.glob("serve/*.py"), *PACKAGE.glob("monitor/*.py"), *PACKAGE.glob("feedback/*.py"),
             PACKAGE / "lineage.py", PACKAGE / "report.py", PACKAGE / "versions.py", PACKAGE / "evalsets.py",
             *PACKAGE.glob("programs/*.py")]
    assert len(files) > 15
    offending = {}
    for f in files:
        rel = f.relative_to(PACKAGE.parent).as_posix()
        stages = {m for m in _imported_modules(f) if m.startswith("tuneloop.stages")}
        if stages:
            offending[rel] = sorted(stages)
    assert offending == {}


def _module_graph() -> dict[str, set[str]]:
    """tuneloop module -> the tuneloop modules it imports anywhere in the file."""
    files = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imported_modules(p) if m in files and m != name} for name, p in files.items()}


def test_no_import_cycles_even_through_function_level_imports():
    """An import inside a function must not hide a cycle (it once hid feedback.rlaif ->
    stages.eval -> stages.judge_eval -> feedback.rlaif, and stages.align <-> stages.rloo)."""
    graph, cycles = _module_graph(), set()

    def visit(node: str, path: list[str]) -> None:
        for nxt in graph[node]:
            if nxt in path:
                cycles.add(frozenset(path[path.index(nxt):]))
            elif len(path) < 8:
                visit(nxt, [*path, nxt])

    for start in graph:
        visit(start, [start])
    assert cycles == set()


def test_every_cycle_step_has_its_module_in_stages():
    """A newcomer finds each step of `loop.STEPS` by its name in tuneloop/stages/."""
    missing = [name for name in STEPS if not (PACKAGE / "stages" / f"{name}.py").is_file()]
    assert missing == []
