"""The command line: `tuneloop init | ingest | seeds import | synth | train sft | eval | cycle | status`."""
from __future__ import annotations

import os
import shutil
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from sqlalchemy import func, select

from tuneloop.cli_common import ProjectOpt, console, err_console, fmt_metric, friendly_errors, open_project
from tuneloop.cli_models import models_app
from tuneloop.cli_review import review_app
from tuneloop.cli_store import migrate
from tuneloop.cli_tracking import tracking_app
from tuneloop.config import SETTINGS_FILE, Project, load_project
from tuneloop.errors import InputError, TuneloopError
from tuneloop.progress import RichReporter
from tuneloop.settings_template import default_settings_yaml

# Each command imports what it runs inside its function: stages, models and serving pull in torch,
# transformers and dspy (seconds), and `tuneloop --help` or `status` should not wait for them.
app = typer.Typer(help="tuneloop: keep a domain LLM improving from documents, seeds and feedback.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
seeds_app = typer.Typer(help="Expert-written question/answer pairs.", no_args_is_help=True)
train_app = typer.Typer(help="Fine-tune the student.", no_args_is_help=True)
app.add_typer(seeds_app, name="seeds")
app.add_typer(train_app, name="train")
feedback_app = typer.Typer(help="People's feedback as training data.", no_args_is_help=True)
app.add_typer(feedback_app, name="feedback")
app.add_typer(models_app, name="models")
app.add_typer(tracking_app, name="tracking")
app.add_typer(review_app, name="review")
app.command("migrate")(migrate)
METRIC_COLUMNS = {"macro_score": "macro", "token_f1": "F1", "exact_match": "EM", "rouge_l": "ROUGE-L",
                  "cuad_match": "CUAD", "yes_no_balanced_accuracy": "Y/N bal.acc", "extract_token_f1": "extract F1"}
JUDGE_COLUMNS = {"judge_correctness": "judge correct", "judge_faithfulness": "judge faithful"}  # eval.judge_metrics


def _sample_copies(src_dir: Path, directory: Path) -> dict[Path, Path]:
    """Sample file -> where `init --sample` copies it."""
    copies = {src_dir / name: directory / name for name in ("seeds.jsonl", "dev.jsonl", "heldout.jsonl")}
    contracts = sorted(f for f in (src_dir / "contracts").iterdir() if f.is_file())
    return copies | {f: directory / "documents" / f.name for f in contracts}


@app.command()
@friendly_errors
def init(
    directory: Annotated[Path, typer.Argument(help="Project folder to create.")],
    sample: Annotated[bool, typer.Option(
        help="Copy the bundled sample contracts, seeds, dev and held-out sets.")] = False,
    force: Annotated[bool, typer.Option(help="Overwrite an existing tuneloop.yaml (and sample files).")] = False,
) -> None:
    """Write a commented default tuneloop.yaml (and optionally the sample data)."""
    target = directory / SETTINGS_FILE
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{directory} exists and is not a folder: give a new or existing folder")
    with resources.as_file(resources.files("tuneloop") / "sample") as src_dir:
        copies = _sample_copies(src_dir, directory) if sample else {}
        taken = [p for p in [target, *copies.values()] if p.exists()]
        if taken and not force:  # never overwrite the user's files unasked
            verb = "exists" if len(taken) == 1 else "exist"
            raise TuneloopError(f"{', '.join(map(str, taken))} already {verb} (use --force to overwrite)")
        try:
            (directory / "documents" if sample else directory).mkdir(parents=True, exist_ok=True)
            for from_, to in copies.items():
                shutil.copyfile(from_, to)
            target.write_text(default_settings_yaml(directory.resolve().name, ["documents"] if sample else []),
                              encoding="utf-8")
        except OSError as exc:  # e.g. a parent that is a file, or no permission
            raise InputError(f"cannot write into {directory}: {exc.strerror or exc}") from None
    console.print(f"wrote {target}")
    if sample:
        console.print(f"copied sample documents, seeds.jsonl, dev.jsonl and heldout.jsonl into {directory}")


@app.command()
@friendly_errors
def ingest(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders (.txt .md .pdf .jsonl).")],
    project_dir: ProjectOpt = Path("."),
) -> None:
    """Parse, chunk and index documents (unchanged files are skipped)."""
    from tuneloop.ingest.loaders import iter_files
    from tuneloop.models.registry import build_embedder
    from tuneloop.stages.ingest import ingest_paths

    project, sessions = open_project(project_dir)
    iter_files(paths, require_files=True)  # a missing, empty or unsupported path fails before the embedder loads
    with sessions() as s:
        r = ingest_paths(project, s, paths, build_embedder(project), RichReporter())
        s.commit()
    console.print(f"documents: {len(r.added)} added, {len(r.changed)} changed, {len(r.unchanged)} unchanged; "
                  f"{r.chunks} new chunks; {r.embedded} chunks embedded, {r.reused} vectors reused; "
                  f"index {'rebuilt' if r.index_rebuilt else 'up to date'}")


@seeds_app.command("import")
@friendly_errors
def seeds_import(
    file: Annotated[Path, typer.Argument(help="JSONL or CSV with question, answer, optional source.")],
    split: Annotated[str, typer.Option(
        help="train (seed examples), eval (held-out set) or dev (WiSE-FT mixing weight).")] = "train",
    holdout: Annotated[float, typer.Option(help="with --split train: hold out this share (0-1) of the questions "
                                           "as the eval set, by a stable hash of question and document.")] = 0.0,
    project_dir: ProjectOpt = Path("."),
) -> None:
    """Import expert question/answer pairs."""
    from tuneloop.stages.seeds import import_pairs

    if split not in ("train", "eval", "dev"):
        raise TuneloopError(f"--split must be 'train', 'eval' or 'dev', not '{split}'")
    project, sessions = open_project(project_dir)
    with sessions() as s:
        r = import_pairs(s, file, split, holdout)
        s.commit()
    into = f"split '{split}'"
    if r.held_out:
        into = f"split '{split}' ({r.added - r.held_out}) and 'eval' ({r.held_out})"
    msg = f"imported {r.added} pairs into {into} ({r.duplicates} already there"
    console.print(msg + (f", {r.other_split} skipped: already in the other split)" if r.other_split else ")"))


@app.command()
@friendly_errors
def synth(project_dir: ProjectOpt = Path(".")) -> None:
    """Generate synthetic Q/A pairs with the teacher (self-instruct + grounded) and filter them."""
    from tuneloop.models.registry import build_embedder
    from tuneloop.stages.synth import build_synth_models, synthesize

    project, sessions = open_project(project_dir)
    with sessions() as s:
        embedder = build_embedder(project)
        retriever = _retriever(project, s, embedder)
        r = synthesize(project, s, build_synth_models(project, embedder), retriever, RichReporter())
        s.commit()
    _print_synth_report(r)


def _print_synth_report(r) -> None:
    from rich.table import Table

    rep = r.report
    console.print(f"kept {r.kept} of {r.generated} generated -> {r.artifact / 'data.jsonl'}")
    table = Table("rejected by", "count")
    for reason, n in (rep.get("rejected") or {}).items():
        table.add_row(reason, str(n))
    if rep.get("rejected"):
        console.print(table)
    types = rep.get("question_types", {})
    console.print("question types kept/generated: " + ", ".join(
        f"{t} {types.get('kept', {}).get(t, 0)}/{n}" for t, n in types.get("generated", {}).items()))
    div = rep.get("diversity", {})
    console.print("diversity: " + ", ".join(f"{k} {v}" for k, v in div.items()))


def _retriever(project: Project, session, embedder, version=None):
    """The project's retriever, or with `version` the one that version answers with (its own
    fine-tuned embedder's index, when the cycle's `retriever` step gave it one)."""
    from tuneloop.errors import StateError
    from tuneloop.ingest.index import IndexNotFoundError
    from tuneloop.programs.rag import Retriever

    try:
        if version is not None:
            return Retriever.for_version(project, session, version, embedder)
        return Retriever.load(project, session, embedder)
    except IndexNotFoundError:
        raise StateError("no retrieval index yet: run `tuneloop ingest PATH` first") from None


@train_app.command("sft")
@friendly_errors
def train_sft_cmd(project_dir: ProjectOpt = Path(".")) -> None:
    """LoRA SFT of the student on seeds + synthetic data; registers a candidate version."""
    from tuneloop.models.registry import build_embedder
    from tuneloop.stages.sft import train_sft
    from tuneloop.versions import ensure_base_version

    project, sessions = open_project(project_dir)
    with sessions() as s:
        ensure_base_version(project, s)
        r = train_sft(project, s, _retriever(project, s, build_embedder(project)), RichReporter())
        s.commit()
    console.print(f"candidate {r.version.name}: loss {r.first_loss:.3f} -> {r.last_loss:.3f}; adapter {r.artifact}")


@train_app.command("align")
@friendly_errors
def train_align_cmd(
    method: Annotated[str | None, typer.Option(
        "--method", "-m", help="dpo | orpo | kto | grpo | rloo (default: align.method).")] = None,
    data: Annotated[Path | None, typer.Option(
        "--data", help="A `tuneloop feedback export` folder (default: the store).")] = None,
    project_dir: ProjectOpt = Path("."),
) -> None:
    """Preference alignment (TRL) continuing the champion's adapter; registers a candidate version."""
    from tuneloop.errors import StateError
    from tuneloop.models.registry import build_embedder
    from tuneloop.stages.align import train_align
    from tuneloop.versions import ensure_base_version

    project, sessions = open_project(project_dir)
    with sessions() as s:
        ensure_base_version(project, s)
        try:  # stored prompts need no index; GRPO and pairs without stored prompts do (the stage says so)
            retriever = _retriever(project, s, build_embedder(project))
        except StateError:
            retriever = None
        r = train_align(project, s, retriever, RichReporter(), method=method, data_dir=data)
        s.commit()
    loss = f"loss {r.first_loss:.3f} -> {r.last_loss:.3f}" if r.first_loss is not None else "no loss logged"
    console.print(f"candidate {r.version.name} ({r.method}): {loss}; adapter {r.artifact}")


@app.command("eval")
@friendly_errors
def eval_cmd(
    version: Annotated[list[str] | None, typer.Option("--version", "-v", help="Version(s) to evaluate.")] = None,
    project_dir: ProjectOpt = Path("."),
) -> None:
    """Evaluate versions on the held-out set (default: champion and candidates) and compare them."""
    from tuneloop.errors import StateError
    from tuneloop.models.registry import build_embedder
    from tuneloop.stages.eval import evaluate_version
    from tuneloop.store import ModelVersion
    from tuneloop.versions import Status, ensure_base_version

    project, sessions = open_project(project_dir)
    reporter = RichReporter()
    with sessions() as s:
        ensure_base_version(project, s)
        s.commit()
        if version:
            chosen = [s.scalar(select(ModelVersion).where(ModelVersion.name == v)) for v in version]
            missing = [v for v, m in zip(version, chosen) if m is None]
            if missing:
                raise StateError(f"unknown model version(s): {', '.join(missing)}")
        else:
            current = ModelVersion.status.in_([Status.CHAMPION, Status.CANDIDATE])
            chosen = list(s.scalars(select(ModelVersion).where(current)))
        embedder = build_embedder(project)
        for v in chosen:
            evaluate_version(project, s, v, _retriever(project, s, embedder, v), reporter)
            s.commit()
        console.print(comparison_table(project, s))


def comparison_table(project: Project, session) -> Table:
    """Every version evaluated on the current held-out set, side by side."""
    from tuneloop.evalsets import eval_examples, eval_set_hash
    from tuneloop.store import EvalRun, ModelVersion

    set_hash = eval_set_hash(eval_examples(project, session))
    rows = session.execute(select(ModelVersion, EvalRun).join(EvalRun, EvalRun.model_version_id == ModelVersion.id)
                           .where(EvalRun.eval_set_hash == set_hash).order_by(ModelVersion.id)).all()
    primary = project.settings.eval.primary_metric
    table = Table(title=f"held-out set ({rows[0][1].n if rows else 0} questions; primary metric: {primary})")
    table.add_column("version")
    table.add_column("status")
    columns = dict(METRIC_COLUMNS)
    if any(k in run.metrics for _, run in rows for k in JUDGE_COLUMNS):
        columns.update(JUDGE_COLUMNS)
    for label in columns.values():
        table.add_column(label, justify="right")
    for version, run in rows:
        cells = [fmt_metric(run.metrics.get(c)) for c in columns]
        table.add_row(version.name, version.status, *cells)
    return table


@app.command()
@friendly_errors
def cycle(
    trigger: Annotated[str, typer.Option(help="Why this cycle runs (recorded on the cycle).")] = "manual",
    project_dir: ProjectOpt = Path("."),
) -> None:
    """Run one full cycle (ingest -> synth -> sft -> rlaif -> align -> eval -> gate), resuming an unfinished one."""
    from tuneloop.loop import run_cycle
    from tuneloop.store import open_store

    project = load_project(project_dir)
    c = run_cycle(project, RichReporter(), trigger=trigger)
    console.print(f"cycle {c.id} done: {c.outcome}")
    with open_store(project.store_url)() as s:
        console.print(comparison_table(project, s))


@app.command()
@friendly_errors
def watch(
    once: Annotated[bool, typer.Option(help="Check the signals once (and run a cycle if one fires), then exit.")
                    ] = False,
    project_dir: ProjectOpt = Path("."),
) -> None:
    """Watch the monitoring signals and start a cycle when one fires (one at a time; resumes an
    unfinished cycle first). Runs until Ctrl-C unless --once."""
    from tuneloop.loop import run_cycle
    from tuneloop.models.registry import build_embedder
    from tuneloop.monitor.watch import watch as run_watch

    project = load_project(project_dir)
    m = project.settings.monitor
    if not once:
        console.print(f"watching {project.root} every {m.interval_seconds:g} s (cooldown {m.cooldown_seconds:g} s); "
                      "Ctrl-C stops")
    ticks = run_watch(project, RichReporter(), build_embedder(project), run_cycle, once=once)
    _print_signals(ticks[-1].readings)


@app.command()
@friendly_errors
def monitor(project_dir: ProjectOpt = Path(".")) -> None:
    """Check and record every monitoring signal once, without starting a cycle."""
    from tuneloop.models.registry import build_embedder
    from tuneloop.monitor.signals import check_signals

    project, sessions = open_project(project_dir)
    with sessions() as s:
        readings = check_signals(project, s, build_embedder(project))
        s.commit()
    _print_signals(readings)


@app.command()
@friendly_errors
def report(
    out: Annotated[Path, typer.Option("--out", "-o", help="The HTML file to write.")] = Path("tuneloop-report.html"),
    project_dir: ProjectOpt = Path("."),
) -> None:
    """Write one self-contained HTML report: versions with CIs, cycles, feedback, signals, gate reasons."""
    from tuneloop.report import write_report

    project, sessions = open_project(project_dir)
    with sessions() as s:
        path = write_report(project, s, out)
    console.print(f"report written to {path}")


def _print_signals(readings) -> None:
    if not readings:
        return
    table = Table(title="monitoring signals")
    for col in ("signal", "value", "fired", "why"):
        table.add_column(col)
    for r in readings:
        table.add_row(r.signal, fmt_metric(r.value), "[bold red]yes[/bold red]" if r.fired else "no", r.reason)
    console.print(table)


@app.command()
@friendly_errors
def rlaif(
    mode: Annotated[str | None, typer.Option(help="pairwise or rubric (default: feedback.rlaif_mode).")] = None,
    prompts: Annotated[int | None, typer.Option(min=1, help="How many prompts (default: feedback.rlaif_prompts).")
                       ] = None,
    name: Annotated[str | None, typer.Option(help="Artifact name (default: timestamped).")] = None,
    project_dir: ProjectOpt = Path("."),
) -> None:
    """AI feedback: sample champion answers, have the judge compare them in both orders (or score them).

    Prompts: recent interactions, then synthetic questions, then the training seeds' questions."""
    from tuneloop.models.registry import build_embedder
    from tuneloop.programs.prompts import PromptBuilder
    from tuneloop.stages.rlaif import build_rlaif_models
    from tuneloop.stages.rlaif import rlaif as run_rlaif
    from tuneloop.versions import ensure_base_version

    if mode is not None and mode not in ("pairwise", "rubric"):
        raise TuneloopError(f"--mode must be 'pairwise' or 'rubric', not '{mode}'")
    project, sessions = open_project(project_dir)
    with sessions() as s:
        ensure_base_version(project, s)
        s.commit()
        builder = PromptBuilder(s, lambda: _retriever(project, s, build_embedder(project)))
        r = run_rlaif(project, s, lambda: build_rlaif_models(project, s), builder, RichReporter(), mode=mode,
                      limit=prompts, name=name)
        s.commit()
    _print_rlaif_report(r)


def _print_rlaif_report(r) -> None:
    rep = r.report
    table = Table(title=f"RLAIF ({rep['mode']}; judge {rep['judge']})")
    table.add_column("what")
    table.add_column("value", justify="right")
    p, c = rep["prompts"], rep["candidates"]
    table.add_row("prompts (interactions + synthetic + seeds)",
                  f"{p['total']} ({p['from_interactions']} + {p['from_synthetic']} + {p.get('from_seeds', 0)})")
    table.add_row("distinct candidates", f"{c['distinct']} of {c['sampled']} sampled")
    if rep["mode"] == "pairwise":
        table.add_row("pairs judged (both orders)", str(rep["pairs_judged"]))
        table.add_row("consistent / inconsistent / ties / unparsed",
                      f"{rep['consistent']} / {rep['inconsistent']} / {rep['ties']} / {rep['unparsed']}")
        table.add_row("kept preference pairs", f"{r.pairs} ({r.added.get('pairs', 0)} new in the store)")
        table.add_row("of which decided by the expert's answer", str(rep.get("reference_pairs", 0)))
        table.add_row("first position wins", fmt_metric(rep["position_bias"]["first_position_rate"]))
    else:
        ru = rep["rubric"]
        table.add_row("answers scored / unparsed", f"{ru['scored']} / {ru['unparsed']}")
        table.add_row("rewards (mean)", f"{ru['rewards']} ({fmt_metric(ru['mean_reward'])})")
    cal = rep.get("calibration") or {}
    if cal.get("pairs"):
        table.add_row("agreement with people",
                      f"{fmt_metric(cal['agreement'])} ({cal['agree']} of {cal['pairs']} pairs; "
                      f"{cal['inconsistent']} inconsistent, {cal['unparsed']} unparsed)")
    else:
        table.add_row("agreement with people", "- (no human A/B choices or corrections yet)")
    console.print(table)
    console.print(f"artifact: {r.artifact}", soft_wrap=True)


@feedback_app.command("export")
@friendly_errors
def feedback_export(
    name: Annotated[str | None, typer.Option(help="Artifact name (default: timestamped).")] = None,
    ai: Annotated[bool, typer.Option("--ai/--no-ai", help="Include the AI judge's pairs and rewards.")] = True,
    project_dir: ProjectOpt = Path("."),
) -> None:
    """Write feedback as datasets: preference pairs (DPO/ORPO), KTO examples and rewards."""
    from tuneloop.feedback.export import export_feedback
    from tuneloop.models.registry import build_embedder
    from tuneloop.programs.prompts import PromptBuilder

    project, sessions = open_project(project_dir)
    with sessions() as s:
        builder = PromptBuilder(s, lambda: _retriever(project, s, build_embedder(project)))
        r = export_feedback(project, s, builder, RichReporter(), name=name, include_ai=ai)
        s.commit()
    rep = r.report
    table = Table(title=f"feedback export (contradictions: {rep['rule']})")
    for col in ("dataset", "rows", "file"):
        table.add_column(col)
    for kind in ("preferences", "kto", "rewards"):
        table.add_row(kind, str(r.counts[kind]), str(r.path(kind)))
    console.print(table)
    th, ch = rep["thumbs"], rep["choices"]
    console.print(f"thumbs: {th['votes']} votes on {th['answers']} answers, {th['contradictions']} contradictory; "
                  f"A/B: {ch['votes']} choices on {ch['ab_pairs']} pairs; corrections: {rep['corrections']['rows']}; "
                  f"ratings: {rep['ratings']['ratings']}; store: +{rep['store']['pairs_added']} pairs, "
                  f"+{rep['store']['rewards_added']} rewards", soft_wrap=True)


@app.command()
@friendly_errors
def status(project_dir: ProjectOpt = Path(".")) -> None:
    """Champion, model versions, the last cycle and its steps, and data counts."""
    from tuneloop.review.queue import open_count
    from tuneloop.store import Chunk, Cycle, CycleStep, Document, Example, Feedback, Interaction, ModelVersion
    from tuneloop.versions import champion

    project, sessions = open_project(project_dir)
    primary = project.settings.eval.primary_metric
    with sessions() as s:
        champ = champion(s)
        console.print(f"project [bold]{project.settings.project}[/bold] at {project.root}")
        console.print(f"champion: [bold]{champ.name if champ else 'none yet'}[/bold]")
        counts = Table(title="data")
        counts.add_column("what")
        counts.add_column("count", justify="right")
        counts.add_row("documents", str(s.scalar(select(func.count(Document.id)))))
        counts.add_row("chunks", str(s.scalar(select(func.count(Chunk.id)))))
        for kind, split, n in s.execute(select(Example.kind, Example.split, func.count(Example.id))
                                        .group_by(Example.kind, Example.split)):
            counts.add_row(f"examples: {kind} / {split}", str(n))
        counts.add_row("interactions", str(s.scalar(select(func.count(Interaction.id)))))
        counts.add_row("feedback", str(s.scalar(select(func.count(Feedback.id)))))
        counts.add_row("review queue: open", str(open_count(s)))
        console.print(counts)
        versions = Table(title="model versions")
        for col in ("name", "parent", "method", "status", primary, "cycle"):
            versions.add_column(col)
        names = {v.id: v.name for v in s.scalars(select(ModelVersion))}
        for v in s.scalars(select(ModelVersion).order_by(ModelVersion.id)):
            versions.add_row(v.name, names.get(v.parent_id, "-"), v.method, v.status,
                             fmt_metric((v.metrics or {}).get(primary)), str(v.cycle_id or "-"))
        console.print(versions)
        last = s.scalar(select(Cycle).order_by(Cycle.id.desc()))
        if last is None:
            console.print("no cycle yet (run `tuneloop cycle`)")
            return
        console.print(f"last cycle {last.id}: {last.status} (trigger: {last.trigger}) {last.outcome or ''}")
        steps = Table()
        for col in ("step", "status", "started", "finished"):
            steps.add_column(col)
        steps.add_column("minutes", justify="right")
        total = 0.0
        for st in s.scalars(select(CycleStep).where(CycleStep.cycle_id == last.id).order_by(CycleStep.id)):
            took = (st.finished_at - st.started_at).total_seconds() / 60 if st.finished_at and st.started_at else None
            total += took or 0.0
            steps.add_row(st.name, st.status, str(st.started_at)[:19], str(st.finished_at or "")[:19],
                          "" if took is None else f"{took:.1f}")
        steps.add_row("all", "", "", "", f"{total:.1f}")
        console.print(steps)


@app.command()
@friendly_errors
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on (default: serve.host).")] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="Port (default: serve.port).")] = None,
    ab: Annotated[bool, typer.Option("--ab", help="A/B mode: answer with champion and challenger.")] = False,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="Accept clients without an API key (loopback "
                                                            "addresses only).")] = False,
    project_dir: ProjectOpt = Path("."),
) -> None:
    """Serve the champion: OpenAI-compatible API, feedback API and web pages (uvicorn)."""
    import copy

    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    from tuneloop.errors import ConfigError
    from tuneloop.serve import create_app
    from tuneloop.serve.auth import is_loopback

    project = load_project(project_dir)
    if ab:
        project.settings.serve.ab_mode = True
    s = project.settings.serve
    host, port = host or s.host, port or s.port
    if no_auth:
        if not is_loopback(host):
            raise ConfigError(f"--no-auth lets anyone in without a key, so it serves only on a loopback address "
                              f"(127.0.0.1, ::1, localhost), not '{host}'; set {s.api_keys_env} to serve there")
    web_app = create_app(project, auth=not no_auth)
    served = web_app.state.models.current()
    if no_auth:
        err_console.print(f"[bold yellow]WARNING: --no-auth: no API key needed; every local user is client "
                          f"'anonymous' and reads and rates every anonymous answer (admin pages still need "
                          f"{s.admin_token_env}).[/bold yellow]", soft_wrap=True)
    challenger = f", challenger {served.challenger.name}" if served.challenger else ""
    console.print(f"serving champion {served.champion.name}{challenger} at http://{host}:{port} "
                  f"(web page /, admin /admin, API /v1{'; A/B mode' if s.ab_mode else ''})", soft_wrap=True)
    log_config = copy.deepcopy(LOGGING_CONFIG)  # uvicorn's, plus our champion swaps and internal errors
    log_config["loggers"]["tuneloop"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    uvicorn.run(web_app, host=host, port=port, log_config=log_config)


@app.command("export")
@friendly_errors
def export_cmd(
    version: Annotated[str, typer.Argument(help="Version to export (e.g. v3, base).")],
    out: Annotated[Path, typer.Argument(help="Output folder (created; must be empty unless --force).")],
    gguf: Annotated[bool, typer.Option("--gguf", help=(
        "Also write OUT/model.gguf (f32/f16, Llama-architecture models with a byte-level BPE tokenizer, via "
        "the `gguf` package). Otherwise run llama.cpp's convert_hf_to_gguf.py on OUT."))] = False,
    force: Annotated[bool, typer.Option(help="Replace an earlier tuneloop export at OUT (one holding "
                                            ".tuneloop-export); any other non-empty folder is refused.")] = False,
    project_dir: ProjectOpt = Path("."),
) -> None:
    """Merge a version's LoRA adapter into its base model and write a standalone Hugging Face folder
    (safetensors, tokenizer with chat template, tuneloop.json) that transformers or vLLM can load."""
    from tuneloop.export import export_version

    project, sessions = open_project(project_dir)
    with sessions() as s:
        r = export_version(project, s, version, out, gguf=gguf, force=force)
    console.print(f"exported {version} to {r.path}" + (f"; gguf {r.gguf_path}" if r.gguf_path else ""),
                  soft_wrap=True)


def main() -> None:  # pragma: no cover - console entry point
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tuneloop never downloads models
    quiet_libraries()
    app()


def quiet_libraries() -> None:
    """Our progress bars replace the libraries' own bars and chatter."""
    import logging
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
