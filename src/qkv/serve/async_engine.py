"""Drive one `Engine` from one background thread; hand outputs to asyncio handlers.

The engine is not thread-safe, so exactly one thread owns it: the loop below drains a
command queue (add / abort), runs `engine.step()` while anything is unfinished (this is
the continuous batching: requests join and leave the running batch between steps), and
pushes each `RequestOutput` to its request's asyncio.Queue with `loop.call_soon_threadsafe`.
HTTP handlers only ever put commands and await queues, so they never block the loop and
the loop never waits on a slow client.

Admission is bounded: at most `max_queue` requests may be in flight (waiting or running);
beyond that `submit` raises `QueueFull` and the server answers 429 at once instead of
letting latency grow without limit.

The engine thread should be the only thread that runs parallel torch or native work: every
thread that does keeps its own OpenMP team alive, and once the process holds more OpenMP
threads than CPUs, libgomp stops spin-waiting between parallel regions and puts its threads
to sleep, so each of a decode step's hundreds of small products waits for a wake-up (on 2
cores: 22 ms a token instead of 16). `on_passing_thread` runs set-up work (loading the
model, allocating the cache) on a thread that then exits, taking its team with it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from qkv.infer.engine import RequestOutput
from qkv.infer.sampling import SamplingParams

log = logging.getLogger("qkv.serve")
T = TypeVar("T")


class QueueFull(Exception):
    pass


class EngineDead(Exception):
    pass


class EngineError(RuntimeError):
    """engine.step() failed: the server's fault (500), whatever exception type it raised."""


