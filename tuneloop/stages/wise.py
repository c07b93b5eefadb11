"""Stage: WiSE-FT weight averaging of the champion and a new candidate, alpha picked on the dev set.

The averaged model is W0 + (1 - alpha) * dW_champion + alpha * dW_candidate, built exactly in LoRA
delta space with PEFT's `add_weighted_adapter(combination_type="cat")`: the LoRA factors are
concatenated (A_i scaled by w_i * scaling_i, the new adapter's scaling is 1), so the delta is
sum_i w_i * scaling_i * B_i A_i. Its rank is the sum of the two ranks, so a chain of averaged
champions would grow without bound: above `lora.max_rank` the same delta is truncated to
that rank by SVD (PEFT's "svd" combination). When the champion is the base model (no adapter) the
delta is alpha * dW_candidate.

Each alpha in `continual.wise_alphas` is scored on the dev split (never trained on, never the
held-out eval set) with the retrieval-augmented answerer; the best wins, ties going to the smaller
alpha (closer to the champion). With `continual.anchor` and `continual.wise_anchor_guard` each
alpha also answers the anchor set, and an alpha whose anchor score falls past
`continual.anchor_tolerance` below the champion's is passed over (the gate would refuse it): the
dev split measures the domain, the anchor what fine-tuning may erase, and interpolating towards
the champion trades one for the other. (The gate then checks the same anchor questions the
alpha was screened on; the held-out questions stay untouched by the choice.) When no alpha keeps
the anchor, the best dev score is kept anyway and the gate refuses it. The winner is registered
as a new candidate version (method "wise", parent: the candidate).
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from tuneloop.artifacts import artifact_path, is_complete, read_meta, run_name, write_artifact
from tuneloop.config import Project
from tuneloop.errors import ConfigError, StateError
from tuneloop.evalsets import anchor_items, split_examples
from tuneloop.models.defaults import resolve_model_path
from tuneloop.programs.rag import Retriever
from tuneloop.programs.scoring import score_examples
from tuneloop.progress import Reporter
from tuneloop.safety import safe_rmtree
from tuneloop.stages.anchor import answer_anchor, evaluate_anchor
from tuneloop.stages.gate import anchor_guard
from tuneloop.store import Example, ModelVersion, Session
from tuneloop.versions import adapter_folder, register_adapter

KIND = "adapters"


@dataclass
class WiseResult:
    alpha: float
    scores: dict[float, float]  # primary dev metric per alpha
    anchor: dict[float, float]  # anchor score per alpha (empty without the anchor screen)
    version: ModelVersion
    artifact: Path


def average_adapters(base_model_dir: Path, champion_adapter: Path | None, candidate_adapter: Path,
                     alpha: float, out: Path, max_rank: int | None = None) -> Path:
    """Save to `out` a PEFT adapter whose delta is (1 - alpha) * dW_champion + alpha * dW_candidate
    (alpha * dW_candidate when `champion_adapter` is None, i.e. the champion is the base model).

    With `max_rank` below the summed rank, PEFT's "svd" combination builds the same delta and keeps
    its `max_rank` largest singular directions instead (exact whenever the delta's true rank fits)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(candidate_adapter), adapter_name="candidate")
    adapters, weights = ["candidate"], [float(alpha)]
    if champion_adapter is not None:
        model.load_adapter(str(champion_adapter), adapter_name="champion")
        adapters, weights = ["champion", "candidate"], [1.0 - float(alpha), float(alpha)]
    for name in adapters:
        if getattr(model.peft_config[name], "use_rslora", False):
            # "cat" gives the new adapter lora_alpha == r, a scaling of 1 only without rsLoRA
            raise ConfigError(f"WiSE-FT averaging does not support rsLoRA adapters ({name})")
    rank = sum(model.peft_config[name].r for name in adapters)
    if max_rank is not None and rank > max_rank:
        model.add_weighted_adapter(adapters, weights, "default", combination_type="svd", svd_rank=max_rank,
                                   svd_full_matrices=False)
    else:  # one adapter: PEFT switches to "linear", exact for one adapter (sqrt(w*s) on A and B)
        model.add_weighted_adapter(adapters, weights, "default", combination_type="cat")
    model.set_adapter("default")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), selected_adapters=["default"])
    return out


def dev_examples(project: Project, session: Session) -> list[Example]:
    rows = split_examples(session, "dev")
    if project.settings.eval.limit:
        rows = rows[: project.settings.eval.limit]
    return rows


def score_adapter(project: Project, adapter: Path, examples: list[Example], retriever: Retriever,
                  reporter: Reporter) -> float:
    """The primary metric of the student with `adapter` on `examples` (NaN when undefined)."""
    _, summary = score_examples(project, adapter, examples, retriever, reporter)
    value = summary.get(project.settings.eval.primary_metric)
    return float("nan") if value is None else float(value)


def screen_anchor(project: Project, adapter: Path, reporter: Reporter, label: str) -> float:
    """The anchor score of the student with `adapter` (not stored: the average is not a version yet)."""
    return float(answer_anchor(project, adapter, anchor_items(), reporter, label)[1]["anchor_score"])


