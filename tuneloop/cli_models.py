"""`tuneloop models`: the version tree, what changed between two versions, manual promotion."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from tuneloop.cli_common import ProjectOpt, console, fmt_metric, friendly_errors, open_project

# As in cli.py, each command imports what it runs inside its function (start-up stays fast).
models_app = typer.Typer(help="Model versions: lineage tree, diff, manual promotion (rollback or forward).")


@models_app.callback(invoke_without_command=True)
@friendly_errors
def models_tree(ctx: typer.Context, project_dir: ProjectOpt = Path(".")) -> None:
    """The version tree from the base model (method, status, primary metric, cycle, created)."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.tree import Tree

    from tuneloop.lineage import fmt_time, version_tree
    from tuneloop.versions import promotions

    project, sessions = open_project(project_dir)
    primary = project.settings.eval.primary_metric
    with sessions() as s:
        roots = version_tree(s)
        if not roots:
            console.print("no model versions yet (the base model is registered by `tuneloop eval`, "
                          "`tuneloop train sft` or `tuneloop cycle`)")
            return
        tree = Tree(f"[bold]model versions[/bold] (primary metric: {primary})")

        def label(v) -> str:
            champ = " [bold green]* champion[/bold green]" if v.status == "champion" else ""
            style = {"champion": "green", "rejected": "red", "retired": "dim", "candidate": "yellow"}.get(v.status, "")
            status = f"[{style}]{v.status}[/{style}]" if style else escape(v.status)
            cycle_txt = f"cycle {v.cycle_id}" if v.cycle_id is not None else "no cycle"
            return (f"[bold]{escape(v.name)}[/bold]{champ}  {escape(v.method)}  {status}  "
                    f"{primary} {fmt_metric((v.metrics or {}).get(primary))}  {cycle_txt}  {fmt_time(v.created_at)}")

        def add(branch, node) -> None:
            sub = branch.add(label(node.version))
            for child in node.children:
                add(sub, child)

        for root in roots:
            add(tree, root)
        console.print(tree)
        history = promotions(s)
        if history:
            last = history[-1]
            console.print(f"last promotion: {last.get('from') or '-'} -> {last.get('to')} "
                          f"({last.get('reason', '')}, {last.get('direction', '')}, {str(last.get('at', ''))[:19]})")


@models_app.command("diff")
@friendly_errors
def models_diff(
    a: Annotated[str, typer.Argument(help="First version (e.g. base, v1).")],
    b: Annotated[str, typer.Argument(help="Second version.")],
    project_dir: ProjectOpt = Path("."),
) -> None:
    """What changed from A to B: method, parent, hyperparameters, training data, metrics."""
    from tuneloop.lineage import diff_versions, get_version

    project, sessions = open_project(project_dir)
    with sessions() as s:
        va, vb = get_version(s, a), get_version(s, b)
        d = diff_versions(s, va, vb)
        info = Table(title=f"{va.name} -> {vb.name}")
        for col in ("", va.name, vb.name):
            info.add_column(col)
        for name, x, y in d.fields:
            mark = "" if x == y else " [yellow](changed)[/yellow]"
            info.add_row(name, escape(str(x)), escape(str(y)) + mark)
        console.print(info)
        if d.hyperparams:
            console.print("hyperparameters that differ:")
            for key, x, y in d.hyperparams:
                console.print(f"  {escape(key)}: {escape(repr(x))} -> {escape(repr(y))}", soft_wrap=True)
        else:
            console.print("hyperparameters: identical")
        data = Table(title="training data")
        for col in ("", va.name, vb.name):
            data.add_column(col)
        data.add_row("examples", str(len(d.data_a.ids)), str(len(d.data_b.ids)))
        data.add_row("data hash", (d.data_a.data_hash or "-")[:16], (d.data_b.data_hash or "-")[:16])
        if d.data_a.missing or d.data_b.missing:
            data.add_row("ids no longer in the store", str(d.data_a.missing), str(d.data_b.missing))
        console.print(data)
        console.print(f"examples only in {va.name}: {d.only_a}; only in {vb.name}: {d.only_b}; shared: {d.shared}"
                      f" ({'same' if d.same_data else 'different'} training data)")
        if d.metrics:
            m = Table(title="metrics")
            for col in ("source", "metric", va.name, vb.name, "delta"):
                m.add_column(col, justify="right" if col in (va.name, vb.name, "delta") else "left")
            for row in d.metrics:
                delta = row.delta
                m.add_row(row.source, row.metric, fmt_metric(row.a), fmt_metric(row.b),
                          "-" if delta is None else f"{delta:+.3f}")
            console.print(m)
        else:
            console.print("metrics: none recorded")


@models_app.command("promote")
@friendly_errors
def models_promote(
    version: Annotated[str, typer.Argument(help="Version to make the champion (older: rollback; newer: forward).")],
    project_dir: ProjectOpt = Path("."),
) -> None:
    """Make VERSION the champion; the current champion is retired. `tuneloop serve` swaps it in."""
    from tuneloop.lineage import promote
    from tuneloop.tracking import mirror

    project, sessions = open_project(project_dir)
    with sessions() as s:
        p = promote(s, version)
        s.commit()
    if p.changed:
        mirror(project, sessions, console.print)  # tracking.mlflow: the champion alias follows (never fails)
    if not p.changed:
        console.print(f"{p.version.name} is already the champion; nothing to do")
        return
    prev = f" ({p.previous.name} retired)" if p.previous else ""
    console.print(f"promoted {p.version.name} to champion{prev}: {p.direction}")
