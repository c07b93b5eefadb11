"""Feedback API under load: many concurrent clients posting feedback to a real `tuneloop serve` app.

A temporary project is created (the bundled sample contracts, ingested BM25-only, version 'base'
as champion) and N interactions are inserted straight into its SQLite store (some as A/B pairs):
the benchmark measures the feedback path, not answer generation, so no model is loaded (the app
gets a stub `model_factory`). The app runs under uvicorn on 127.0.0.1 in its own process (or in a
thread with --in-thread). Then `--clients` threads, each with one keep-alive httpx.Client, send
`--posts` POST /v1/feedback requests in total, a mix of thumbs up/down, ratings, comments,
corrected answers and A/B choices, all released at once.

Checks: every post got 201 with a unique feedback id, the store holds exactly `--posts` feedback
rows, those are the returned ids, and each stored row has the values that were posted. Prints
p50/p95/p99 latency (ms), throughput (posts/s), the machine and the command line; writes
docs/benchmarks/feedback_load.json. Exits 1 if a post failed or a check did not hold.

    .venv/bin/python bench/feedback_load.py [--posts 1200] [--clients 32] [--interactions 200]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import yaml  # noqa: E402
from sqlalchemy import select  # noqa: E402

CLIENT_NAME = "bench"


class StubModel:
    """Never asked to answer here (the benchmark posts feedback only); answers something if it is."""

    name = "stub"

    def chat(self, conversations: Sequence[list[dict]], params) -> list[str]:
        return ["(stub answer)" for _ in conversations]


def stub_factory(project, version) -> StubModel:
    return StubModel()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--posts", type=int, default=1200, help="feedback posts in total (default 1200)")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients, one thread each (default 32)")
    p.add_argument("--interactions", type=int, default=200, help="interactions to give feedback on (default 200)")
    p.add_argument("--ab-fraction", type=float, default=0.1, help="share of posts that are A/B choices (default 0.1)")
    p.add_argument("--in-thread", action="store_true", help="run uvicorn in a thread of this process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=Path, default=ROOT / "docs" / "benchmarks" / "feedback_load.json")
    p.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # internal: the server process
    args = p.parse_args(argv)
    if args.posts < 1 or args.clients < 1 or args.interactions < 2:
        p.error("--posts and --clients must be >= 1, --interactions >= 2")
    return args


# --------------------------------------------------------------------------- project


def make_project(root: Path, n_interactions: int, ab_pairs: int):
    """A project with the sample contracts ingested, a champion, and interactions inserted directly."""
    from tuneloop import store as st
    from tuneloop.config import default_settings_yaml, load_project
    from tuneloop.progress import SilentReporter
    from tuneloop.stages.evaluate import ensure_base_version
    from tuneloop.stages.ingest import ingest_paths

    shutil.copytree(Path(str(resources.files("tuneloop") / "sample" / "contracts")), root / "documents")
    data = yaml.safe_load(default_settings_yaml("feedback-bench", ["documents"]))
    data.setdefault("ingest", {})["dense"] = False
    (root / "tuneloop.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    project = load_project(root)
    rng = random.Random(0)
    with st.open_store(project.store_url)() as s:
        ingest_paths(project, s, [project.path(p) for p in project.settings.documents], None, SilentReporter())
        base = ensure_base_version(project, s)
        cand = st.ModelVersion(name="bench-candidate", parent_id=base.id, base_model=base.base_model,
                               adapter_path=None, method="sft", status="candidate")
        s.add(cand)
        s.flush()
        chunk_ids = list(s.scalars(select(st.Chunk.id)))
        singles = []
        for i in range(n_interactions):
            inter = st.Interaction(question=f"Benchmark question {i}?", answer=f"Benchmark answer {i}.",
                                   chunk_ids=rng.sample(chunk_ids, 3), model_version_id=base.id,
                                   latency_ms=10.0, client=CLIENT_NAME)
            s.add(inter)
            singles.append(inter)
        pairs = []
        for i in range(ab_pairs):
            tag = f"bench-pair-{i:05d}"
            a = st.Interaction(question=f"Pair question {i}?", answer=f"Champion answer {i}.", chunk_ids=[],
                               model_version_id=base.id, ab_pair=tag, arm="champion", client=CLIENT_NAME)
            b = st.Interaction(question=f"Pair question {i}?", answer=f"Challenger answer {i}.", chunk_ids=[],
                               model_version_id=cand.id, ab_pair=tag, arm="challenger", client=CLIENT_NAME)
            s.add_all([a, b])
            pairs.append((tag, a, b))
        s.commit()
        single_ids = [x.id for x in singles]
        pair_ids = [(tag, a.id, b.id) for tag, a, b in pairs]
    return project, single_ids, pair_ids


def payloads(n: int, single_ids: list[int], pair_ids: list[tuple[str, int, int]], ab_fraction: float,
             seed: int) -> list[dict]:
    """A deterministic mix of every kind of feedback the API takes."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if pair_ids and rng.random() < ab_fraction:
            tag, a, b = rng.choice(pair_ids)
            p: dict = {"ab_pair": tag, "preferred_interaction_id": rng.choice([a, b])}
            if rng.random() < 0.3:
                p["comment"] = f"B{i}: clearer answer"
        else:
            p = {"interaction_id": rng.choice(single_ids)}
            kind = i % 5
            if kind in (0, 1):
                p["thumbs"] = "up" if rng.random() < 0.7 else "down"
            if kind in (1, 2):
                p["rating"] = rng.randint(1, 5)
            if kind == 3 or (kind == 2 and rng.random() < 0.5):
                p["comment"] = (f"post {i}: " + "the answer cites the right clause " * rng.randint(1, 4)).strip()
            if kind == 4:
                p["corrected_answer"] = f"Corrected answer for post {i}."
        out.append(p)
    return out


