"""AsyncEngine: one background thread steps an LLMEngine; asyncio callers add requests and stream.

Thread model. The loop thread is the only thread that touches the LLMEngine. Callers (coroutines on
an asyncio event loop) hand it commands (add, abort) through a locked deque and wake it with a
condition variable. Each loop iteration runs the pending commands, then one `engine.step()`, then
delivers the step's RequestOutputs: one `call_soon_threadsafe` per step puts each output on its
request's asyncio.Queue. When nothing is pending the thread sleeps on the condition.

Outputs are cumulative, so a slow consumer loses nothing by skipping to the newest output
(`RequestStream` does exactly that). An add that the engine rejects (InvalidParameterError,
PromptTooLongError) raises in the caller, and so does a request id already in flight here, before any
state changes: the request holding that id streams on undisturbed. A failure inside `step()` is
logged, counted in `num_step_errors`, and raised in every in-flight request's stream; the loop goes on.

    stream = await aengine.add_request(prompt_ids, params)   # raises on invalid input
    async for out in stream: ...                              # cumulative RequestOutputs
    aengine.abort(stream.request_id)                          # frees the request's KV blocks
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import threading
from collections.abc import AsyncIterator

from tierlm.core.errors import InvalidParameterError
from tierlm.core.outputs import RequestOutput
from tierlm.core.sampling_params import SamplingParams
from tierlm.engine.llm_engine import LLMEngine

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop has stopped; no request can be served."""


