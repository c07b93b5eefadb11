"""The models being served, and their hot swap when the store names a new champion.

`ModelState.current()` returns an immutable snapshot (champion, optional challenger, retriever).
A request takes one snapshot and uses it to the end, so a swap never changes a model under a
request in flight. `check()` compares the store (champion id, newest candidate id) and the index
file with the snapshot; when something changed it loads what is new (reusing models already
loaded, e.g. a challenger promoted to champion) and only then replaces the snapshot: one
reference assignment. Checks run on a background thread every `serve.reload_seconds`, and a
request arriving after that interval starts one too (without waiting for it).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from tuneloop.config import Project
from tuneloop.errors import StateError
from tuneloop.models.base import ChatModel, Embedder, GenerationParams, Message
from tuneloop.models.batching import ModelWorker, batched
from tuneloop.programs.decide import answer_conversations, decides, is_yes_no_question, threshold_of
from tuneloop.programs.rag import Passage, Retriever, build_messages, rag_program_path, version_retriever_paths
from tuneloop.store import ModelVersion
from tuneloop.versions import Status, adapter_folder, champion

log = logging.getLogger("tuneloop.serve")
ModelFactory = Callable[[Project, ModelVersion], ChatModel]
RETRY_FAILED_SECONDS = 60.0  # a version whose load failed is retried after this long (not every check)


def default_model_factory(project: Project, version: ModelVersion) -> ChatModel:
    """The student role with the version's LoRA adapter; replies are generated fresh (no disk cache)."""
    from tuneloop.models.registry import build_chat_model

    role = project.settings.models.student.model_copy(update={"cache": False})
    # serving stays in this process whatever compute.engine says: one model thread answers requests
    return build_chat_model(project, role, adapter_folder(version),
                            engine="local")


def stream_reply(model: ChatModel, conversation: list[Message], params: GenerationParams) -> Iterator[str]:
    """Token pieces from a model with `stream()`; otherwise the whole `chat()` reply as one piece."""
    for candidate in (model, getattr(model, "wrapped", None)):  # CachedChatModel wraps the real model
        stream = getattr(candidate, "stream", None)
        if callable(stream):
            return iter(stream(conversation, params))
    return iter([model.chat([conversation], params)[0]])


