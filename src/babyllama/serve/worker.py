"""The engine thread: the one thread that owns the model. It loads the run (the server answers
`/health` with 503 meanwhile), then loops: take queued requests into the continuous-batching
`Scheduler`, run a step, hand each step's events to the asyncio side with one
`call_soon_threadsafe` per step.

LoRA adapters (`--adapter NAME=DIR`) are switched for the whole batch (peft sets one active
adapter per model), so requests for another adapter wait until the running batch has drained;
the queue stays first come, first served.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from babyllama.errors import UserError
from babyllama.infer.scheduler import Event, Request, Scheduler
from babyllama.serve.protocol import APIError

log = logging.getLogger("babyllama.serve")


@dataclass(eq=False)
class Handle:
    """The asyncio side of one request: its events arrive on `queue` (an Event, or an APIError
    when the engine failed); `adapter` is the model name's adapter (None: the run itself)."""
    request: Request
    adapter: str | None
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: int = 0


class EngineThread:
    """Loads `run` (with `adapters`, {name: dir}) on `device` and serves requests."""

    def __init__(self, run: str | Path, device: str = "auto", adapters: dict[str, str] | None = None,
                 max_batch: int = 16, max_queue: int = 64, on_failure=None):
        self.run, self.device, self.adapter_dirs = Path(run), device, dict(adapters or {})
        self.max_batch, self.max_queue = max_batch, max_queue
        self.on_failure = on_failure
        self.llm = None
        self.scheduler: Scheduler | None = None
        self.error: str | None = None
        self.ready = threading.Event()
        self.stopping = False
        self.wake = threading.Condition()
        self.inbox: deque[Handle] = deque()
        self.handles: dict[int, Handle] = {}
        self.thread = threading.Thread(target=self.main, name="babyllama-engine", daemon=True)

    # -- asyncio side -----------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """End the engine thread after its current step, and wait for it: a thread still inside
        torch when the interpreter exits can abort the process ("terminate called...")."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout=30)

    @property
    def status(self) -> str:
        return "error" if self.error else "ok" if self.ready.is_set() else "loading"

    @property
    def context(self) -> int:
        return self.llm.model.config.max_position_embeddings

    def submit(self, request: Request, adapter: str | None) -> Handle:
        """Queue a request checked by `Scheduler.check`. APIError 429 when `max_queue` requests
        are already waiting for a place in the batch."""
        waiting = len(self.inbox) + (self.scheduler.waiting_count if self.scheduler else 0)
        if waiting >= self.max_queue:
            raise APIError(429, f"the server is busy: {waiting} requests are waiting (--max-queue "
                                 f"{self.max_queue}); retry later", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"})
        handle = Handle(request, adapter, asyncio.get_running_loop())
        with self.wake:
            self.handles[request.id] = handle
            self.inbox.append(handle)
            self.wake.notify()
        return handle

    def cancel(self, handle: Handle) -> None:
        """The client went away: the request's rows leave the batch at the next step."""
        handle.request.cancelled = True
        with self.wake:
            self.handles.pop(handle.request.id, None)
            self.wake.notify()

    # -- engine thread ----------------------------------------------------------------------
    def main(self) -> None:
        try:
            self.load()
        except UserError as e:
            self.fail(str(e))
            return
        except Exception as e:  # a broken checkpoint: the server must not pretend to be ready
            log.error("loading %s failed:\n%s", self.run, traceback.format_exc())
            self.fail(f"loading {self.run} failed: {e}")
            return
        self.ready.set()
        log.info("ready: %s (context %d tokens, batch of %d rows)", self.run, self.context, self.max_batch)
        while True:
            with self.wake:
                while not self.stopping and not self.inbox and self.scheduler.idle:
                    self.wake.wait()
                if self.stopping:
                    return
                self.take_inbox()
            try:
                events = self.scheduler.step()
            except Exception as e:  # an engine fault ends the requests in flight, not the server
                log.error("engine step failed:\n%s", traceback.format_exc())
                self.fail_all(APIError(500, f"generation failed: {e}", type="server_error"))
                continue
            self.deliver(events)

    def load(self) -> None:
        from babyllama.llm import load

        llm = load(self.run, device=self.device)
        for name, path in self.adapter_dirs.items():
            llm.add_adapter(path, name)
        if self.adapter_dirs:
            llm.use_adapter(None)
        self.llm = llm
        self.scheduler = Scheduler(llm.model, llm.tokenizer, self.max_batch)

    def fail(self, message: str) -> None:
        self.error = message
        log.error("%s", message)
        if self.on_failure is not None:
            self.on_failure(message)

    def take_inbox(self) -> None:
        """Move queued requests into the scheduler while they use the active adapter; when the
        batch is empty and the next request wants another adapter, switch to it."""
        while self.inbox:
            handle = self.inbox[0]
            if handle.request.cancelled:
                self.inbox.popleft()
                continue
            if handle.adapter != self.llm.adapter:
                if not self.scheduler.idle:
                    return
                self.llm.use_adapter(handle.adapter)
            self.scheduler.submit(self.inbox.popleft().request)

    def deliver(self, events: list[Event]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Handle, Event]]] = {}
        with self.wake:
            for event in events:
                handle = self.handles.get(event.request.id)
                if handle is None:
                    continue
                if event.finish_reason is not None:
                    handle.finished += 1
                    if handle.finished == handle.request.cfg.num_return_sequences:
                        del self.handles[event.request.id]
                by_loop.setdefault(handle.loop, []).append((handle, event))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(put_all, items)
            except RuntimeError:  # the event loop has closed (shutting down)
                pass

    def fail_all(self, error: APIError) -> None:
        with self.wake:
            handles = list(self.handles.values())
            self.handles.clear()
            self.inbox.clear()
        self.scheduler = Scheduler(self.llm.model, self.llm.tokenizer, self.max_batch)
        for handle in handles:
            try:
                handle.loop.call_soon_threadsafe(handle.queue.put_nowait, error)
            except RuntimeError:
                pass


def put_all(items: list[tuple[Handle, Event]]) -> None:
    for handle, event in items:
        handle.queue.put_nowait(event)