class RequestStream:
    """The caller's end of one request: an async iterator of cumulative RequestOutputs."""

    def __init__(self, request_id: str, num_seqs: int, owner: "AsyncEngine"):
        self.request_id = request_id
        self.num_seqs = num_seqs
        self.finished = False
        self._owner = owner
        self._queue: asyncio.Queue = asyncio.Queue()

    def _put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                item = await self._queue.get()
                while not self._queue.empty():  # outputs are cumulative: skip to the newest
                    nxt = self._queue.get_nowait()
                    item = nxt if not isinstance(item, BaseException) else item
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                if item.finished:
                    self.finished = True
                yield item
        finally:
            if not self.finished:  # consumer stopped early (disconnect, timeout, cancel)
                self.abort()

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._owner.abort(self.request_id, stream=self)


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._cond = threading.Condition()
        self._commands: collections.deque = collections.deque()
        self._streams: dict[str, tuple[RequestStream, asyncio.AbstractEventLoop]] = {}
        self._ids = itertools.count()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._looping = threading.Event()  # set when the loop starts
        self._exited = threading.Event()  # set when it has ended and failed what was left
        self.num_step_errors = 0
        # Snapshots written by the loop thread after each step; read anywhere (plain ints).
        self.num_running = 0
        self.num_waiting = 0
        self.num_seqs_in_flight = 0

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> "AsyncEngine":
        """Run the loop on a new daemon thread (no-op when a loop already runs)."""
        with self._cond:
            if self._thread is not None:
                return self
            self._thread = threading.Thread(target=self._loop, name="tierlm-engine-loop", daemon=True)
            self._looping.set()
        self._thread.start()
        return self

    def claim_current_thread(self) -> None:
        """Reserve the calling thread for the loop; `run_loop()` must follow on this thread.

        Prefer this over `start()` when the engine was built on this thread (the main thread in
        `tierlm serve`): on CPU, torch's OpenMP pool then stays the one pool of the process. A second
        thread driving torch makes libgomp see more threads than cores and stop spin-waiting, and
        every matmul pays a futex wake-up (measured: 150 -> 245 us for a decode-sized matmul on 2 cores).
        """
        with self._cond:
            if self._thread is not None:
                raise RuntimeError("the engine loop is already running")
            self._thread = threading.current_thread()

    def run_loop(self) -> None:
        """Serve on the calling thread (claimed first) until `shutdown()`."""
        if self._thread is not threading.current_thread():
            self.claim_current_thread()
        self._loop()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop thread; requests still in flight are aborted and their streams fail."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._looping.is_set() and self._thread is not threading.current_thread():
            self._exited.wait(timeout)

    # ---- caller side (event loop thread) -------------------------------------------------------
    async def add_request(self, prompt: str | list[int], params: SamplingParams,
                          request_id: str | None = None, priority: int = 0) -> RequestStream:
        """Hand the request to the loop; returns its stream once the engine has accepted it.

        Raises EngineDeadError when the loop is not running, InvalidParameterError (param="request_id")
        when `request_id` is already in flight here, and whatever the engine's add_request raises.
        """
        if not self.is_running:
            raise EngineDeadError("the engine loop is not running")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        stream = RequestStream(rid, params.n, self)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        loop = asyncio.get_running_loop()
        with self._cond:
            if self._stop:  # shutdown() won the race: the loop has drained (or will never run) its commands
                raise EngineDeadError("the engine loop is not running")
            if rid in self._streams:  # checked before any state changes: the request holding rid goes on
                raise InvalidParameterError(f"request id {rid!r} is already in flight",
                                            "use a unique request_id, or wait until that request finishes",
                                            param="request_id")
            self._streams[rid] = (stream, loop)
            self.num_seqs_in_flight += params.n
            self._commands.append(("add", rid, prompt, params, priority, fut))
            self._cond.notify()
        try:
            await asyncio.wrap_future(fut)
        except BaseException:
            # Rejected by the engine: nothing was added, and rid may name a request the engine holds for
            # someone else. Otherwise the caller gave up (cancel, timeout) after the loop may have added it.
            rejected = fut.done() and not fut.cancelled() and fut.exception() is not None
            self._forget(rid, stream, then_abort=not rejected)
            raise
        return stream

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        stream = await self.add_request(prompt, params, request_id)
        async for out in stream:
            yield out

    def abort(self, request_id: str, stream: RequestStream | None = None) -> None:
        """Abort a request (thread-safe, idempotent); its KV blocks are freed on the loop thread. With
        `stream`, only if the id still belongs to that stream: a stale stream whose request has finished
        never aborts a newer request that reused its id."""
        self._forget(request_id, stream, then_abort=True)

    def _forget(self, request_id: str, stream: RequestStream | None = None, then_abort: bool = False) -> bool:
        """Drop the request's stream entry (only if it is `stream`, when given) and, with then_abort, queue
        the engine-side abort under the same lock. True when an entry was dropped."""
        with self._cond:
            entry = self._streams.get(request_id)
            if entry is None or (stream is not None and entry[0] is not stream):
                return False
            del self._streams[request_id]
            self.num_seqs_in_flight -= entry[0].num_seqs
            if then_abort:
                self._commands.append(("abort", request_id))
                self._cond.notify()
            return True

    async def rearm_drift_guard(self) -> bool:
        """Clear a drift-guard trip on the loop thread (LLMEngine.rearm_drift_guard); returns whether it was
        tripped. The KV format switches back once the running requests drain."""
        if not self.is_running:
            raise EngineDeadError("the engine loop is not running")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            self._commands.append(("rearm", fut))
            self._cond.notify()
        return await asyncio.wrap_future(fut)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Block until no command is pending and the engine has no unfinished request (tests)."""
        with self._cond:
            return self._cond.wait_for(
                lambda: not self._commands and not self._streams and not self.engine.has_unfinished_requests(),
                timeout)

    # ---- loop thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        self._looping.set()
        try:
            self._serve()
        except BaseException as e:  # noqa: BLE001 - the loop must never die with streams left hanging
            log.exception("engine loop crashed; failing every in-flight request")
            with self._cond:
                self._stop = True
                pending = list(self._commands)
                self._commands.clear()
            dead = EngineDeadError(f"the engine loop crashed: {e}")
            for cmd in pending:
                if cmd[0] in ("add", "rearm") and cmd[-1].set_running_or_notify_cancel():
                    cmd[-1].set_exception(dead)
            self._fail_all(dead)
        finally:
            self._exited.set()

    def _serve(self) -> None:
        eng = self.engine
        while True:
            with self._cond:
                while not self._stop and not self._commands and not eng.has_unfinished_requests():
                    self._cond.notify_all()  # wake wait_idle()
                    self._cond.wait()
                if self._stop:
                    break
                commands = list(self._commands)
                self._commands.clear()
            for cmd in commands:
                self._run_command(cmd)
            try:
                outputs = eng.step()
            except Exception as e:  # noqa: BLE001 - counted, logged, and raised in every stream
                self.num_step_errors += 1
                log.exception("engine step failed; failing %d in-flight requests", len(self._streams))
                self._fail_all(e)
                continue
            self.num_running = len(eng.scheduler.running)
            self.num_waiting = len(eng.scheduler.waiting)
            if outputs:
                self._deliver(outputs)
        dead = EngineDeadError("the engine is shutting down")
        with self._cond:
            pending = list(self._commands)
            self._commands.clear()
        for cmd in pending:
            if cmd[0] in ("add", "rearm") and cmd[-1].set_running_or_notify_cancel():
                cmd[-1].set_exception(dead)
        self._fail_all(dead)
        with self._cond:
            self._cond.notify_all()

    def _run_command(self, cmd: tuple) -> None:
        if cmd[0] == "abort":
            self.engine.abort_request(cmd[1])
            return
        if cmd[0] == "rearm":
            fut = cmd[1]
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(self.engine.rearm_drift_guard())
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(e)
            return
        _, rid, prompt, params, priority, fut = cmd
        if not fut.set_running_or_notify_cancel():
            return
        try:
            self.engine.add_request(prompt, params, rid, priority)
        except BaseException as e:  # noqa: BLE001 - handed to the caller, which raises it
            fut.set_exception(e)
            return
        fut.set_result(rid)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._cond:
            for out in outputs:
                entry = self._streams.get(out.request_id)
                if entry is None:
                    continue  # aborted meanwhile
                if out.finished:
                    self._streams.pop(out.request_id)
                    self.num_seqs_in_flight -= entry[0].num_seqs
                by_loop.setdefault(entry[1], []).append((entry[0], out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the caller's event loop is closed
                for stream, _ in items:
                    self.abort(stream.request_id, stream)

    def _fail_all(self, err: BaseException) -> None:
        with self._cond:
            entries = list(self._streams.items())
            self._streams.clear()
            self.num_seqs_in_flight = 0
        for rid, (stream, loop) in entries:
            self.engine.abort_request(rid)
            try:
                loop.call_soon_threadsafe(stream._put, err)
            except RuntimeError:
                pass


def _put_all(items: list) -> None:
    for stream, out in items:
        stream._put(out)
