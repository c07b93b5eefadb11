"""Fault bench: SIGKILL `tuneloop cycle` at every step boundary and in the middle of every step,
rerun it, and compare the final store with an uninterrupted run; then kill a server mid-way
through a feedback load and check every acknowledged post is stored exactly once.

Part 1 (cycle). A project on the tests' tiny random-weight model with the scripted teacher
(tests/helpers.py) runs one full cycle uninterrupted, twice: the reference, and a second run whose
differences from it are the noise floor (files that hold timings). Then, for every step that ran,
two faulted runs on fresh copies of the project:
- "after STEP": the child kills itself (SIGKILL) right after STEP's done row is committed;
- "during STEP": a timer kills it half-way through STEP (half of the reference run's duration).
Each killed project is then run again to the end (`tuneloop cycle` resumes), and its store is
compared with the reference: the rows of every table (ids and times left out; row ids that point
at other rows replaced by those rows' content), the content hash of every artifact file, and
leftovers (`.tmp-*`, `.*.old-*`, unfinished training work, artifact folders no row knows).

Part 2 (server). `tuneloop serve` (the tiny model) answers a few questions, then client threads
post feedback with an Idempotency-Key each; the server is SIGKILLed part-way through; a new server
starts on the same project and every post that got no answer is sent again with the same key.
Checks: every acknowledged post is in the store once, retried posts are not duplicated, and no
post is lost.

Prints a table per part and the command; writes docs/benchmarks/faults.json. Exits 1 if a check
failed.

    .venv/bin/python bench/faults.py [--steps ingest,sft] [--skip-server] [--keep DIR]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import httpx  # noqa: E402
import yaml  # noqa: E402
from sqlalchemy import select  # noqa: E402

from tests.helpers import (  # noqa: E402
    CONTRACTS,
    HELDOUT,
    KILLABLE_PROJECT,
    SEEDS,
    build_tiny_model,
    deep_merge,
    tiny_settings,
    write_settings,
)
from tuneloop import store as st  # noqa: E402
from tuneloop.config import load_project  # noqa: E402
from tuneloop.stages.seeds import import_pairs  # noqa: E402

OUT_JSON = ROOT / "docs" / "benchmarks" / "faults.json"
# The child: `tuneloop cycle` with the scripted teacher, and the fault named by $TUNELOOP_FAULT
# ("after:STEP" or "during:STEP:SECONDS") installed by wrapping the loop's own functions.
CHILD = r"""
import os, signal, sys, threading
sys.path.insert(0, {repo!r})
from tests.helpers import FakeTeacher
import tuneloop.models.registry as registry
from tuneloop import loop
from tuneloop import cli

teacher, real_build = FakeTeacher(), registry.build_chat_model
def build(project, role, adapter=None):
    return teacher if role is project.settings.models.teacher else real_build(project, role, adapter)
registry.build_chat_model = build

def die():
    os.kill(os.getpid(), signal.SIGKILL)

fault = os.environ.get("TUNELOOP_FAULT", "")
if fault.startswith("after:"):
    target, run_step = fault.split(":")[1], loop.run_step
    def run_step_then_die(sessions, ctx, name):
        run_step(sessions, ctx, name)
        if name == target:
            die()
    loop.run_step = run_step_then_die
elif fault.startswith("during:"):
    _, target, seconds = fault.split(":")
    step_fn = loop.STEP_FUNCTIONS[target]
    def step_then_die(ctx, s):
        threading.Timer(float(seconds), die).start()
        step_fn(ctx, s)
        die()  # the step finished before the timer: die before its done row is committed
    loop.STEP_FUNCTIONS[target] = step_then_die
