"""Feedback API under load: many concurrent clients posting feedback to a real `tuneloop serve` app.

A temporary project is created (the bundled sample contracts, ingested BM25-only, version 'base'
as champion, per-key rate and token limits off: the load is the point) and interactions are
inserted straight into its SQLite store, each owned by one of the client keys (`client` set; the
public id comes from the model's default), some as A/B pairs: the benchmark measures the feedback
path, not answer generation, so no model is loaded (the app gets a stub `model_factory`). The app
runs under uvicorn on 127.0.0.1 in its own process (or in a thread with --in-thread). Then
`--clients` threads, each with its own client key and one keep-alive httpx.Client, send `--posts`
POST /v1/feedback requests in total, a mix of thumbs up/down, ratings, comments, corrected
answers and A/B choices, all released at once.

The API keeps one verdict per (client key, interaction) and one choice per (client key, A/B pair),
a later post updating the row (200). So that every post adds one row, each post targets its own
key's interactions, and no (key, interaction) or (key, pair) twice: a client sending N answer posts
needs N interactions of its own (`--interactions` are dealt out round-robin; too few is refused
before anything starts), and each A/B choice gets a pair of its own. Every post carries a unique
`Idempotency-Key` header, as a client that retries would send.

Checks: every post got 201 with a unique feedback id and the public id it posted, the store holds
exactly `--posts` feedback rows and `--posts` idempotency keys, those rows are the returned ids,
and each stored row has the values that were posted, by the key that posted them. Prints
p50/p95/p99 latency (ms), throughput (posts/s), the machine and the command line; writes
docs/benchmarks/feedback_load.json. Exits 1 if a post failed or a check did not hold.

With `--postgres` the store is a throwaway PostgreSQL server started here (tests/postgres.py, as
the tests start it) instead of SQLite; `--servers N` runs N server processes on the one store.

    .venv/bin/python bench/feedback_load.py [--posts 1200] [--clients 32] [--interactions 1280]
                                            [--postgres] [--servers 2] [--json-out FILE]
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
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import yaml  # noqa: E402
from sqlalchemy import func, select  # noqa: E402


def client_name(c: int) -> str:
    """The name of client key `c` (TUNELOOP_API_KEYS `name:key`); interactions and feedback carry it."""
    return f"bench-{c:03d}"


@dataclass(frozen=True)
class Post:
    """One POST /v1/feedback: which client key sends it, its Idempotency-Key and its JSON body."""

    client: int
    idempotency_key: str
    body: dict


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
    p.add_argument("--clients", type=int, default=32,
                   help="concurrent clients, one thread and one client key each (default 32)")
    p.add_argument("--interactions", type=int, default=1280,
                   help="interactions for answer feedback, dealt round-robin to the clients; each is posted on "
                        "at most once, so a client needs one per answer post (default 1280)")
    p.add_argument("--ab-fraction", type=float, default=0.1,
                   help="share of posts that are A/B choices, each on a pair of its own (default 0.1)")
    p.add_argument("--in-thread", action="store_true", help="run uvicorn in a thread of this process")
    p.add_argument("--postgres", action="store_true",
                   help="the store on a throwaway PostgreSQL server started here (as the tests do), not SQLite")
    p.add_argument("--servers", type=int, default=1,
                   help="server processes on the one store; client c posts to server c %% N (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=Path, default=ROOT / "docs" / "benchmarks" / "feedback_load.json")
    p.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # internal: the server process
    args = p.parse_args(argv)
    if args.serve is not None:
        return args
    if args.posts < 1 or args.clients < 1 or args.interactions < 0:
        p.error("--posts and --clients must be >= 1, --interactions >= 0")
    if not 0.0 <= args.ab_fraction <= 1.0:
        p.error(f"--ab-fraction must be between 0 and 1, got {args.ab_fraction}")
    if args.clients > args.posts:
        p.error(f"--clients {args.clients} is more than --posts {args.posts}: a client would send nothing")
    answers = answer_posts_per_client(plan(args.posts, args.clients, args.ab_fraction, args.seed), args.clients)
    needed = interactions_needed(answers)
    if args.interactions < needed:
        p.error(f"--interactions {args.interactions} is too few for --posts {args.posts} from --clients "
                f"{args.clients}: each answer post needs an interaction of its own key (one verdict per key and "
                f"interaction; a second post would update the row, not add one); the busiest client sends "
                f"{max(answers)} answer posts, so use --interactions {needed} or more")
    return args


# --------------------------------------------------------------------------- plan


def plan(n_posts: int, n_clients: int, ab_fraction: float, seed: int) -> list[tuple[int, bool]]:
    """(client, is A/B choice) per post: clients take turns (post i is client i % n_clients's)."""
    rng = random.Random(seed)
    return [(i % n_clients, rng.random() < ab_fraction) for i in range(n_posts)]


def answer_posts_per_client(posts: list[tuple[int, bool]], n_clients: int) -> list[int]:
    counts = [0] * n_clients
    for client, is_choice in posts:
        counts[client] += not is_choice
    return counts


def owned(n_interactions: int, n_clients: int, client: int) -> int:
    """How many of `n_interactions` dealt round-robin (interaction j to client j % n_clients) are `client`'s."""
    return n_interactions // n_clients + (client < n_interactions % n_clients)


def interactions_needed(answers: list[int]) -> int:
    """The fewest interactions that, dealt round-robin, give every client one per answer post."""
    n = sum(answers)
    while any(owned(n, len(answers), c) < need for c, need in enumerate(answers)):
        n += 1
    return n


# --------------------------------------------------------------------------- project


def make_project(root: Path, n_clients: int, n_interactions: int, pairs_per_client: list[int],
                 store_url: str | None = None):
    """A project with the sample contracts ingested, a champion, no per-key limits, and interactions
    inserted directly: interaction j belongs to client j % n_clients, and client c owns
    `pairs_per_client[c]` A/B pairs. Returns the project, each client's interaction public ids and
    its pairs as (tag, champion public id, challenger public id)."""
    from tuneloop import store as st
    from tuneloop.config import load_project
    from tuneloop.progress import SilentReporter
    from tuneloop.settings_template import default_settings_yaml
    from tuneloop.stages.ingest import ingest_paths
    from tuneloop.versions import ensure_base_version

    shutil.copytree(Path(str(resources.files("tuneloop") / "sample" / "contracts")), root / "documents")
    data = yaml.safe_load(default_settings_yaml("feedback-bench", ["documents"]))
    data.setdefault("ingest", {})["dense"] = False
    # 32 keys posting as fast as they can would hit the default 60 requests per minute: the load is the point
    data.setdefault("serve", {}).update({"requests_per_minute": 0, "tokens_per_minute": 0})
    if store_url:
        data["store_url"] = store_url
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
        singles: list[list] = [[] for _ in range(n_clients)]
        for j in range(n_interactions):
            inter = st.Interaction(question=f"Benchmark question {j}?", answer=f"Benchmark answer {j}.",
                                   chunk_ids=rng.sample(chunk_ids, 3), model_version_id=base.id,
                                   latency_ms=10.0, client=client_name(j % n_clients))
            s.add(inter)
            singles[j % n_clients].append(inter)
        pairs: list[list] = [[] for _ in range(n_clients)]
        for c, n_pairs in enumerate(pairs_per_client):
            for k in range(n_pairs):
                tag = f"bench-pair-{c:03d}-{k:04d}"
                a = st.Interaction(question=f"Pair question {c}/{k}?", answer=f"Champion answer {c}/{k}.",
                                   chunk_ids=[], model_version_id=base.id, ab_pair=tag, arm="champion",
                                   client=client_name(c))
                b = st.Interaction(question=f"Pair question {c}/{k}?", answer=f"Challenger answer {c}/{k}.",
                                   chunk_ids=[], model_version_id=cand.id, ab_pair=tag, arm="challenger",
                                   client=client_name(c))
                s.add_all([a, b])
                pairs[c].append((tag, a, b))
        s.commit()
        single_ids = [[x.public_id for x in own] for own in singles]
        pair_ids = [[(tag, a.public_id, b.public_id) for tag, a, b in own] for own in pairs]
    return project, single_ids, pair_ids


def payloads(posts: list[tuple[int, bool]], single_ids: list[list[str]],
             pair_ids: list[list[tuple[str, str, str]]], seed: int) -> list[Post]:
    """A deterministic mix of every kind of feedback the API takes; each post on a (client, interaction)
    or (client, A/B pair) of its own, so each adds one feedback row."""
    rng = random.Random(seed + 1)
    unused_singles = [list(own) for own in single_ids]
    unused_pairs = [list(own) for own in pair_ids]
    out = []
    for i, (c, is_choice) in enumerate(posts):
        if is_choice:
            tag, a, b = unused_pairs[c].pop(0)
            p: dict = {"ab_pair": tag, "preferred_interaction_id": rng.choice([a, b])}
            if rng.random() < 0.3:
                p["comment"] = f"B{i}: clearer answer"
        else:
            p = {"interaction_id": unused_singles[c].pop(0)}
            kind = i % 5
            if kind in (0, 1):
                p["thumbs"] = "up" if rng.random() < 0.7 else "down"
            if kind in (1, 2):
                p["rating"] = rng.randint(1, 5)
            if kind == 3 or (kind == 2 and rng.random() < 0.5):
                p["comment"] = (f"post {i}: " + "the answer cites the right clause " * rng.randint(1, 4)).strip()
            if kind == 4:
                p["corrected_answer"] = f"Corrected answer for post {i}."
        out.append(Post(client=c, idempotency_key=f"feedback-load-{seed}-{i:06d}", body=p))
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


def run_load(urls: list[str], keys: list[str], posts: list[Post]):
    """Send each post from its client's thread (client c with key `keys[c]`, its posts in order, to
    server c % len(urls)); return per-post results (ms, status, feedback id, error) and the wall time."""
    results: list[tuple[float, int, int | None, str | None] | None] = [None] * len(posts)
    barrier = threading.Barrier(len(keys) + 1)

    def client(c: int) -> None:
        # TCP_NODELAY, as browsers set it (httpcore leaves Nagle on unless told).
        transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        mine = [i for i, post in enumerate(posts) if post.client == c]
        with httpx.Client(base_url=urls[c % len(urls)], headers={"Authorization": f"Bearer {keys[c]}"}, timeout=30.0,
                          transport=transport,
                          limits=httpx.Limits(max_connections=1, max_keepalive_connections=1)) as http:
            try:
                http.get("/v1/models")  # open the keep-alive connection before the clock starts
            except httpx.HTTPError:
                pass
            barrier.wait()
            for i in mine:
                post = posts[i]
                t0 = time.perf_counter()
                try:
                    r = http.post("/v1/feedback", json=post.body, headers={"Idempotency-Key": post.idempotency_key})
                    ms = (time.perf_counter() - t0) * 1000
                    fid = None
                    err = None
                    if r.status_code == 201:
                        out = r.json()
                        fid = out.get("id")
                        posted = post.body.get("preferred_interaction_id") or post.body.get("interaction_id")
                        if not isinstance(fid, int):
                            err = f"201 without an integer id: {r.text[:200]}"
                        elif out.get("interaction_id") != posted:
                            err = f"201 for interaction {posted!r} answered {out.get('interaction_id')!r}"
                    elif r.status_code == 200:  # the target already had this key's verdict: a bench bug
                        err = f"HTTP 200 (an earlier verdict updated, no row added): {r.text[:200]}"
                    else:
                        err = f"HTTP {r.status_code}: {r.text[:200]}"
                    results[i] = (ms, r.status_code, fid, err)
                except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                    results[i] = ((time.perf_counter() - t0) * 1000, 0, None, repr(exc))

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(len(keys))]
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


