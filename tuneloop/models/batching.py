"""Serving on one compute thread: concurrent requests to a local model are answered together.

`tuneloop serve` answers each HTTP request on a thread of its own. Two things follow on a CPU:

1. A local model generates one batch at a time, so requests that arrive together used to wait in
   line, each for every reply ahead of it. Here they share batches: a `ModelWorker` takes every
   waiting request (up to `max_batch`, after waiting `wait_seconds` for requests sent at the same
   moment), groups them by model and sampling settings, and answers each group with one padded
   `generate()` call (`LocalChatModel.generate_ids`, the path `chat` takes, so a greedy reply is
   the one a request alone gets); yes/no decisions (`yes_no_margins`) are batched the same way.
2. torch's CPU kernels run on an OpenMP thread team that belongs to the thread that calls them.
   With a second team in the process (another thread that once ran torch code, such as the one
   that embedded a query), GNU OpenMP has more threads than cores and stops spinning between
   parallel regions: generation measured 1.65x slower, a matrix-vector product 3.6x
   (docs/benchmarks.md, "Serving many users"). So every model computation of the serving
   process runs on the worker's one thread: generation, yes/no margins, and (through `call`) the
   retriever's query embeddings, run between two generation steps so a new request's retrieval
   does not wait for a batch to end. The worker thread ends when idle (its team goes with it)
   and starts again with the next request.

Per request, inside a shared batch:
- its own `max_new_tokens` and deadline (`max_time`, counted from when it was queued) end its row
  (transformers' per-row stopping: a `StoppingCriteria` returning one bool per row);
- its reply is handed back the moment its row ends (end of sequence, its limit, its deadline),
  not when the batch's longest reply ends; a streamed reply gets its tokens step by step from a
  streamer that routes each row's token to its request;
- a streaming client that goes away (its generator is closed) ends its row at the next step.

Why a scheduler of our own rather than transformers' continuous batching (`generate_batch`,
`ContinuousBatchingManager`, paged attention): on the 2-core CPU here it measured 0.57-0.72x
one-prompt-at-a-time, against 1.90x for padded batches (docs/benchmarks.md, "Generation on
CPU"). The price of padded `generate()`: a row that has ended still takes its slot until the batch
ends, and a request arriving mid-batch waits for the next batch.

Sampled replies in one batch share one random stream, so a request's `seed` is honoured only
when it is alone in its batch (greedy replies do not depend on it).
"""
from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

from tuneloop.models.base import ChatModel, GenerationParams, Message
from tuneloop.models.local import LocalChatModel, stripped

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Call:
    """A function to run on the worker thread (e.g. embedding a query)."""

    fn: Callable[..., Any]
    args: tuple
    future: Future = field(default_factory=Future)

    def run(self) -> None:
        try:
            self.future.set_result(self.fn(*self.args))
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            self.future.set_exception(err)


@dataclass(eq=False)
class _Request:
    """One conversation waiting for its reply (`params` None: a yes/no margin, no generation)."""

    model: BatchingChatModel
    conversation: list[Message]
    params: GenerationParams | None
    streamer: TextIteratorStreamer | None = None
    queued: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False  # its client went away
    done: bool = False

    def group(self) -> tuple:
        """Requests of one group can share a batch."""
        p = self.params
        if p is None:
            return (self.model, "margin")
        return (self.model, "sample", p.temperature, p.top_p) if p.temperature > 0 else (self.model, "greedy")

    def should_stop(self, now: float) -> bool:
        p = self.params
        late = p is not None and p.max_time is not None and now - self.queued >= p.max_time
        return self.cancelled or late or (p is not None and len(self.tokens) >= p.max_new_tokens)