def on_passing_thread(fn: Callable[[], T]) -> T:
    """fn() on a new thread that exits when it returns (see the module's note on OpenMP
    teams); its exception, if any, is raised here."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller, whatever it is
            box["error"] = e

    t = threading.Thread(target=run, name="qkv-setup", daemon=True)  # daemon: Ctrl+C need not wait for it
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _put_all(batch: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in batch:
        q.put_nowait(item)


@dataclass
class _Done:
    request_id: str


@dataclass
class _Failed:
    request_id: str
    error: BaseException


@dataclass
class _Stream:
    """Per-request plumbing: where outputs go and which samples are still running."""

    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    n: int
    accepted: asyncio.Future  # resolved once engine.add_request returned (or raised)
    finished: set[int] = field(default_factory=set)


class AsyncEngine:
    def __init__(self, engine, max_queue: int = 256, idle_wait_s: float = 0.05):
        self.engine = engine
        self.max_queue = max_queue
        self.idle_wait_s = idle_wait_s
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # owned by the engine thread
        self._in_flight = 0  # admitted and not yet finished; guarded by _lock
        self._lock = threading.Lock()
        self._dead = False  # set once by the engine thread as it exits; guarded by _lock
        self._next_id = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        # read by /metrics from other threads: replaced (never mutated) by the engine thread
        self.stats: dict = dict(engine.stats(), step_seconds_total=0.0)
        self._step_seconds = 0.0  # wall time inside engine.step(), summed
        # (time, tokens generated, steps, rows, step seconds) samples of the last ~5 s
        self._window: deque[tuple[float, int, int, int, float]] = deque(maxlen=4096)
        self.tokens_per_second = 0.0
        self.seconds_per_step = 0.0  # mean wall time of a step over the window
        self.rows_per_step = 0.0  # mean sequences per step over the window
        self.batch_occupancy = 0.0  # rows_per_step / max_num_seqs

    # --- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="qkv-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._commands.put(("wake",))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    # --- handler side (any asyncio loop) ----------------------------------------------
    def submit(
        self, prompt_ids: list[int], params: SamplingParams, q: asyncio.Queue | None = None
    ) -> tuple[str, asyncio.Queue, asyncio.Future]:
        """Queue a request. Returns its id, the asyncio.Queue its outputs arrive on (pass
        `q` to let several requests share one queue; read it with `results`) and a future
        that resolves when the engine accepted it or raises the engine's refusal
        (ValueError = the client's fault)."""
        q = q if q is not None else asyncio.Queue()
        loop = asyncio.get_running_loop()
        accepted = loop.create_future()
        with self._lock:  # enqueued under the lock: the dying loop fails whatever got in (see _run)
            if self._dead or not self.alive:
                raise EngineDead("the engine loop is not running; restart the server")
            if self._in_flight >= self.max_queue:
                raise QueueFull(f"server is at capacity ({self.max_queue} requests in flight); retry later")
            self._in_flight += 1
            self._next_id += 1
            rid = f"req-{self._next_id}"
            self._commands.put(("add", rid, prompt_ids, params, _Stream(q, loop, params.n, accepted)))
        return rid, q, accepted

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    async def results(self, request_ids: list[str], q: asyncio.Queue) -> AsyncIterator[list[RequestOutput]]:
        """Yield the outputs of `request_ids` (sharing queue `q`) until every sample of each
        finished, as lists: everything that arrived since the last read (one engine step's
        outputs, or several steps' when the reader fell behind), so a response writes them
        in one go. Raises the engine's exception if it refused one (ValueError = the
        client's fault). If the consumer stops early (client gone, task cancelled, error),
        the unfinished requests are aborted, which frees their KV blocks."""
        pending = set(request_ids)
        try:
            while pending:
                items = [await q.get()]
                while not q.empty():
                    items.append(q.get_nowait())
                batch = []
                for item in items:
                    if isinstance(item, _Done):
                        pending.discard(item.request_id)
                    elif isinstance(item, _Failed):
                        pending.discard(item.request_id)
                        if batch:
                            yield batch
                        raise item.error
                    else:
                        batch.append(item)
                if batch:
                    yield batch
        finally:
            for rid in pending:
                self.abort(rid)

    # --- engine thread -----------------------------------------------------------------
    def _deliver(self, stream: _Stream, item) -> None:
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _resolve(self, stream: _Stream, error: BaseException | None) -> None:
        def resolve():
            if not stream.accepted.done():  # the handler may have given up already
                if error is None:
                    stream.accepted.set_result(True)
                else:
                    stream.accepted.set_exception(error)

        stream.loop.call_soon_threadsafe(resolve)

    def _release(self, rid: str) -> None:
        if self._streams.pop(rid, None) is not None:
            with self._lock:
                self._in_flight -= 1

    def _handle(self, cmd: tuple) -> None:
        if cmd[0] == "add":
            _, rid, prompt_ids, params, stream = cmd
            self._streams[rid] = stream
            try:
                self.engine.add_request(prompt_ids, params, request_id=rid)
            except Exception as e:  # ValueError: the client's fault -> 400; anything else -> 500
                self._resolve(stream, e)
                self._deliver(stream, _Failed(rid, e))
                self._release(rid)
            else:
                self._resolve(stream, None)
        elif cmd[0] == "abort":
            rid = cmd[1]
            if rid in self._streams:
                try:
                    self.engine.abort(rid)
                except Exception:  # already finished between the client leaving and now
                    log.debug("abort of %s failed", rid, exc_info=True)
                # nobody reads this stream any more; forget it even if the engine emits
                # a final "abort" output later
                self._release(rid)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        # one wake-up of each event loop per step, not one per output: with 64 streams a
        # call_soon_threadsafe per token would cost more than the tiny model's forward
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            batch = batches.setdefault(stream.loop, [])
            if out.error is not None:  # the engine aborted this request alone: a server fault
                log.error("request %s failed: %s", out.request_id, out.error)
                batch.append((stream.queue, _Failed(out.request_id, EngineError(out.error))))
                self._release(out.request_id)
                continue
            batch.append((stream.queue, out))
            if out.finished:
                stream.finished.add(out.index)
                if len(stream.finished) >= stream.n:
                    batch.append((stream.queue, _Done(out.request_id)))
                    self._release(out.request_id)
        for loop, batch in batches.items():
            loop.call_soon_threadsafe(_put_all, batch)

    def _fail_all(self, err: BaseException) -> None:
        for rid, stream in list(self._streams.items()):
            self._resolve(stream, err)
            self._deliver(stream, _Failed(rid, err))
            try:
                self.engine.abort(rid)
            except Exception:
                pass
            self._release(rid)

    def _update_stats(self) -> None:
        stats = dict(self.engine.stats(), step_seconds_total=self._step_seconds)
        t = time.monotonic()
        count = [int(stats.get(k, 0)) for k in ("generated_tokens_total", "steps_total", "step_rows_total")]
        now = (t, *count, self._step_seconds)
        self._window.append(now)
        while len(self._window) > 2 and t - self._window[0][0] > 5.0:
            self._window.popleft()
        t0, tokens0, steps0, rows0, secs0 = self._window[0]
        steps = now[2] - steps0
        self.tokens_per_second = (now[1] - tokens0) / (t - t0) if t > t0 else 0.0
        self.seconds_per_step = (now[4] - secs0) / steps if steps else 0.0
        self.rows_per_step = (now[3] - rows0) / steps if steps else 0.0
        self.batch_occupancy = self.rows_per_step / max(1, stats.get("max_num_seqs", 1))
        self.stats = stats

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # the thread is dying (not an engine error: those are caught below)
            log.critical("engine loop died", exc_info=True)
            self.error = e
        finally:
            self._fail_pending()

    def _fail_pending(self) -> None:
        """The loop is gone: nobody will serve what is queued or running, so fail it all
        now (503) rather than leave clients waiting forever."""
        with self._lock:
            self._dead = True
        dead = EngineDead("the engine loop stopped; restart the server")
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if cmd[0] == "add":
                _, rid, _, _, stream = cmd
                self._streams[rid] = stream
        for rid, stream in list(self._streams.items()):
            try:
                self._resolve(stream, dead)
                self._deliver(stream, _Failed(rid, dead))
            except RuntimeError:  # its event loop is closed already (server shutting down)
                pass
            self._release(rid)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.engine.has_unfinished()
                # drain commands; when idle, sleep on the queue instead of spinning
                try:
                    cmd = self._commands.get_nowait() if busy else self._commands.get(timeout=self.idle_wait_s)
                    while True:
                        self._handle(cmd)
                        cmd = self._commands.get_nowait()
                except queue.Empty:
                    pass
                if self.engine.has_unfinished():
                    t0 = time.perf_counter()
                    outputs = self.engine.step()
                    self._step_seconds += time.perf_counter() - t0
                    self._dispatch(outputs)
                self._update_stats()  # also while idle (every idle_wait_s), so the windowed rates fall to 0
            except Exception as e:  # an engine bug: fail the in-flight requests, keep serving
                log.exception("engine step failed")
                self.error = e
                self._fail_all(EngineError(f"engine step failed: {type(e).__name__}: {e}"))