def verify(project, posts: list[Post], results) -> dict:
    """Compare the store with what was posted: exact row and idempotency-key counts, returned ids,
    and each row's values and client."""
    from tuneloop import store as st

    ids = [r[2] for r in results if r is not None and r[2] is not None]
    problems: list[str] = []
    with st.open_store(project.store_url)() as s:
        rows = {f.id: f for f in s.scalars(select(st.Feedback))}
        row_id = {public: rid for public, rid in s.execute(select(st.Interaction.public_id, st.Interaction.id))}
        n_keys = s.scalar(select(func.count(st.IdempotencyKey.id))) or 0
    if len(rows) != len(posts):
        problems.append(f"store holds {len(rows)} feedback rows, {len(posts)} were posted")
    if n_keys != len(posts):
        problems.append(f"store holds {n_keys} idempotency keys, {len(posts)} posts sent one each")
    if len(set(ids)) != len(ids):
        problems.append(f"{len(ids) - len(set(ids))} duplicate feedback ids returned")
    missing = [i for i in ids if i not in rows]
    if missing:
        problems.append(f"{len(missing)} returned ids are not in the store (e.g. {missing[:5]})")
    thumbs = {"up": 1, "down": -1}
    mismatched = 0
    for post, res in zip(posts, results):
        if res is None or res[2] not in rows:
            continue
        row, body = rows[res[2]], post.body
        if "ab_pair" in body:
            preferred = row_id.get(body["preferred_interaction_id"])
            ok = row.preferred_interaction_id == preferred and row.interaction_id == preferred and \
                row.comment == body.get("comment") and row.thumbs is None and row.rating is None
        else:
            ok = (row.interaction_id == row_id.get(body["interaction_id"])
                  and row.thumbs == thumbs.get(body.get("thumbs"))
                  and row.rating == body.get("rating") and row.comment == body.get("comment")
                  and row.corrected_answer == body.get("corrected_answer"))
        ok = ok and row.client == client_name(post.client)
        mismatched += not ok
    if mismatched:
        problems.append(f"{mismatched} stored rows differ from what was posted")
    return {"stored_rows": len(rows), "idempotency_keys": n_keys, "returned_ids": len(ids),
            "unique_ids": len(set(ids)), "rows_matching_posts": len(ids) - mismatched - len(missing),
            "problems": problems}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve is not None:
        serve_forever(args.serve)
        return 0

    from tuneloop.config import ServeSettings

    serve = ServeSettings()
    keys = [secrets.token_hex(16) for _ in range(args.clients)]
    # inherited by the server process
    os.environ[serve.api_keys_env] = ",".join(f"{client_name(c)}:{key}" for c, key in enumerate(keys))
    os.environ[serve.admin_token_env] = secrets.token_hex(16)
    command = " ".join(["python bench/feedback_load.py", shlex.join(sys.argv[1:] if argv is None else argv)]).strip()

    load_before = [round(x, 2) for x in os.getloadavg()]
    if args.in_thread and args.servers > 1:
        raise SystemExit("--in-thread runs one server: use --servers 1")
    database = None
    if args.postgres:
        from tests.postgres import PostgresServer  # a throwaway cluster in a temporary folder, on loopback

        database = PostgresServer()
    try:
        return _run(args, keys, command, load_before, database)
    finally:
        if database is not None:
            database.stop()