class _RowRouter(BaseStreamer):
    """Hands each generation step's token of row i to request i, ends a row at its end of
    sequence, and between two steps lets the worker run waiting calls (`between_steps`); rows
    past their limit or deadline are ended right after by `_RowsDone`."""

    def __init__(self, rows: list[_Request], eos_ids: set[int], finish, between_steps) -> None:
        self.rows, self.eos_ids, self.finish, self.between_steps = rows, eos_ids, finish, between_steps
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        self.between_steps()
        if not self.prompt_seen:  # generate() puts the prompt ids first
            self.prompt_seen = True
            return
        for row, token in zip(self.rows, value.reshape(-1).tolist()):
            if row.done:
                continue
            if token in self.eos_ids:
                self.finish(row)
                continue
            row.tokens.append(token)
            if row.streamer is not None:
                row.streamer.put(torch.tensor([token]))

    def end(self) -> None:
        pass


class _RowsDone(StoppingCriteria):
    """Per-row stopping, after each step's tokens are routed: a row ends at its own limit, at its
    deadline, or when its client has gone."""

    def __init__(self, rows: list[_Request], finish) -> None:
        self.rows, self.finish = rows, finish

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        now = time.monotonic()
        for row in self.rows:
            if not row.done and row.should_stop(now):
                self.finish(row)
        return torch.tensor([row.done for row in self.rows], dtype=torch.bool, device=input_ids.device)


