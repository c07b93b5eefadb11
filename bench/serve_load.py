"""Serving many users: 1 vs N concurrent `openai` clients asking CUAD dev questions of `tuneloop serve`.

A fresh project (the default settings; `--contracts` CUAD dev contracts ingested; the built-in
student as champion; per-key rate and token limits off: the load is the point) is served by the
real `tuneloop serve` command on 127.0.0.1 in its own process. Each client is an `openai.OpenAI`
client with its own API key, asking the questions of those contracts (each about its contract:
the request's `document`), one after another (a closed loop: the next question when the answer
came). First one client asks `--requests` questions; then `--clients` clients ask `--requests`
questions each, all released at once. The same questions are asked in both phases.

Printed and written to `--json-out`: answers per minute and latency p50/p90/p99 of each phase,
`serve_throughput_ratio_8_vs_1` (answers per minute at N clients over 1 client) and
`serve_p99_8_over_p50_1` (p99 latency at N clients over the single client's p50), with the
command, for each arm: a fresh server per `--max-batch` value (`serve.max_batch`; 1 answers one
request at a time, 8 is the default), side by side in one run.

    .venv/bin/python bench/serve_load.py [--contracts 6] [--clients 8] [--requests 6] [--max-batch 1,8]
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import cuad  # noqa: E402
import httpx  # noqa: E402
import openai  # noqa: E402
import yaml  # noqa: E402

from tuneloop.cli import quiet_libraries  # noqa: E402
from tuneloop.config import load_project  # noqa: E402
from tuneloop.models.registry import build_embedder  # noqa: E402
from tuneloop.programs.decide import is_yes_no_question  # noqa: E402
from tuneloop.progress import SilentReporter  # noqa: E402
from tuneloop.settings_template import default_settings_yaml  # noqa: E402
from tuneloop.stages.ingest import ingest_paths  # noqa: E402
from tuneloop.store import open_store  # noqa: E402
from tuneloop.versions import ensure_base_version  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def make_project(folder: Path, data: Path, n_contracts: int) -> tuple[list[dict], Path]:
    """The project folder and the (question, contract) pairs to ask, in a fixed order."""
    rows = [json.loads(line) for line in (data / "qa.jsonl").open(encoding="utf-8")]
    contracts = sorted({r["contract"] for r in rows})[:n_contracts]
    if folder.exists():
        shutil.rmtree(folder)  # this bench's own project from an earlier run
    folder.mkdir(parents=True)
    settings = yaml.safe_load(default_settings_yaml("serve-bench", [str((data / "contracts" / c).resolve())
                                                                   for c in contracts]))
    settings["serve"].update({"requests_per_minute": 0, "tokens_per_minute": 0})
    (folder / "tuneloop.yaml").write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
    project = load_project(folder)
    with open_store(project.store_url)() as s:
        ingest_paths(project, s, [project.path(p) for p in project.settings.documents], build_embedder(project),
                     SilentReporter())
        ensure_base_version(project, s)
        s.commit()
    asked = [{"question": r["question"], "document": r["contract"]} for r in rows if r["contract"] in contracts]
    return asked, folder


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(folder: Path, keys: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "TUNELOOP_API_KEYS": ",".join(f"{n}:{k}" for n, k in keys.items())}
    proc = subprocess.Popen([str(ROOT / ".venv" / "bin" / "tuneloop"), "serve", "--project", str(folder),
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    key = next(iter(keys.values()))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"tuneloop serve exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.terminate()
    raise SystemExit("tuneloop serve did not answer within 300 s")


def ask(client: openai.OpenAI, item: dict) -> tuple[float, str, str]:
    """(seconds, answer, finish_reason) of one question."""
    t0 = time.perf_counter()
    reply = client.chat.completions.create(model="tuneloop", messages=[{"role": "user", "content": item["question"]}],
                                           extra_body={"document": item["document"]})
    return time.perf_counter() - t0, reply.choices[0].message.content, reply.choices[0].finish_reason


def phase(url: str, keys: list[str], questions: list[list[dict]]) -> dict:
    """Client i asks questions[i] one after another; all clients start together."""
    latencies: list[list[float]] = [[] for _ in keys]
    by_kind: dict[str, list[float]] = {"yes_no": [], "other": []}
    answers: list[list[str]] = [[] for _ in keys]
    errors: list[str] = []
    barrier = threading.Barrier(len(keys) + 1)

    def client(i: int) -> None:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key=keys[i], max_retries=0, timeout=600)
        barrier.wait()
        for item in questions[i]:
            try:
                seconds, answer, _ = ask(c, item)
            except openai.OpenAIError as err:
                errors.append(f"{type(err).__name__}: {err}")
                continue
            latencies[i].append(seconds)
            by_kind["yes_no" if is_yes_no_question(item["question"]) else "other"].append(seconds)
            answers[i].append(answer)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(keys))]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    flat = sorted(x for lat in latencies for x in lat)
    q = statistics.quantiles(flat, n=100, method="inclusive") if len(flat) > 1 else flat * 99
    return {"clients": len(keys), "answers": len(flat), "errors": errors, "seconds": round(wall, 2),
            "answers_per_minute": round(60 * len(flat) / wall, 2),
            "latency_s": {"p50": round(statistics.median(flat), 2), "p90": round(q[89], 2), "p99": round(q[98], 2),
                          "max": round(flat[-1], 2)},
            "p50_by_kind_s": {k: round(statistics.median(v), 2) if v else None for k, v in by_kind.items()},
            "replies": answers}


def set_max_batch(folder: Path, max_batch: int) -> None:
    path = folder / "tuneloop.yaml"
    settings = yaml.safe_load(path.read_text(encoding="utf-8"))
    settings["serve"]["max_batch"] = max_batch
    path.write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")


def arm(folder: Path, max_batch: int, asked: list[dict], per_client: list[list[dict]], requests: int) -> dict:
    """A fresh server with `serve.max_batch` = `max_batch`: warm-up, one client, then all clients."""
    set_max_batch(folder, max_batch)
    keys = [secrets.token_hex(16) for _ in per_client]
    proc, url = start_server(folder, {f"client{i}": k for i, k in enumerate(keys)})
    try:
        phase(url, keys[:1], [asked[-2:]])  # warm-up: the first requests warm the model
        single = phase(url, keys[:1], [[item for qs in per_client for item in qs][: requests * 2]])
        many = phase(url, keys, per_client)
        server_rss = cuad.peak_rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    same = sum(a == b for a, b in zip(single.pop("replies")[0], many.pop("replies")[0]))
    return {"max_batch": max_batch, "one_client": single, "many_clients": many, "server_peak_rss_mib": server_rss,
            "throughput_ratio": round(many["answers_per_minute"] / single["answers_per_minute"], 2),
            "p99_many_over_p50_one": round(many["latency_s"]["p99"] / single["latency_s"]["p50"], 2),
            "first_client_replies_identical": f"{same}/{len(per_client[0])}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/cuad-dev"))
    ap.add_argument("--contracts", type=int, default=6)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=6, help="questions per client in the N-client phase "
                                                            "(the single client asks twice as many)")
    ap.add_argument("--max-batch", default="1,8", help="serve.max_batch of each arm, comma-separated (1: one "
                                                       "request at a time); the last arm gives the headline keys")
    ap.add_argument("--workdir", type=Path, default=Path("bench-runs/serve"))
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    quiet_libraries()
    sizes = [int(x) for x in args.max_batch.split(",")]
    asked, folder = make_project(args.workdir / "project", args.data, args.contracts)
    per_client = [[asked[(i * args.requests + j) % len(asked)] for j in range(args.requests)]
                  for i in range(args.clients)]
    arms = []
    for size in sizes:
        print(f"serving with max_batch {size}: 1 client, then {args.clients}", flush=True)
        arms.append(arm(folder, size, asked, per_client, args.requests))
    last = arms[-1]
    result = {
        "serve_throughput_ratio_8_vs_1": last["throughput_ratio"],
        "serve_p99_8_over_p50_1": last["p99_many_over_p50_one"],
        "serve": {"contracts": args.contracts, "clients": args.clients,
                  "yes_no_share": round(sum(is_yes_no_question(q["question"]) for qs in per_client for q in qs)
                                        / sum(len(qs) for qs in per_client), 2),
                  "arms": arms},
        "serve_command": "python bench/serve_load.py " + shlex.join(sys.argv[1:]),
        "machine": cuad.machine(),
    }
    print(json.dumps(result, indent=2))
    if any(a[p]["errors"] for a in arms for p in ("one_client", "many_clients")):
        raise SystemExit("some requests failed (see errors above)")
    if args.json_out:
        cuad.merge_json(args.json_out, result)


if __name__ == "__main__":
    main()