# --------------------------------------------------------------------------- server


def loopback_socket() -> socket.socket:
    """A listening-to-be socket on 127.0.0.1 with an OS-chosen port.

    proto must be IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted connections only when the
    socket's proto says TCP, and with Nagle on every response waits ~40 ms for a delayed ACK.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    return sock


def serve_forever(root: Path) -> None:
    """The server process: print the port on stdout, then serve until terminated."""
    import uvicorn

    from tuneloop.config import load_project
    from tuneloop.serve.app import create_app

    app = create_app(load_project(root), model_factory=stub_factory)
    sock = loopback_socket()
    print(sock.getsockname()[1], flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])


class Server:
    def __init__(self, root: Path, in_thread: bool):
        self.root, self.in_thread = root, in_thread
        self.proc: subprocess.Popen | None = None
        self.uv = None
        self.thread: threading.Thread | None = None

    def start(self) -> str:
        if self.in_thread:
            import uvicorn

            from tuneloop.config import load_project
            from tuneloop.serve.app import create_app

            sock = loopback_socket()
            port = sock.getsockname()[1]
            self.uv = uvicorn.Server(uvicorn.Config(create_app(load_project(self.root), model_factory=stub_factory),
                                                    log_level="warning", access_log=False))
            self.thread = threading.Thread(target=self.uv.run, kwargs={"sockets": [sock]}, daemon=True)
            self.thread.start()
        else:
            self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve", str(self.root)],
                                         stdout=subprocess.PIPE, text=True, cwd=str(ROOT))
            line = self.proc.stdout.readline().strip()
            if not line.isdigit():
                self.stop()
                raise SystemExit(f"the server process did not start (printed {line!r}; see its log above)")
            port = int(line)
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        if self.uv is not None:
            self.uv.should_exit = True
            self.thread.join(timeout=15)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_ready(url: str, headers: dict, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url + "/v1/models", headers=headers, timeout=5)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.1)
    raise SystemExit(f"the server at {url} is not ready after {timeout:.0f}s: {last}")


# --------------------------------------------------------------------------- load


def run_load(url: str, headers: dict, bodies: list[dict], n_clients: int):
    """Send `bodies` from `n_clients` threads (client c takes bodies c, c+n, ...); return per-post results."""
    results: list[tuple[float, int, int | None, str | None] | None] = [None] * len(bodies)
    barrier = threading.Barrier(n_clients + 1)

    def client(c: int) -> None:
        # TCP_NODELAY, as browsers set it (httpcore leaves Nagle on unless told).
        transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        with httpx.Client(base_url=url, headers=headers, timeout=30.0, transport=transport,
                          limits=httpx.Limits(max_connections=1, max_keepalive_connections=1)) as http:
            try:
                http.get("/v1/models")  # open the keep-alive connection before the clock starts
            except httpx.HTTPError:
                pass
            barrier.wait()
            for i in range(c, len(bodies), n_clients):
                t0 = time.perf_counter()
                try:
                    r = http.post("/v1/feedback", json=bodies[i])
                    ms = (time.perf_counter() - t0) * 1000
                    fid = None
                    err = None
                    if r.status_code == 201:
                        fid = r.json().get("id")
                        if not isinstance(fid, int):
                            err = f"201 without an integer id: {r.text[:200]}"
                    else:
                        err = f"HTTP {r.status_code}: {r.text[:200]}"
                    results[i] = (ms, r.status_code, fid, err)
                except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                    results[i] = ((time.perf_counter() - t0) * 1000, 0, None, repr(exc))

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(n_clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return results, wall


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def verify(project, bodies: list[dict], results) -> dict:
    """Compare the store with what was posted: exact row count, returned ids, and each row's values."""
    from tuneloop import store as st

    ids = [r[2] for r in results if r is not None and r[2] is not None]
    problems: list[str] = []
    with st.open_store(project.store_url)() as s:
        rows = {f.id: f for f in s.scalars(select(st.Feedback))}
    if len(rows) != len(bodies):
        problems.append(f"store holds {len(rows)} feedback rows, {len(bodies)} were posted")
    if len(set(ids)) != len(ids):
        problems.append(f"{len(ids) - len(set(ids))} duplicate feedback ids returned")
    missing = [i for i in ids if i not in rows]
    if missing:
        problems.append(f"{len(missing)} returned ids are not in the store (e.g. {missing[:5]})")
    thumbs = {"up": 1, "down": -1}
    mismatched = 0
    for body, res in zip(bodies, results):
        if res is None or res[2] not in rows:
            continue
        row = rows[res[2]]
        if "ab_pair" in body:
            ok = row.preferred_interaction_id == body["preferred_interaction_id"] and \
                row.comment == body.get("comment") and row.thumbs is None and row.rating is None
        else:
            ok = (row.interaction_id == body["interaction_id"] and row.thumbs == thumbs.get(body.get("thumbs"))
                  and row.rating == body.get("rating") and row.comment == body.get("comment")
                  and row.corrected_answer == body.get("corrected_answer"))
        ok = ok and row.client == CLIENT_NAME
        mismatched += not ok
    if mismatched:
        problems.append(f"{mismatched} stored rows differ from what was posted")
    return {"stored_rows": len(rows), "returned_ids": len(ids), "unique_ids": len(set(ids)),
            "rows_matching_posts": len(ids) - mismatched - len(missing), "problems": problems}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve is not None:
        serve_forever(args.serve)
        return 0

    import uvicorn

    from tuneloop.config import ServeSettings

    serve = ServeSettings()
    key, admin = secrets.token_hex(16), secrets.token_hex(16)
    os.environ[serve.api_keys_env] = f"{CLIENT_NAME}:{key}"  # inherited by the server process
    os.environ[serve.admin_token_env] = admin
    headers = {"Authorization": f"Bearer {key}"}
    command = " ".join(["python bench/feedback_load.py", shlex.join(sys.argv[1:] if argv is None else argv)]).strip()

    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="tuneloop-feedback-bench-") as tmp:
        root = Path(tmp) / "project"
        root.mkdir()
        n_pairs = max(1, args.interactions // 10)
        t_setup = time.perf_counter()
        project, single_ids, pair_ids = make_project(root, args.interactions, n_pairs)
        bodies = payloads(args.posts, single_ids, pair_ids, args.ab_fraction, args.seed)
        server = Server(root, args.in_thread)
        try:
            url = server.start()
            wait_ready(url, headers)
            setup_s = time.perf_counter() - t_setup
            print(f"server up at {url} ({'thread' if args.in_thread else 'subprocess'}; setup {setup_s:.1f}s); "
                  f"{args.posts} posts from {args.clients} clients ...", flush=True)
            results, wall = run_load(url, headers, bodies, args.clients)
        finally:
            server.stop()
        check = verify(project, bodies, results)

    done = [r for r in results if r is not None]
    failures = [r for r in done if r[3] is not None] + [None] * (len(results) - len(done))
    latencies = sorted(r[0] for r in done if r[3] is None)
    kinds = {"ab_choice": sum("ab_pair" in b for b in bodies), "thumbs": sum("thumbs" in b for b in bodies),
             "rating": sum("rating" in b for b in bodies),
             "comment": sum("comment" in b for b in bodies),
             "corrected_answer": sum("corrected_answer" in b for b in bodies)}
    lat = {"p50": percentile(latencies, 50), "p95": percentile(latencies, 95), "p99": percentile(latencies, 99),
           "max": latencies[-1] if latencies else float("nan"),
           "mean": sum(latencies) / len(latencies) if latencies else float("nan")}
    report = {
        "benchmark": "feedback API under load: concurrent POST /v1/feedback to the real app under uvicorn, "
                     "every post checked against the store",
        "command": command,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "uvicorn": uvicorn.__version__, "httpx": httpx.__version__,
                    "server": "uvicorn, 1 worker, in a thread of the load process" if args.in_thread
                    else "uvicorn, 1 worker, separate process",
                    "store": "SQLite (WAL) in a temporary folder", "network": "loopback 127.0.0.1",
                    "load_avg_1_5_15_before": load_before,
                    "load_avg_1_5_15_after": [round(x, 2) for x in os.getloadavg()]},
        "posts": args.posts, "clients": args.clients, "interactions": args.interactions, "ab_pairs": len(pair_ids),
        "payload_mix": kinds,
        "succeeded": len(latencies), "failed": len(failures),
        "failure_examples": [f[3] if f else "no result" for f in failures[:5]],
        "latency_ms": {k: round(v, 2) for k, v in lat.items()},
        "wall_seconds": round(wall, 3),
        "throughput_posts_per_s": round(len(latencies) / wall, 1) if wall > 0 else None,
        "store_check": check,
        "ok": not failures and not check["problems"],
    }
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    print(f"machine     {report['machine']['platform']}, {report['machine']['cpu_count']} CPUs, "
          f"Python {report['machine']['python']}, {report['machine']['server']}; "
          f"load average before {load_before[0]} (other processes compete for the CPUs when it is high)")
    print(f"posts       {args.posts} from {args.clients} clients: {len(latencies)} stored, {len(failures)} failed")
    print(f"latency ms  p50 {lat['p50']:.1f}   p95 {lat['p95']:.1f}   p99 {lat['p99']:.1f}   max {lat['max']:.1f}")
    print(f"throughput  {report['throughput_posts_per_s']} posts/s ({wall:.2f} s wall)")
    print(f"store       {check['stored_rows']} feedback rows, {check['unique_ids']} unique ids returned, "
          f"{check['rows_matching_posts']} rows match their post")
    for problem in check["problems"]:
        print(f"PROBLEM     {problem}")
    for f in report["failure_examples"]:
        print(f"FAILED      {f}")
    print(f"wrote       {args.json_out}")
    print(f"reproduce   {command}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