@dataclass
class Usage:
    """Token counts of one generation (the model's tokenizer when it has one, else words)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0  # generating (holding the model's lock), to tell a reply cut at the deadline


def _tokenizer(model: ChatModel):
    for candidate in (model, getattr(model, "wrapped", None)):
        tok = getattr(candidate, "tokenizer", None)
        if tok is not None:
            return candidate, tok
    return None, None


def count_usage(model: ChatModel, conversation: list[Message], reply: str) -> Usage:
    """Prompt and completion token counts (approximate for models without a tokenizer)."""
    owner, tok = _tokenizer(model)
    if tok is None:
        return Usage(sum(len(m["content"].split()) for m in conversation), len(reply.split()))
    render = getattr(owner, "render", None)
    prompt = render(conversation) if callable(render) else "\n".join(m["content"] for m in conversation)

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    return Usage(count(prompt), count(reply) if reply else 0)


@dataclass
class LoadedModel:
    """One model version in memory. A local model is not thread-safe: one generation at a time,
    unless it batches concurrent requests itself (`thread_safe`, models/batching.py); token counting
    always takes the lock (a fast tokenizer is not safe to share across threads)."""

    version_id: int
    name: str
    model: ChatModel
    lock: threading.Lock = field(default_factory=threading.Lock)
    program: Any = None  # the version's compiled RAG program (programs/rag_dspy.CompiledRag), if it has one
    yes_no_threshold: float | None = None  # the version's calibrated yes/no threshold (programs/decide.py)
    copy_min_overlap: float | None = None  # extraction replies copied from the passages (programs/copy.py); None: off

    def conversation(self, question: str, passages: list[Passage]) -> list[Message]:
        """The prompt: the compiled program's when the version has one, else the student's `build_messages`."""
        return build_messages(question, passages) if self.program is None else self.program.messages(question, passages)

    def _generated(self, question: str) -> bool:
        """Whether the reply streams as generated: not a calibrated yes/no decision, not a compiled
        program's parsed reply, not a reply turned into a passage span (those come whole)."""
        if self.program is not None:
            return False
        if decides(self.model, self.program) and is_yes_no_question(question):
            return False
        return self.copy_min_overlap is None

    def _reply(self, question: str, passages: list[Passage], params: GenerationParams) -> str:
        reply = answer_conversations(self.model, [question], [self.conversation(question, passages)], params,
                                     self.yes_no_threshold, decides(self.model, self.program),
                                     passages=[[p.text for p in passages]],
                                     copy_min_overlap=self.copy_min_overlap if self.program is None else None)[0].text
        return reply if self.program is None else self.program.parse(reply)

    def _generating(self):
        """Held while generating: the lock, or nothing for a model that batches concurrent callers."""
        return nullcontext() if getattr(self.model, "thread_safe", False) else self.lock

    def _usage(self, question: str, passages: list[Passage], reply: str, seconds: float) -> Usage:
        with self.lock:
            usage = count_usage(self.model, self.conversation(question, passages), reply)
        usage.seconds = seconds
        return usage

    def chat(self, question: str, passages: list[Passage], params: GenerationParams) -> tuple[str, Usage]:
        """The answer to `question` from `passages`, exactly as eval answers it, and its usage."""
        start = time.perf_counter()  # the deadline counts the wait for the generations ahead too
        with self._generating():
            reply = self._reply(question, passages, params)
        return reply, self._usage(question, passages, reply, time.perf_counter() - start)

    def _pieces(self, question: str, passages: list[Passage], params: GenerationParams) -> Iterator[str]:
        """Streamed pieces; a reply that is decided, parsed or copied comes as one piece (`_generated`)."""
        if self._generated(question):
            return stream_reply(self.model, self.conversation(question, passages), params)
        return iter([self._reply(question, passages, params)])

    def stream(self, question: str, passages: list[Passage], params: GenerationParams,
               usage: Usage) -> Iterator[str]:
        """Reply pieces as they are generated; `usage` is filled in when the reply is complete.

        A producer thread generates (holding the lock, for a model that needs it) and hands pieces
        over a queue, so the lock is released even when the consumer (a client that disconnected)
        stops reading; the producer then stops at its next piece, which ends the request's row in
        a shared batch.
        """
        pieces: queue.Queue[tuple[str, object]] = queue.Queue()
        gone = threading.Event()

        def produce() -> None:
            try:
                start, parts = time.perf_counter(), []
                with self._generating():
                    generated = self._pieces(question, passages, params)
                    for piece in generated:
                        parts.append(piece)
                        pieces.put(("piece", piece))
                        if gone.is_set():
                            break
                    close = getattr(generated, "close", None)
                    if close is not None:
                        close()
                done = self._usage(question, passages, "".join(parts), time.perf_counter() - start)
                usage.prompt_tokens, usage.completion_tokens, usage.seconds = (
                    done.prompt_tokens, done.completion_tokens, done.seconds)
                pieces.put(("end", None))
            except BaseException as err:  # noqa: BLE001 - handed to the consumer, which re-raises it
                pieces.put(("error", err))

        threading.Thread(target=produce, name=f"tuneloop-generate-{self.name}", daemon=True).start()
        try:
            while True:
                kind, value = pieces.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise value  # type: ignore[misc]
                yield value  # type: ignore[misc]
        finally:
            gone.set()