class ModelWorker:
    """The one thread that runs a serving process's model computations, batching generation.

    `call(fn, *args)` runs `fn` there; `BatchingChatModel`s built on this worker queue their
    requests here. Started by the first job, ended when no job is left."""

    def __init__(self, max_batch: int = 8, wait_seconds: float = 0.01) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self.max_batch, self.wait_seconds = max_batch, wait_seconds
        self._queue: queue.Queue[_Call | _Request] = queue.Queue()
        self._lock = threading.Lock()  # guards starting and ending the thread
        self._thread: threading.Thread | None = None
        self._pending: list[_Request] = []  # the worker thread's own: requests waiting for a batch

    @property
    def running(self) -> bool:
        return self._thread is not None

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` run on the worker thread; its result, or its exception raised here."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        job = _Call(fn, args)
        self.submit(job)
        return job.future.result()

    def submit(self, item: _Call | _Request) -> None:
        """Queue a call or a request, starting the thread when none runs."""
        with self._lock:
            self._queue.put(item)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tuneloop-model-worker", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as err:  # a fault here must not leave callers waiting for ever
            with self._lock:
                self._thread = None  # the next job starts a new thread
                waiting, self._pending = self._pending, []
                while not self._queue.empty():
                    waiting.append(self._queue.get_nowait())
            for item in waiting:
                if not item.future.done():
                    item.future.set_exception(err)
            log.exception("the model worker failed; the requests waiting on it got the error")

    def _serve(self) -> None:
        """Answer batches while jobs wait; end when none is left (started again by `submit`)."""
        while True:
            self._take()
            if not self._pending:
                with self._lock:
                    if self._queue.empty():
                        self._thread = None
                        return
                continue
            if len(self._pending) < self.max_batch:  # requests sent together arrive a few ms apart
                time.sleep(max(0.0, self._pending[0].queued + self.wait_seconds - time.monotonic()))
                self._take()
            group = self._pending[0].group()
            batch = [r for r in self._pending if r.group() == group][: self.max_batch]
            self._pending = [r for r in self._pending if r not in batch]
            batch[0].model.answer(batch, self._take)

    def _take(self) -> None:
        """Run the waiting calls; keep the waiting requests for a batch."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Call):
                item.run()
            else:
                self._pending.append(item)


class BatchingChatModel:
    """A `LocalChatModel` whose concurrent callers are answered in shared batches on a
    `ModelWorker`'s thread (see the module doc)."""

    thread_safe = True  # callers need no lock around chat/stream/yes_no_margins (serve/state.LoadedModel)

    def __init__(self, model: LocalChatModel, worker: ModelWorker) -> None:
        self.model, self.worker, self.name = model, worker, model.name
        # Callers count tokens with this copy (under their own lock); the worker alone uses the
        # model's tokenizer: a fast tokenizer must not be used by two threads at once.
        self.tokenizer = copy.deepcopy(model.tokenizer)
        eos = model.model.generation_config.eos_token_id
        self._eos_ids = {eos} if isinstance(eos, int) else set(eos or [model.tokenizer.eos_token_id])

    # ------------------------------------------------------------------ the ChatModel side

    def render(self, conversation: list[Message]) -> str:
        return self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    def chat(self, conversations: Sequence[list[Message]], params: GenerationParams) -> list[str]:
        requests = [self._submit(_Request(self, list(c), params)) for c in conversations]
        return [r.future.result() for r in requests]

    def yes_no_margins(self, conversations: Sequence[list[Message]]) -> list[float]:
        requests = [self._submit(_Request(self, list(c), None)) for c in conversations]
        return [r.future.result() for r in requests]

    def stream(self, conversation: list[Message], params: GenerationParams) -> Iterator[str]:
        """Reply pieces as they are generated (concatenated: the stripped reply `chat` returns).
        Closing the iterator early ends the request's row at the next generation step."""
        streamer = TextIteratorStreamer(self.model.tokenizer, skip_prompt=False, skip_special_tokens=True)
        request = self._submit(_Request(self, list(conversation), params, streamer))
        try:
            yield from stripped(streamer)
        finally:
            request.cancelled = True  # no effect once it is done
        request.future.result()  # re-raises a failed generation

    def _submit(self, request: _Request) -> _Request:
        self.worker.submit(request)
        return request

    # ------------------------------------------------------------------ on the worker thread

    def answer(self, batch: list[_Request], between_steps: Callable[[], None]) -> None:
        """Answer one batch of this model's requests (all of one `group`)."""
        now = time.monotonic()
        rows = []
        for r in batch:
            if r.should_stop(now):  # gone or out of time before it started: an empty reply
                self._finish(r)
            else:
                rows.append(r)
        if not rows:
            return
        try:
            if rows[0].params is None:
                margins = self.model.yes_no_margins([r.conversation for r in rows])
                for r, m in zip(rows, margins):
                    r.done = True
                    r.future.set_result(m)
            else:
                self._generate(rows, between_steps)
        except BaseException as err:  # noqa: BLE001 - every waiting caller gets the error
            for r in rows:
                if not r.done:
                    r.done = True
                    r.future.set_exception(err)
                    if r.streamer is not None:
                        r.streamer.end()

    @torch.inference_mode()
    def _generate(self, rows: list[_Request], between_steps: Callable[[], None]) -> None:
        first = rows[0].params
        assert first is not None
        # the batch runs to its longest request; each row stops at its own limit and deadline
        params = replace(first, max_new_tokens=max(r.params.max_new_tokens for r in rows), max_time=None)
        prompts = [self.model.render(r.conversation) for r in rows]
        router = _RowRouter(rows, self._eos_ids, self._finish, between_steps)
        self.model.generate_ids(prompts, params, first.seed, streamer=router,
                                stopping_criteria=StoppingCriteriaList([_RowsDone(rows, self._finish)]))
        for r in rows:
            self._finish(r)

    def _finish(self, row: _Request) -> None:
        """Hand a generated row its reply (decoded as `LocalChatModel.chat` decodes it)."""
        if row.done:
            return
        row.done = True
        if row.params is None:
            row.future.set_result(float("nan"))  # a yes/no request dropped before it ran
            return
        if row.streamer is not None:
            row.streamer.end()
        row.future.set_result(self.model.tokenizer.decode(row.tokens, skip_special_tokens=True).strip())


def batched(model: ChatModel, worker: ModelWorker) -> ChatModel:
    """`model` answering its concurrent callers in shared batches on `worker` when it is a local
    model; otherwise `model` itself (an endpoint batches on its own server)."""
    return BatchingChatModel(model, worker) if isinstance(model, LocalChatModel) else model