def _best(scores: dict[float, float], eligible: set[float] | None = None) -> float:
    """The alpha with the highest score among `eligible` (all when it is None or empty);
    ties (and NaN scores) go to the smaller alpha."""
    def value(a: float) -> float:
        return -math.inf if math.isnan(scores[a]) else scores[a]

    alphas = sorted(a for a in scores if not eligible or a in eligible)
    best = alphas[0]
    for alpha in alphas[1:]:
        if value(alpha) > value(best):
            best = alpha
    return best


def choose_alpha(project: Project, session: Session, champion: ModelVersion, candidate: ModelVersion,
                 retriever: Retriever, reporter: Reporter, cycle_id: int | None = None) -> WiseResult:
    """Average `champion` and `candidate` for each alpha in `continual.wise_alphas`, keep the one
    scoring best on the dev split, and register it as a new candidate version (method "wise")."""
    role = project.settings.models.student
    if role.backend != "local":
        raise ConfigError("models.student must be a local model for WiSE-FT averaging (backend: local)")
    if not candidate.adapter_path:
        raise StateError(f"candidate {candidate.name} has no adapter to average")
    alphas = sorted({float(a) for a in project.settings.continual.wise_alphas})
    if not alphas:
        raise ConfigError("continual.wise_alphas is empty")
    name = run_name("wise", cycle_id) if cycle_id is not None else f"wise-{candidate.name}"
    path = artifact_path(project.artifacts, KIND, name)
    if not is_complete(path):
        examples = dev_examples(project, session)
        if not examples:
            raise StateError("no dev questions for WiSE-FT: import some with `tuneloop seeds import FILE --split dev`")
        model_dir = resolve_model_path(role.model, project.cache)
        champ_adapter = adapter_folder(champion)
        work = project.artifacts / ".work" / name
        cont = project.settings.continual
        champ_anchor = None
        if cont.anchor and cont.wise_anchor_guard:  # stored: the gate reads the same run
            champ_anchor = evaluate_anchor(project, session, champion, reporter, cycle_id).metrics.get("anchor_score")
        scores: dict[float, float] = {}
        anchor: dict[float, float] = {}
        for alpha in alphas:
            out = work / f"alpha-{alpha:g}"
            safe_rmtree(out, inside=work, ignore_errors=True)
            average_adapters(model_dir, champ_adapter, Path(candidate.adapter_path), alpha, out,
                             project.settings.lora.max_rank)
            reporter.log(f"WiSE-FT: scoring alpha {alpha:g} on {len(examples)} dev questions")
            scores[alpha] = score_adapter(project, out, examples, retriever, reporter)
            if champ_anchor is not None:
                anchor[alpha] = screen_anchor(project, out, reporter, f"WiSE-FT alpha {alpha:g}")
        eligible = {a for a, v in anchor.items() if anchor_guard(project, v, champ_anchor) is None}
        if anchor and not eligible:
            reporter.log(f"WiSE-FT: no alpha keeps the anchor score within {cont.anchor_tolerance} of the "
                         f"champion's {champ_anchor:.3f}; the best dev score is kept (the gate will refuse it)")
        alpha = _best(scores, eligible)  # no screen: eligible is empty, every alpha competes
        chosen = work / f"alpha-{alpha:g}"

        def write(tmp: Path) -> None:
            for f in chosen.iterdir():
                shutil.copy2(f, tmp / f.name)
            (tmp / "dev_scores.json").write_text(json.dumps({f"{a:g}": s for a, s in scores.items()}, indent=2))

        meta = {"stage": "wise", "cycle_id": cycle_id, "base_model": role.model, "alpha": alpha,
                "scores": {f"{a:g}": s for a, s in scores.items()}, "champion": champion.name,
                "anchor_scores": {f"{a:g}": v for a, v in anchor.items()}, "champion_anchor": champ_anchor,
                "candidate": candidate.name, "primary_metric": project.settings.eval.primary_metric,
                "dev_example_ids": [e.id for e in examples]}
        path = write_artifact(project.artifacts, KIND, name, meta, write)
        safe_rmtree(work, inside=project.artifacts, ignore_errors=True)
    return _register(session, path, candidate, cycle_id)


def _register(session: Session, path: Path, candidate: ModelVersion, cycle_id: int | None) -> WiseResult:
    meta = read_meta(path)
    scores = {float(a): s for a, s in meta["scores"].items()}
    anchor = {float(a): v for a, v in (meta.get("anchor_scores") or {}).items()}
    version = register_adapter(
        session, path, candidate, cycle_id, method="wise", base_model=meta["base_model"],
        hyperparams={"alpha": meta["alpha"], "scores": meta["scores"], "champion": meta["champion"],
                     "candidate": meta["candidate"],
                     **({"anchor_scores": meta["anchor_scores"], "champion_anchor": meta["champion_anchor"]}
                        if anchor else {})},
        metrics={f"dev_{meta['primary_metric']}": s for a, s in scores.items() if a == meta["alpha"]
                 and not math.isnan(s)})
    return WiseResult(meta["alpha"], scores, anchor, version, path)
