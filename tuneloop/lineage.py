"""Model lineage: the version tree, what changed between two versions, and manual promotion.

Every ModelVersion records its parent, method, hyperparameters, training example ids and metrics;
the training data is identified by a hash over the sorted content hashes of its examples, so two
versions trained on the same examples (in any order) show the same data hash. A manual promotion
(rollback or roll-forward) is recorded by `versions.promote` as the gate's are (an Artifact row of
kind "promotion": an audit trail that needs no schema change); `tuneloop serve` picks up the new
champion by itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select

from tuneloop.errors import StateError
from tuneloop.store import EvalRun, Example, ModelVersion, Session, text_hash
from tuneloop.versions import Status, champion, direction
from tuneloop.versions import promote as promote_version

# --------------------------------------------------------------------------- lookups


def all_versions(session: Session) -> list[ModelVersion]:
    return list(session.scalars(select(ModelVersion).order_by(ModelVersion.id)))


def get_version(session: Session, name: str) -> ModelVersion:
    """The version called `name`, or a one-line StateError naming the known versions."""
    v = session.scalar(select(ModelVersion).where(ModelVersion.name == name))
    if v is None:
        known = [x.name for x in all_versions(session)]
        hint = f" (known: {', '.join(known)})" if known else " (no model versions yet)"
        raise StateError(f"unknown model version '{name}'{hint}")
    return v


@dataclass
class TreeNode:
    version: ModelVersion
    children: list[TreeNode] = field(default_factory=list)


def version_tree(session: Session) -> list[TreeNode]:
    """Roots (versions without a known parent, normally 'base') with their descendants, oldest first."""
    versions = all_versions(session)
    nodes = {v.id: TreeNode(v) for v in versions}
    roots: list[TreeNode] = []
    for v in versions:
        parent = nodes.get(v.parent_id) if v.parent_id is not None else None
        if parent is None or v.parent_id == v.id:
            roots.append(nodes[v.id])
        else:
            parent.children.append(nodes[v.id])
    return roots


def ancestry(session: Session, version: ModelVersion) -> list[ModelVersion]:
    """`version`, its parent, ... up to the root (cycles in bad data are cut)."""
    chain, seen = [version], {version.id}
    while chain[-1].parent_id is not None and chain[-1].parent_id not in seen:
        parent = session.get(ModelVersion, chain[-1].parent_id)
        if parent is None:
            break
        chain.append(parent)
        seen.add(parent.id)
    return chain


# --------------------------------------------------------------------------- training data


@dataclass
class TrainingData:
    ids: list[int]  # distinct example ids, as recorded
    hashes: list[str]  # sorted content hashes of the examples still in the store
    missing: int  # recorded ids no longer in the store

    @property
    def data_hash(self) -> str | None:
        """sha256 over the sorted example content hashes (None when nothing was trained on)."""
        return text_hash(*self.hashes) if self.hashes else None


def training_data(session: Session, version: ModelVersion) -> TrainingData:
    ids = sorted({int(i) for i in (version.training_example_ids or [])
                  if isinstance(i, (int, str)) and not isinstance(i, bool) and str(i).isdigit()})
    found: dict[int, str] = {}
    for start in range(0, len(ids), 500):  # stay under SQLite's bound-parameter limit
        chunk = ids[start:start + 500]
        for i, h in session.execute(select(Example.id, Example.content_hash).where(Example.id.in_(chunk))):
            found[i] = h
    return TrainingData(ids, sorted(found.values()), len(ids) - len(found))


# --------------------------------------------------------------------------- diff


@dataclass
class MetricRow:
    source: str  # "version" (ModelVersion.metrics) or "eval <hash12> (n=..)"
    metric: str
    a: float | None
    b: float | None

    @property
    def delta(self) -> float | None:
        if _num(self.a) and _num(self.b):
            return self.b - self.a
        return None


@dataclass
class VersionDiff:
    a: ModelVersion
    b: ModelVersion
    fields: list[tuple[str, Any, Any]]  # (field, a, b) for method, parent, base model, ... (all shown)
    hyperparams: list[tuple[str, Any, Any]]  # only the keys whose values differ
    data_a: TrainingData
    data_b: TrainingData
    only_a: int
    only_b: int
    shared: int
    metrics: list[MetricRow]

    @property
    def same_data(self) -> bool:
        return self.data_a.data_hash == self.data_b.data_hash


MISSING = "<unset>"


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def diff_versions(session: Session, a: ModelVersion, b: ModelVersion) -> VersionDiff:
    """What changed from `a` to `b`."""
    names = {v.id: v.name for v in all_versions(session)}
    fields = [
        ("method", a.method, b.method),
        ("parent", names.get(a.parent_id, "-"), names.get(b.parent_id, "-")),
        ("base model", a.base_model, b.base_model),
        ("status", a.status, b.status),
        ("adapter", a.adapter_path or "-", b.adapter_path or "-"),
        ("cycle", a.cycle_id if a.cycle_id is not None else "-", b.cycle_id if b.cycle_id is not None else "-"),
    ]
    ha, hb = _flatten(a.hyperparams or {}), _flatten(b.hyperparams or {})
    hyper = [(k, ha.get(k, MISSING), hb.get(k, MISSING)) for k in sorted(set(ha) | set(hb))
             if ha.get(k, MISSING) != hb.get(k, MISSING)]
    da, db = training_data(session, a), training_data(session, b)
    sa, sb = set(da.ids), set(db.ids)
    return VersionDiff(a, b, fields, hyper, da, db, len(sa - sb), len(sb - sa), len(sa & sb),
                       metric_rows(session, a, b))


def metric_rows(session: Session, a: ModelVersion, b: ModelVersion) -> list[MetricRow]:
    """Numeric metrics side by side: the versions' own metrics, then each eval set either was scored on."""
    rows: list[MetricRow] = []
    ma, mb = a.metrics or {}, b.metrics or {}
    for k in sorted(set(ma) | set(mb)):
        va, vb = ma.get(k), mb.get(k)
        if (va is None or _num(va)) and (vb is None or _num(vb)) and (va is not None or vb is not None):
            rows.append(MetricRow("version", k, va, vb))
    runs: dict[str, dict[int, EvalRun]] = {}
    for run in session.scalars(select(EvalRun).where(EvalRun.model_version_id.in_([a.id, b.id]))
                               .order_by(EvalRun.id)):
        runs.setdefault(run.eval_set_hash, {})[run.model_version_id] = run
    for set_hash, by_version in runs.items():
        ra, rb = by_version.get(a.id), by_version.get(b.id)
        n = (ra or rb).n  # type: ignore[union-attr]
        label = f"eval {set_hash[:12]} (n={n})"
        ea, eb = (ra.metrics if ra else {}) or {}, (rb.metrics if rb else {}) or {}
        for k in sorted(set(ea) | set(eb)):
            va, vb = ea.get(k), eb.get(k)
            if (va is None or _num(va)) and (vb is None or _num(vb)) and (va is not None or vb is not None):
                rows.append(MetricRow(label, k, va, vb))
    return rows


# --------------------------------------------------------------------------- promotion


@dataclass
class Promotion:
    version: ModelVersion
    previous: ModelVersion | None
    changed: bool  # False: it already was the champion
    direction: str  # "rollback" (to an older version), "forward" or "none"


def promote(session: Session, name: str, reason: str = "manual") -> Promotion:
    """Make version `name` the champion (`versions.promote`: the current champion(s) become 'retired')
    and record the manual promotion. Flushes, does not commit."""
    version = get_version(session, name)
    if version.status == Status.CHAMPION:
        return Promotion(version, champion(session), False, "none")
    previous = promote_version(session, version, reason)  # recorded as the gate's promotions are
    return Promotion(version, previous, True, direction(previous, version))


def fmt_time(t: datetime | None) -> str:
    return t.strftime("%Y-%m-%d %H:%M") if t else "-"