@dataclass(frozen=True)
class Served:
    """What one request uses, start to finish."""

    champion: LoadedModel
    challenger: LoadedModel | None
    retriever: Retriever  # the champion's: its own fine-tuned index (stages/retriever.py), else the project's
    worker: ModelWorker  # runs every model computation of the process (models/batching.py)
    index_stamp: int
    documents: frozenset[str]  # names retrieval can be restricted to
    retriever_paths: tuple[Path, Path] | None = None  # the champion's (embedder, index) folders; None: the project's

    def retrieve(self, question: str, document: str | None) -> list[Passage]:
        # on the worker's thread: the query embedding is model computation, and embedders and
        # tokenizers are not safe to share across threads
        return self.worker.call(self.retriever.retrieve, question, document)


def _on_fresh_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` run on a new thread that ends with it; its result, or its exception raised here."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn(*args)
        except BaseException as err:  # noqa: BLE001 - re-raised in the calling thread
            out["error"] = err

    thread = threading.Thread(target=run, name="tuneloop-load", daemon=True)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["result"]


def _load_program(path: Path | None):
    """A version's compiled RAG program (imports DSPy only when there is one)."""
    if path is None:
        return None
    from tuneloop.programs.rag_dspy import CompiledRag

    return CompiledRag(path)


def _loaded_key(m: LoadedModel | None) -> tuple[int, str | None, float | None] | None:
    return None if m is None else (m.version_id, m.program and str(m.program.path), m.yes_no_threshold)


def _version_key(v: ModelVersion | None) -> tuple[int, str | None, float | None] | None:
    """What serving a version depends on besides its weights: its compiled program and yes/no threshold."""
    if v is None:
        return None
    path = rag_program_path(v)
    return v.id, path and str(path), threshold_of(v.hyperparams)


class ModelState:
    """Holds the current `Served` snapshot and replaces it when the champion changes."""

    def __init__(self, project: Project, sessions: sessionmaker[Session], model_factory: ModelFactory | None = None,
                 embedder: Embedder | None = None):
        self.project, self.sessions = project, sessions
        self.model_factory = model_factory or default_model_factory
        self.embedder = embedder
        self.reload_seconds = project.settings.serve.reload_seconds
        self._served: Served | None = None
        self._check_lock = threading.Lock()  # one check/load at a time
        self._last_check = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed: dict[int, float] = {}  # version id -> when loading it failed
        serve = project.settings.serve
        self.worker = ModelWorker(serve.max_batch, serve.batch_wait_ms / 1000)

    def current(self) -> Served:
        """The snapshot to answer with; also starts a background check when one is due."""
        served = self._served
        if served is None:
            raise StateError("the models are not loaded yet")
        if time.monotonic() - self._last_check >= self.reload_seconds:
            self.check_in_background()
        return served

    def load(self) -> Served:
        """The first load (synchronous): raises StateError when there is no champion or index."""
        if not self.check(initial=True):
            raise StateError("no champion model version: run `tuneloop cycle` or `tuneloop eval` first")
        assert self._served is not None
        return self._served

    def check_in_background(self) -> None:
        """Start a check on a short-lived thread unless one is already running."""
        if not self._check_lock.acquire(blocking=False):
            return
        self._last_check = time.monotonic()  # before the thread starts: one check per interval

        def run() -> None:
            try:
                self._safe_check(locked=True)
            finally:
                self._check_lock.release()

        threading.Thread(target=run, name="tuneloop-reload-check", daemon=True).start()

    def _safe_check(self, locked: bool = False) -> None:
        try:
            self._check_locked() if locked else self.check()
        except Exception:
            log.exception("checking for a new champion failed; still serving the current one")

    def _wanted(self) -> tuple[ModelVersion | None, ModelVersion | None]:
        with self.sessions() as s:
            champ = champion(s)
            challenger = s.scalars(select(ModelVersion).where(ModelVersion.status == Status.CANDIDATE)
                                   .order_by(ModelVersion.id.desc())).first()
            return champ, challenger

    def _index_stamp(self) -> int:
        path = self.project.index_dir / "index.json"
        return path.stat().st_mtime_ns if path.exists() else 0

    def check(self, initial: bool = False) -> bool:
        """Reload when the champion, the challenger or the index changed; True when a snapshot exists."""
        with self._check_lock:
            return self._check_locked(initial)

    def _check_locked(self, initial: bool = False) -> bool:
        self._last_check = time.monotonic()
        champ, challenger = self._wanted()
        if champ is None:
            if self._served is not None:
                log.warning("the store has no champion any more; still serving %s", self._served.champion.name)
            return self._served is not None
        old = self._served
        if old is not None and self._failed_recently(champ.id):
            return True  # keep serving the old champion; the new one is retried later
        if challenger is not None and self._failed_recently(challenger.id):
            challenger = None
        stamp = self._index_stamp()
        if old is not None and (_loaded_key(old.champion), _loaded_key(old.challenger), old.index_stamp) == (
                _version_key(champ), _version_key(challenger), stamp):
            return True
        # the swap: one assignment. Loading runs on a thread that then ends, so the OpenMP team
        # that loading (adapter merges, re-embedding an index) starts goes with it (models/batching.py)
        self._served = _on_fresh_thread(self._build, old, champ, challenger, stamp, initial)
        if old is not None and old.champion.version_id != champ.id:
            log.info("now serving champion %s (was %s)", champ.name, old.champion.name)
        return True

    def _build(self, old: Served | None, champ: ModelVersion, challenger: ModelVersion | None, stamp: int,
               initial: bool) -> Served:
        loaded = {m.version_id: m for m in (old.champion, old.challenger) if m is not None} if old else {}

        def get(version: ModelVersion) -> LoadedModel:
            if version.id in loaded and _loaded_key(loaded[version.id]) == _version_key(version):
                return loaded[version.id]
            log.info("loading model version %s", version.name)
            try:
                program = _load_program(rag_program_path(version))
                threshold = threshold_of(version.hyperparams)
                if version.id in loaded:  # same model, new program or threshold: keep the model (and its lock)
                    return replace(loaded[version.id], program=program, yes_no_threshold=threshold)
                model = batched(self.model_factory(self.project, version), self.worker)
            except Exception:
                self._failed[version.id] = time.monotonic()
                raise
            self._failed.pop(version.id, None)
            return LoadedModel(version.id, version.name, model, program=program, yes_no_threshold=threshold,
                               copy_min_overlap=self.project.settings.answer.copy_threshold)

        paths = version_retriever_paths(champ)  # a challenger is answered from the champion's passages
        if old is not None and (old.index_stamp, old.retriever_paths) == (stamp, paths):
            retriever = old.retriever
        else:  # first: a missing index fails before any model is loaded
            retriever = self._load_retriever(initial, champ)
        new_champion = get(champ)
        new_challenger = None
        if challenger is not None:
            try:
                new_challenger = get(challenger)
            except Exception:  # a broken candidate must not stop the champion from serving
                log.exception("could not load challenger %s; serving without it", challenger.name)
        return Served(new_champion, new_challenger, retriever, self.worker, stamp, frozenset(retriever.documents()),
                      paths)

    def _failed_recently(self, version_id: int) -> bool:
        failed_at = self._failed.get(version_id)
        return failed_at is not None and time.monotonic() - failed_at < RETRY_FAILED_SECONDS

    def _load_retriever(self, initial: bool, champ: ModelVersion) -> Retriever:
        """The champion's retriever, as eval judged it (`Retriever.for_version`)."""
        from tuneloop.ingest.index import IndexNotFoundError

        try:
            with self.sessions() as s:
                return Retriever.for_version(self.project, s, champ, self.embedder)
        except IndexNotFoundError:
            if initial:
                raise StateError("no retrieval index yet: run `tuneloop ingest PATH` first") from None
            raise

    # ------------------------------------------------------------------ background checks

    def start(self) -> None:
        """Check the store every `reload_seconds` on a daemon thread until `stop()`."""
        if self._thread is not None:
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(self.reload_seconds):
                self._safe_check()

        self._thread = threading.Thread(target=loop, name="tuneloop-reload", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