def _run(args, keys: list[str], command: str, load_before: list[float], database) -> int:
    import uvicorn

    with tempfile.TemporaryDirectory(prefix="tuneloop-feedback-bench-") as tmp:
        root = Path(tmp) / "project"
        root.mkdir()
        planned = plan(args.posts, args.clients, args.ab_fraction, args.seed)
        pairs_per_client = [0] * args.clients
        for c, is_choice in planned:
            pairs_per_client[c] += is_choice
        t_setup = time.perf_counter()
        project, single_ids, pair_ids = make_project(root, args.clients, args.interactions, pairs_per_client,
                                                     database.new_database() if database else None)
        posts = payloads(planned, single_ids, pair_ids, args.seed)
        bodies = [post.body for post in posts]
        servers = [Server(root, args.in_thread) for _ in range(args.servers)]
        try:
            urls = [server.start() for server in servers]
            for url in urls:
                wait_ready(url, {"Authorization": f"Bearer {keys[0]}"})
            setup_s = time.perf_counter() - t_setup
            print(f"{len(urls)} server(s) up at {', '.join(urls)} ({'thread' if args.in_thread else 'subprocess'}; "
                  f"setup {setup_s:.1f}s); {args.posts} posts from {args.clients} clients, one key each ...",
                  flush=True)
            results, wall = run_load(urls, keys, posts)
        finally:
            for server in servers:
                server.stop()
        check = verify(project, posts, results)

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
                    else f"uvicorn, 1 worker, {args.servers} separate process(es) on the one store",
                    "store": f"PostgreSQL {database.version()} (a throwaway cluster, fsync off) on loopback"
                    if database else "SQLite (WAL) in a temporary folder", "network": "loopback 127.0.0.1",
                    "load_avg_1_5_15_before": load_before,
                    "load_avg_1_5_15_after": [round(x, 2) for x in os.getloadavg()]},
        "posts": args.posts, "clients": args.clients, "client_keys": args.clients,
        "interactions": args.interactions, "ab_pairs": sum(pairs_per_client),
        "targets": "each post on a (client key, interaction) or (client key, A/B pair) of its own, so each adds "
                   "one row (one verdict per key and answer); every post with its own Idempotency-Key; "
                   "per-key limits off",
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
    print(f"posts       {args.posts} from {args.clients} clients (one key each): {len(latencies)} stored, "
          f"{len(failures)} failed")
    print(f"latency ms  p50 {lat['p50']:.1f}   p95 {lat['p95']:.1f}   p99 {lat['p99']:.1f}   max {lat['max']:.1f}")
    print(f"throughput  {report['throughput_posts_per_s']} posts/s ({wall:.2f} s wall)")
    print(f"store       {check['stored_rows']} feedback rows, {check['idempotency_keys']} idempotency keys, "
          f"{check['unique_ids']} unique ids returned, {check['rows_matching_posts']} rows match their post")
    for problem in check["problems"]:
        print(f"PROBLEM     {problem}")
    for f in report["failure_examples"]:
        print(f"FAILED      {f}")
    print(f"wrote       {args.json_out}")
    print(f"reproduce   {command}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
