"""AsyncEngine: the only bridge between the event loop and the synchronous engine.

The engine's step loop runs in one worker thread. Requests and aborts reach it through a locked
inbox; its events come back to per-request channels with one call_soon_threadsafe per step
(TGI's channel per request). A generation whose consumer goes away is aborted.

A channel holds at most one pending TokenDelta per choice: when the consumer (a slow client's writer)
is behind, new deltas merge into the pending one (vLLM's RequestOutputCollector), so the memory a
stream holds is its unsent text, never a queue of event objects. After each step the worker thread
publishes a copy of the engine's counters in `stats` (read by /metrics and the tests).
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from protocol.errors import ProtocolError
from protocol.types import Event, Failed, Finished, GenerateRequest, TokenDelta
from server.engine.stats import EngineStats

log = logging.getLogger("berth.engine")

STATS_PERIOD = 0.1      # seconds between stats copies while the engine is busy


class EngineDeadError(Exception):
    pass


class _Channel:
    """Events of one request, delivered on the loop; consecutive deltas of a choice are coalesced."""
    __slots__ = ("events", "ready", "num_choices", "num_done")

    def __init__(self, num_choices: int):
        self.events: collections.deque[Event] = collections.deque()
        self.ready = asyncio.Event()
        self.num_choices = num_choices
        self.num_done = 0

    def put(self, event: Event) -> None:
        if isinstance(event, TokenDelta):
            # The choice's latest pending event (n > 1 interleaves choices): a delta absorbs this one.
            for i in range(len(self.events) - 1, -1, -1):
                pending = self.events[i]
                if pending.index == event.index:
                    if isinstance(pending, TokenDelta):
                        self.events[i] = merge_deltas(pending, event)
                        self.ready.set()
                        return
                    break
        self.events.append(event)
        self.ready.set()

    async def get(self) -> Event:
        while not self.events:
            self.ready.clear()
            await self.ready.wait()
        return self.events.popleft()


def merge_deltas(a: TokenDelta, b: TokenDelta) -> TokenDelta:
    logprobs = None if a.logprobs is None and b.logprobs is None else (a.logprobs or ()) + (b.logprobs or ())
    return TokenDelta(a.text + b.text, a.token_ids + b.token_ids, a.index, logprobs,
                      a.num_prompt_tokens if a.num_prompt_tokens is not None else b.num_prompt_tokens)


@dataclass(slots=True)
class _Inbox:
    adds: list[GenerateRequest] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)


class AsyncEngine:
    def __init__(self, engine, max_pending: int = 128):
        self.engine = engine
        self.max_pending = max_pending          # admitted and unfinished requests; more → 429
        self.model_name = ""
        self.dead: BaseException | None = None
        self.stats = EngineStats()               # replaced (never mutated) by the worker after each step
        self.died: asyncio.Event | None = None     # set on the loop once the engine has failed
        self._channels: dict[str, _Channel] = {}
        self._inbox = _Inbox()
        self._wake = threading.Condition()
        self._stop = False
        self._live: dict[str, int] = {}       # worker thread only: request id -> choices not yet ended
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stats_at = 0.0

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.died = asyncio.Event()
        self._publish_stats()
        self._thread = threading.Thread(target=self._run, name="berth-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def num_pending(self) -> int:
        return len(self._channels)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Event]:
        """Yield the request's events; ends after every choice is Finished or Failed.

        Leaving the iteration early (client gone, task cancelled) aborts the request in the engine."""
        if self.dead is not None:
            raise ProtocolError("the engine has failed; the server is restarting", status=503, retry_after=5)
        if len(self._channels) >= self.max_pending:
            raise ProtocolError("the server is overloaded; retry later", status=429, retry_after=1)
        rid = request.request_id
        if rid in self._channels:
            raise ProtocolError("duplicate request id", status=400)
        channel = _Channel(request.params.n)
        self._channels[rid] = channel
        self._post(add=request)
        finished = False
        try:
            while channel.num_done < channel.num_choices:
                event = await channel.get()
                if isinstance(event, (Finished, Failed)):
                    channel.num_done += 1
                yield event
            finished = True
        finally:
            self._channels.pop(rid, None)
            if not finished:
                self._post(abort=rid)

    def abort(self, request_id: str) -> None:
        self._post(abort=request_id)

    def abort_all(self) -> None:
        """Abort every pending request (drain deadline): each ends with finish_reason abort."""
        for rid in list(self._channels):
            self._post(abort=rid)

    def _post(self, add: GenerateRequest | None = None, abort: str | None = None) -> None:
        with self._wake:
            if add is not None:
                self._inbox.adds.append(add)
            if abort is not None:
                self._inbox.aborts.append(abort)
            self._wake.notify()

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._stop and not self._inbox.adds and not self._inbox.aborts \
                            and not self.engine.has_unfinished():
                        self._wake.wait()
                    inbox, self._inbox = self._inbox, _Inbox()
                if self._stop:
                    self._abort_live(inbox)
                    return
                events = self._apply(inbox)
                if self.engine.has_unfinished():
                    events += self.engine.step()
                self._count_ended(events)
                self._publish_stats()
                if events:
                    self._loop.call_soon_threadsafe(self._deliver, events)
        except BaseException as exc:  # noqa: BLE001 - a dead engine must fail every waiter
            log.exception("engine step failed; failing all requests")
            self.dead = exc
            self._release_all()
            self._loop.call_soon_threadsafe(self._fail_all)

    def _count_ended(self, events: list[tuple[str, Event]]) -> None:
        for rid, event in events:
            if isinstance(event, (Finished, Failed)) and rid in self._live:
                self._live[rid] -= 1
                if self._live[rid] <= 0:
                    del self._live[rid]

    def _abort_live(self, inbox: _Inbox) -> None:
        """On stop: nothing this AsyncEngine admitted may stay in the (possibly shared) sync engine."""
        for rid in list(inbox.aborts) + list(self._live):
            self.engine.abort(rid)
        self._live.clear()
        self._publish_stats()

    def _publish_stats(self) -> None:
        """Copy the counters at most every STATS_PERIOD while busy, and always once idle."""
        snapshot = getattr(self.engine, "snapshot", None)
        now = time.monotonic()
        if snapshot is None or (now - self._stats_at < STATS_PERIOD and self.engine.has_unfinished()):
            return
        self._stats_at = now
        self.stats = dataclasses.replace(snapshot())

    def _release_all(self) -> None:
        """After a fatal step: best effort to free every request's blocks (the process exits next)."""
        for rid in list(self._channels) + [r.request_id for r in self._inbox.adds]:
            try:
                self.engine.abort(rid)
            except Exception:  # noqa: BLE001 - the engine is already broken; keep going
                log.debug("abort of %s after engine failure failed", rid)
        try:
            self._publish_stats()
        except Exception:  # noqa: BLE001
            pass

    def _apply(self, inbox: _Inbox) -> list[tuple[str, Event]]:
        events: list[tuple[str, Event]] = []
        for rid in inbox.aborts:
            events += [(rid, e) for e in self.engine.abort(rid)]
        for request in inbox.adds:
            if request.request_id in inbox.aborts:
                continue
            try:
                self.engine.add(request)
                self._live[request.request_id] = request.params.n
            except ProtocolError as err:
                events += [(request.request_id, Failed(err, i)) for i in range(request.params.n)]
            except Exception:  # noqa: BLE001 - e.g. a tokenizer fault: that request alone fails
                log.exception("admission failed")
                err = ProtocolError("the request could not be processed", status=500)
                events += [(request.request_id, Failed(err, i)) for i in range(request.params.n)]
        return events

    def _deliver(self, events: list[tuple[str, Event]]) -> None:
        for rid, event in events:
            channel = self._channels.get(rid)
            if channel is not None:
                channel.put(event)

    def _fail_all(self) -> None:
        err = ProtocolError("the engine failed while generating", status=500)
        for channel in self._channels.values():
            for i in range(channel.num_choices):
                channel.put(Failed(err, i))
        self.died.set()