sys.argv = ["tuneloop", "cycle", "--project", {root!r}]
cli.main()
"""


# ----------------------------------------------------------------------------- running a cycle


# Every optional step runs, so each one is killed while it works: DAPT on a few chunks, DPO on
# human preference pairs, WiSE-FT with a dev split (prompts needs a DSPy-capable student: skipped).
FAULT_PROJECT = deep_merge(KILLABLE_PROJECT, {
    "continual": {"dapt": True, "dapt_max_chunks": 8, "wise_ft": True, "wise_alphas": [0.5, 1.0]},
    "align": {"save_steps": 1, "epochs": 4, "balance_yes_no": False},
})
DEV_ITEMS = 8  # held-out sample questions that become the dev split instead


def make_project(root: Path, model_dir: Path) -> Path:
    """A fresh project: the sample contracts, the tests' tiny settings with the kill test's training
    (40 short SFT steps, a checkpoint after each) and FAULT_PROJECT, the sample seeds (train), the
    held-out questions (eval, the first DEV_ITEMS dev) and 6 human preference pairs."""
    root.mkdir(parents=True)
    shutil.copytree(CONTRACTS, root / "documents")
    write_settings(root, deep_merge(tiny_settings(model_dir, name="faults"), FAULT_PROJECT))
    heldout = HELDOUT.read_text(encoding="utf-8").splitlines(keepends=True)
    (root.parent / "dev.jsonl").write_text("".join(heldout[:DEV_ITEMS]), encoding="utf-8")
    (root.parent / "eval.jsonl").write_text("".join(heldout[DEV_ITEMS:]), encoding="utf-8")
    seeds = [json.loads(line) for line in SEEDS.read_text(encoding="utf-8").splitlines() if line.strip()]
    with st.open_store(load_project(root).store_url)() as s:
        for path, split in ((SEEDS, "train"), (root.parent / "dev.jsonl", "dev"), (root.parent / "eval.jsonl", "eval")):
            import_pairs(s, path, split)
        for seed in seeds[:6]:
            s.add(st.PreferencePair(prompt=seed["question"], chosen=seed["answer"], rejected="I do not know.",
                                    source="human", meta={}))
        s.commit()
    return root


def run_child(root: Path, fault: str, log: Path, timeout: float = 900) -> tuple[int, float]:
    """Run the cycle child on `root` with `fault`; (return code, seconds)."""
    # PYTHONHASHSEED: set iteration order (PEFT's target_modules, BM25's vocabulary) is then the
    # same in every run, so those files can be compared byte for byte.
    env = {**os.environ, "TUNELOOP_FAULT": fault, "PYTHONHASHSEED": "0", "TUNELOOP_CACHE": str(root.parent / "cache"),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    with log.open("ab") as out:
        out.write(f"\n=== fault={fault or 'none'}\n".encode())
        out.flush()
        proc = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(ROOT), root=str(root))], env=env,
                              cwd=root, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    return proc.returncode, time.perf_counter() - start


def step_durations(root: Path) -> dict[str, float]:
    """Seconds each step of the project's first cycle took (finished ones only)."""
    with st.open_store(load_project(root).store_url)() as s:
        rows = s.scalars(select(st.CycleStep).order_by(st.CycleStep.id)).all()
        return {r.name: (r.finished_at - r.started_at).total_seconds() for r in rows
                if r.finished_at is not None and r.status == "done"}


# ----------------------------------------------------------------------------- comparing stores


