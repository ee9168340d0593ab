"""asyncio front of the engine: one background thread owns the `LLMEngine` and runs its steps.

Only that thread touches the engine. The event loop talks to it through a command queue (add / abort) under
one condition variable, and the thread hands each output back to the request's asyncio.Queue with
`loop.call_soon_threadsafe`. The thread sleeps on the condition when there is no work. A consumer that stops
iterating (client disconnect, task cancelled) aborts its request, which frees its KV blocks at once.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from lmstack.engine.engine import LLMEngine
from lmstack.engine.request import EngineStats, RequestOutput
from lmstack.generate.sampling import SamplingParams


@dataclass(frozen=True, slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # RequestOutput items, or an exception to raise in the consumer


@dataclass(frozen=True, slots=True)
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True, slots=True)
class _Abort:
    request_id: str
    notify: bool  # deliver a final "abort" output to the stream (False: its consumer is gone)


class AsyncEngine:
    class QueueFull(Exception):
        """max_waiting requests are already waiting: shed load (HTTP 503) instead of queueing forever."""

    def __init__(self, engine: LLMEngine, max_waiting: int = 256) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self._cond = threading.Condition()
        # guarded by _cond:
        self._commands: deque[_Add | _Abort] = deque()
        self._streams: dict[str, _Stream] = {}
        self._queued_adds = 0  # adds not yet applied by the thread
        self._engine_waiting = 0  # the engine's waiting queue after the thread's last step
        self._stop = False  # the thread exits once it has no work left
        self._stats = engine.stats()
        self._closing = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lmstack-engine", daemon=True)
            self._thread.start()

    async def shutdown(self, drain: bool = True, timeout: float = 30) -> None:
        """Refuse new requests; with drain, let the accepted ones finish (aborting what is left after
        `timeout` seconds), else abort them now. Returns once the engine thread has exited."""
        self._closing = True
        self.start()  # a never-started engine still has to answer (abort or finish) its accepted requests
        if not drain:
            self._abort_all()
        with self._cond:
            self._stop = True
            self._cond.notify()
        thread = self._thread
        assert thread is not None
        await asyncio.to_thread(thread.join, timeout)
        if thread.is_alive():
            self._abort_all()
            await asyncio.to_thread(thread.join)

    def stats(self) -> EngineStats:
        return self._stats

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request, the last one `finished`. Refusals (ValueError for a bad request,
        QueueFull, RuntimeError when shutting down) are raised on the first iteration, before any output."""
        if self._closing:
            raise RuntimeError("the engine is shutting down and takes no new requests")
        prompt_ids = list(prompt_ids)
        self.engine.validate(prompt_ids, params)  # reads only immutable engine facts
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._cond:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            if self._queued_adds + self._engine_waiting >= self.max_waiting:
                raise AsyncEngine.QueueFull(f"{self.max_waiting} requests are already waiting")
            self._streams[request_id] = stream
            self._queued_adds += 1
            self._commands.append(_Add(request_id, prompt_ids, params))
            self._cond.notify()
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine already dropped it
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:  # the consumer went away: free the blocks now
                self._submit(_Abort(request_id, notify=False))

    async def abort(self, request_id: str) -> None:
        """Abort a request; its stream ends with a finish_reason="abort" output."""
        self._submit(_Abort(request_id, notify=True))

    # --- the engine thread -------------------------------------------------------------------------------
    def _submit(self, command: _Add | _Abort) -> None:
        with self._cond:
            if isinstance(command, _Abort) and not command.notify:
                self._streams.pop(command.request_id, None)
            self._commands.append(command)
            self._cond.notify()

    def _abort_all(self) -> None:
        with self._cond:
            ids = list(self._streams)
        for rid in ids:
            self._submit(_Abort(rid, notify=True))

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._commands and not self.engine.has_unfinished():
                        if self._stop:
                            self._fail_streams(RuntimeError("the engine has shut down"))
                            return
                        self._cond.wait()
                    commands = list(self._commands)
                    self._commands.clear()
                for command in commands:
                    self._apply(command)
                outputs: list[RequestOutput] = []
                if self.engine.has_unfinished():
                    try:
                        outputs = self.engine.step()
                    except Exception as error:  # a failed forward fails its requests, not the server
                        self._fail_all(error)
                with self._cond:
                    self._engine_waiting = self.engine.scheduler.num_waiting
                    self._stats = self.engine.stats()
                self._dispatch(outputs)

    def _apply(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            self.engine.abort(command.request_id)
            return
        try:
            self.engine.add_request(command.request_id, command.prompt_ids, command.params)
        except ValueError as error:
            self._fail(command.request_id, error)
        finally:
            with self._cond:
                self._queued_adds -= 1

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        with self._cond:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue  # its consumer is gone
                if out.finished:
                    del self._streams[out.request_id]
                self._put(stream, out)

    def _put(self, stream: _Stream, item: RequestOutput | BaseException) -> None:
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # its event loop is closed
            pass

    def _fail(self, request_id: str, error: BaseException) -> None:
        with self._cond:
            stream = self._streams.pop(request_id, None)
        if stream is not None:
            self._put(stream, error)

    def _fail_all(self, error: BaseException) -> None:
        for rid in list(self.engine.scheduler.requests):
            self.engine.abort(rid)
            self._fail(rid, error)

    def _fail_streams(self, error: BaseException) -> None:
        """Under _cond: streams still open when the thread exits end with an error, never hang."""
        for stream in self._streams.values():
            self._put(stream, error)
        self._streams.clear()