def _sha(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _rel(path: str | None, root: Path) -> str | None:
    return None if path is None else os.path.relpath(path, root)


def store_rows(root: Path) -> dict[str, list]:
    """Every table's rows as sorted tuples of content: no ids, no times; references by content."""
    project = load_project(root)
    with st.open_store(project.store_url)() as s:
        docs = {d.id: d.name for d in s.scalars(select(st.Document))}
        examples = {e.id: e.content_hash for e in s.scalars(select(st.Example))}
        versions = {v.id: v.name for v in s.scalars(select(st.ModelVersion))}
        interactions = {i.id: _sha(i.question, i.answer) for i in s.scalars(select(st.Interaction))}
        rows: dict[str, list] = {
            "documents": [(d.name, d.sha256, d.n_chars) for d in s.scalars(select(st.Document))],
            "chunks": [(docs[c.document_id], c.position, c.start, c.end, _sha(c.text))
                       for c in s.scalars(select(st.Chunk))],
            "examples": [(e.kind, e.split, e.document, e.content_hash) for e in s.scalars(select(st.Example))],
            "model_versions": [(v.name, v.method, v.status, versions.get(v.parent_id), _rel(v.adapter_path, root),
                                sorted(examples.get(i, f"missing:{i}") for i in v.training_example_ids or []),
                                _without_times(v.metrics))
                               for v in s.scalars(select(st.ModelVersion))],
            "eval_runs": [(versions[r.model_version_id], r.eval_set_hash, r.n, _rel(r.artifact_path, root),
                           _without_times(r.metrics))
                          for r in s.scalars(select(st.EvalRun))],
            # a promotion's record is named by its time: compared by what it says instead
            "artifacts": [(a.kind, _rel(a.path, root)) if a.kind != "promotion" else
                          (a.kind, (a.meta or {}).get("from"), (a.meta or {}).get("to"), (a.meta or {}).get("reason"))
                          for a in s.scalars(select(st.Artifact))],
            "cycles": [(c.id, c.status, c.trigger, c.outcome) for c in s.scalars(select(st.Cycle))],
            "cycle_steps": [(c.cycle_id, c.name, c.status) for c in s.scalars(select(st.CycleStep))],
            "preference_pairs": [(p.source, _sha(p.prompt, p.chosen, p.rejected))
                                 for p in s.scalars(select(st.PreferencePair))],
            "rewards": [(r.source, _sha(r.prompt, r.completion), r.reward, interactions.get(r.interaction_id))
                        for r in s.scalars(select(st.Reward))],
            "feedback": [(interactions.get(f.interaction_id), f.thumbs, f.rating, f.corrected_answer)
                         for f in s.scalars(select(st.Feedback))],
        }
    return {name: sorted(map(json.dumps, value)) for name, value in rows.items()}


# Keys of JSON files that hold times, not content (artifact meta.json, the trainer's log history),
# and two counters that a resumed training run restarts (measured: everything else in the log, the
# per-step losses included, and the adapter weights are identical after a mid-training kill):
# `train_loss` of the trainer's closing summary (transformers averages it over the steps trained
# since the resume) and TRL's running `num_tokens` (not kept in the checkpoint).
VOLATILE_KEY = re.compile(r"(_at|_runtime|_per_second|seconds|^train_loss|^num_tokens)$")


def _without_times(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if not VOLATILE_KEY.search(k)}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under the project's artifacts and index (relative path -> hash); JSON
    files are hashed without their time keys."""
    project = load_project(root)
    found = {}
    for base in (project.artifacts, project.index_dir):
        if base.is_dir():
            for f in sorted(base.rglob("*")):
                if not f.is_file():
                    continue
                data = f.read_bytes()
                if f.suffix == ".json":
                    data = json.dumps(_without_times(json.loads(data)), sort_keys=True).encode()
                found[str(f.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return found


def leftovers(root: Path) -> list[str]:
    """What a killed run may leave behind that the finished rerun should have cleaned up."""
    project = load_project(root)
    left = [str(p.relative_to(root)) for p in root.rglob("*")
            if p.name.startswith(".tmp-") or (p.name.startswith(".") and ".old-" in p.name)]
    work = project.artifacts / ".work"
    if work.is_dir():
        left += [str(p.relative_to(root)) for p in work.iterdir()]
    with st.open_store(project.store_url)() as s:
        known = {Path(a.path).resolve() for a in s.scalars(select(st.Artifact))}
        known |= {Path(v.adapter_path).resolve() for v in s.scalars(select(st.ModelVersion)) if v.adapter_path}
        known |= {Path(r.artifact_path).resolve() for r in s.scalars(select(st.EvalRun))}
    if project.artifacts.is_dir():
        for kind in project.artifacts.iterdir():
            if kind.is_dir() and not kind.name.startswith("."):
                left += [str(p.relative_to(root)) for p in kind.iterdir()
                         if p.is_dir() and not p.name.startswith(".") and p.resolve() not in known]
    return sorted(left)


def signature(root: Path) -> dict[str, Any]:
    """What a finished project holds: its rows, the content hash of each artifact file, leftovers."""
    return {"rows": store_rows(root), "files": file_hashes(root), "leftovers": leftovers(root)}


def compare(ref: dict[str, Any], other: dict[str, Any], volatile: set[str]) -> dict[str, Any]:
    """Differences between two signatures: tables whose rows differ, files whose content differs."""
    tables = {t: {"only_reference": len(set(ref["rows"][t]) - set(other["rows"][t])),
                  "only_rerun": len(set(other["rows"][t]) - set(ref["rows"][t]))}
              for t in ref["rows"] if ref["rows"][t] != other["rows"][t]}
    ref_files, files = ref["files"], other["files"]
    changed = sorted(f for f in set(ref_files) & set(files) if ref_files[f] != files[f] and f not in volatile)
    return {"tables": tables, "missing_files": sorted(set(ref_files) - set(files)),
            "extra_files": sorted(set(files) - set(ref_files)), "changed_files": changed,
            "rows": sum(len(v) for v in other["rows"].values()), "files": len(files)}


def differs(diff: dict[str, Any]) -> int:
    return len(diff["tables"]) + len(diff["missing_files"]) + len(diff["extra_files"]) + len(diff["changed_files"])


# ----------------------------------------------------------------------------- part 1


def faulted_run(template: Path, root: Path, fault: str, log: Path) -> dict[str, Any]:
    """Copy the template to `root` (always the same path, so stored paths compare equal), run the
    cycle with `fault`, then (if it was killed) run it again; the exits and the final signature."""
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(template, root)
    killed_code, _ = run_child(root, fault, log) if fault else (None, 0.0)
    left_by_kill = leftovers(root) if fault else []
    code, seconds = run_child(root, "", log)
    return {"killed_exit": killed_code, "rerun_exit": code, "rerun_s": round(seconds, 1),
            "left_by_kill": left_by_kill, "durations": step_durations(root),
            "signature": signature(root) if code == 0 else None}


def cycle_faults(work: Path, steps_wanted: list[str] | None) -> dict[str, Any]:
    model_dir = build_tiny_model(work / "tiny-model")
    template = make_project(work / "template", model_dir)
    log, root = work / "cycle.log", work / "project"

    reference = faulted_run(template, root, "", log)
    second = faulted_run(template, root, "", log)
    if reference["signature"] is None or second["signature"] is None:
        raise SystemExit(f"an uninterrupted run failed; see {log}")
    print(f"uninterrupted cycle: {reference['rerun_s']} s and {second['rerun_s']} s", flush=True)
    durations = reference["durations"]
    noise = compare(reference["signature"], second["signature"], set())
    volatile = set(noise["changed_files"])  # timings and the like: differ between two clean runs too
    print(f"noise floor: {len(volatile)} files differ between two uninterrupted runs (left out of the "
          f"comparison), tables differing: {list(noise['tables'])}: {sorted(volatile)}", flush=True)

    results = []
    for step in [s for s in durations if steps_wanted is None or s in steps_wanted]:
        for kind in ("after", "during"):
            delay = max(durations[step] / 2, 0.01)
            fault = f"after:{step}" if kind == "after" else f"during:{step}:{delay:.3f}"
            run = faulted_run(template, root, fault, log)
            sig = run.pop("signature")
            diff = compare(reference["signature"], sig, volatile) if sig is not None else None
            left = sig["leftovers"] if sig is not None else []
            ok = (run["killed_exit"] == -signal.SIGKILL and run["rerun_exit"] == 0 and diff is not None
                  and differs(diff) == 0 and not left)
            run.pop("durations")
            results.append({"step": step, "kill": kind, "delay_s": round(delay, 3) if kind == "during" else None,
                            **run, "leftovers_after_rerun": left, "diff": diff, "ok": ok})
            print(f"{kind:>6} {step:<8} killed={run['killed_exit']} rerun={run['rerun_exit']} "
                  f"({run['rerun_s']} s) left by kill={len(run['left_by_kill'])} "
                  f"differences={differs(diff) if diff else '-'} leftovers={len(left)} -> {'ok' if ok else 'FAIL'}",
                  flush=True)
    return {"step_seconds": {k: round(v, 2) for k, v in durations.items()},
            "uninterrupted_s": reference["rerun_s"], "noise_floor": noise, "volatile_files": sorted(volatile),
            "runs": results}


def print_cycle_table(part: dict[str, Any]) -> None:
    print("\n| kill | step | killed exit | left by the kill | rerun exit | rerun s | tables differing | "
          "files differing | leftovers after rerun | ok |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in part["runs"]:
        d = r["diff"] or {}
        files = len(d.get("changed_files", [])) + len(d.get("missing_files", [])) + len(d.get("extra_files", []))
        when = f"during ({r['delay_s']} s)" if r["kill"] == "during" else "after"
        print(f"| {when} | {r['step']} | {r['killed_exit']} | {len(r['left_by_kill'])} | {r['rerun_exit']} | "
              f"{r['rerun_s']} | "
              f"{', '.join(d.get('tables', {})) or '-'} | {files} | {len(r['leftovers_after_rerun'])} | "
              f"{'yes' if r['ok'] else 'NO'} |")


# ----------------------------------------------------------------------------- part 2

CLIENTS = {f"client{i}": f"sk-faults-{i}" for i in range(1, 5)}
QUESTIONS_PER_CLIENT = 60
POST_THREADS = 8
KILL_POINTS = (0.25, 0.5, 0.75)  # the server is killed when this share of the posts is acknowledged


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(root: Path, port: int, log: Path) -> subprocess.Popen:
    """`tuneloop serve` on 127.0.0.1:port, ready to answer (its champion loaded)."""
    env = {**os.environ, "TUNELOOP_API_KEYS": ",".join(f"{n}:{k}" for n, k in CLIENTS.items()),
           "TUNELOOP_CACHE": str(root.parent / "cache"), "PYTHONPATH": str(ROOT)}
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-c", "from tuneloop.cli import main; main()", "serve",
                                 "--project", str(root), "--port", str(port)], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/v1/models", headers=auth("client1"), timeout=5).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; see {log}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not start in 120 s; see {log}")


def auth(client: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {CLIENTS[client]}"}


def ask_questions(url: str) -> list[tuple[str, str]]:
    """Each client asks its questions; (client, interaction id) of every answer."""
    asked = []
    with httpx.Client(base_url=url, timeout=60) as http:
        for client in CLIENTS:
            for i in range(QUESTIONS_PER_CLIENT):
                r = http.post("/v1/chat/completions", headers=auth(client), json={
                    "model": "tuneloop", "max_tokens": 4,
                    "messages": [{"role": "user", "content": f"Who may terminate the agreement ({client}, {i})?"}]})
                r.raise_for_status()
                asked.append((client, r.json()["interaction_id"]))
    return asked


def feedback_posts(asked: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """One post per (client, interaction): thumbs, ratings and corrections, each with its own key."""
    posts = []
    for n, (client, interaction) in enumerate(asked):
        body: dict[str, Any] = {"interaction_id": interaction}
        if n % 3 == 0:
            body["thumbs"] = "up" if n % 2 else "down"
        elif n % 3 == 1:
            body["rating"] = 1 + n % 5
        else:
            body["corrected_answer"] = f"The corrected answer number {n}."
        posts.append({"client": client, "key": uuid.uuid4().hex, "body": body, "acks": []})
    return posts


def send(url: str, post: dict[str, Any], http: httpx.Client) -> bool:
    """POST it; record the acknowledgement (status, feedback id) or return False on no answer."""
    try:
        r = http.post(url + "/v1/feedback", json=post["body"],
                      headers={**auth(post["client"]), "Idempotency-Key": post["key"]})
    except httpx.HTTPError:
        return False
    if r.status_code in (200, 201):
        post["acks"].append((r.status_code, r.json()["id"]))
        return True
    post.setdefault("errors", []).append(f"{r.status_code}: {r.text[:200]}")
    return False


def send_until_killed(url: str, posts: list[dict[str, Any]], proc: subprocess.Popen, kill_after: int) -> float:
    """Post `posts` from several threads; SIGKILL the server once `kill_after` of them are
    acknowledged (posts left unsent then wait for the next round). Seconds until the kill."""
    todo = list(posts)
    lock, acked, started = threading.Lock(), [0], time.perf_counter()

    def worker() -> None:
        with httpx.Client(timeout=10) as http:
            while True:
                with lock:
                    if not todo or proc.poll() is not None:
                        return
                    post = todo.pop(0)
                if send(url, post, http):
                    with lock:
                        acked[0] += 1
                        if acked[0] >= kill_after and proc.poll() is None:
                            proc.send_signal(signal.SIGKILL)

    threads = [threading.Thread(target=worker) for _ in range(POST_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if proc.poll() is None:  # every post answered before the mark: kill it all the same
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return time.perf_counter() - started


def stored_feedback(root: Path) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """(client, interaction id) -> the feedback rows the store holds for it."""
    with st.open_store(load_project(root).store_url)() as s:
        public = {i.id: i.public_id for i in s.scalars(select(st.Interaction))}
        rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for f in s.scalars(select(st.Feedback)):
            rows.setdefault((f.client, public[f.interaction_id]), []).append(
                {"id": f.id, "thumbs": f.thumbs, "rating": f.rating, "corrected_answer": f.corrected_answer})
    return rows


def matches(post: dict[str, Any], row: dict[str, Any]) -> bool:
    body = post["body"]
    thumbs = {"up": 1, "down": -1}.get(body.get("thumbs", ""))
    return (row["thumbs"], row["rating"], row["corrected_answer"]) == (
        thumbs, body.get("rating"), body.get("corrected_answer"))


def server_faults(work: Path, model_dir: Path) -> dict[str, Any]:
    root, log = make_project(work / "project", model_dir), work / "server.log"
    settings = yaml.safe_load((root / "tuneloop.yaml").read_text())
    settings["serve"].update({"requests_per_minute": 0, "tokens_per_minute": 0})  # the load is the point
    write_settings(root, settings)
    subprocess.run([sys.executable, "-c", "from tuneloop.cli import main; main()", "ingest", str(root / "documents"),
                    "--project", str(root)], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(root, port, log)
    posts = feedback_posts(ask_questions(url))
    rounds = []
    for share in KILL_POINTS:  # post what is not yet acknowledged (retries keep their key); kill
        pending = [p for p in posts if not p["acks"]]
        already = len(posts) - len(pending)
        kill_s = send_until_killed(url, pending, proc, max(1, math.ceil(share * len(posts)) - already))
        stored = stored_feedback(root)
        rounds.append({"kill_at_share": share, "killed_after_s": round(kill_s, 2),
                       "acknowledged": sum(bool(p["acks"]) for p in posts),
                       "stored": sum(len(v) for v in stored.values()),
                       # the dangerous case: committed, never acknowledged; its retry must not add a row
                       "stored_not_acknowledged": sum(not p["acks"] and feedback_key(p) in stored for p in posts)})
        proc = start_server(root, port, log)
    try:
        with httpx.Client(timeout=30) as http:
            last = [send(url, p, http) for p in posts if not p["acks"]]
            again = [p for p in posts if p["acks"]][:20]  # the client lost the answer and retries
            repeated = [send(url, p, http) for p in again]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    after = stored_feedback(root)

    lost = [p["key"] for p in posts if not after.get(feedback_key(p))]
    doubled = [k for k, rows in after.items() if len(rows) > 1]
    wrong = [p["key"] for p in posts if after.get(feedback_key(p)) and not matches(p, after[feedback_key(p)][0])]
    ids_changed = [p["key"] for p in posts if len({fid for _, fid in p["acks"]}) > 1]
    ids_not_stored = [p["key"] for p in posts
                      if p["acks"] and p["acks"][0][1] != after.get(feedback_key(p), [{}])[0].get("id")]
    part = {"posts": len(posts), "clients": len(CLIENTS), "threads": POST_THREADS, "rounds": rounds,
            "sent_after_last_restart": len(last), "acknowledged_posts_repeated": len(repeated),
            "stored_at_end": sum(len(v) for v in after.values()), "lost": lost,
            "stored_twice": [list(k) for k in doubled], "wrong_values": wrong, "ack_ids_changed": ids_changed,
            "ack_ids_not_stored": ids_not_stored, "errors": [e for p in posts for e in p.get("errors", [])][:10]}
    part["ok"] = (not lost and not doubled and not wrong and not ids_changed and not ids_not_stored
                  and part["stored_at_end"] == len(posts) and all(last) and all(repeated))
    print(f"server: {len(posts)} posts, {len(rounds)} kills; stored but unacknowledged at the kills: "
          f"{[r['stored_not_acknowledged'] for r in rounds]}; at the end {part['stored_at_end']} stored, "
          f"lost {len(lost)}, twice {len(doubled)} -> {'ok' if part['ok'] else 'FAIL'}", flush=True)
    return part


def feedback_key(post: dict[str, Any]) -> tuple[str, str]:
    return post["client"], post["body"]["interaction_id"]


def print_server_table(part: dict[str, Any]) -> None:
    print("\n| kill when acknowledged | acknowledged | stored | stored, not acknowledged |")
    print("|---|---|---|---|")
    for r in part["rounds"]:
        print(f"| {r['kill_at_share']:.0%} of {part['posts']} | {r['acknowledged']} | {r['stored']} | "
              f"{r['stored_not_acknowledged']} |")
    print(f"\nafter the last restart: {part['sent_after_last_restart']} posts sent, "
          f"{part['acknowledged_posts_repeated']} acknowledged posts repeated; {part['stored_at_end']} stored "
          f"for {part['posts']} posts; lost {len(part['lost'])}, stored twice {len(part['stored_twice'])}, "
          f"wrong values {len(part['wrong_values'])}, acknowledged ids changed or not stored "
          f"{len(part['ack_ids_changed']) + len(part['ack_ids_not_stored'])}: {'ok' if part['ok'] else 'FAILED'}")


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", help="comma-separated steps to fault (default: every step that runs)")
    ap.add_argument("--skip-server", action="store_true", help="only the cycle part")
    ap.add_argument("--skip-cycle", action="store_true", help="only the server part")
    ap.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one, removed)")
    ap.add_argument("--json", type=Path, default=OUT_JSON)
    args = ap.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="tuneloop-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    report: dict[str, Any] = {"command": shlex.join(["python", "bench/faults.py", *sys.argv[1:]]),
                              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                              "python": platform.python_version()}
    ok = True
    try:
        if not args.skip_cycle:
            part = cycle_faults(work / "cycle", args.steps.split(",") if args.steps else None)
            report["cycle"] = part
            print_cycle_table(part)
            ok &= all(r["ok"] for r in part["runs"])
        if not args.skip_server:
            (work / "server").mkdir(exist_ok=True)
            part = server_faults(work / "server", build_tiny_model(work / "server" / "tiny-model"))
            report["server"] = part
            print_server_table(part)
            ok &= part["ok"]
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = round(time.time() - started, 1)
    report["ok"] = ok
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\n{'all checks held' if ok else 'A CHECK FAILED'}; {report['seconds']} s; wrote {args.json}")
    print(f"command: {report['command']}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
