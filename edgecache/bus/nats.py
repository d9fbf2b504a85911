"""The NATS JetStream bus: the origin publishes its log to a stream; each edge worker is a
durable pull consumer of it.

- Stream ``BusConfig.stream`` on subject ``BusConfig.subject``, file storage, created by the origin
  when missing. Each event is one message (``Event.to_json()`` as JSON) with ``Nats-Msg-Id``
  ``<stream>:<seq>``, so a republished event is dropped by the server's de-duplication. At
  start the origin republishes whatever its log holds beyond the stream's newest message (an
  event appended while NATS was down is published once it is back).
- Edge worker ``<region>/<instance>/<worker>``: durable consumer ``edge_<region>_<instance>_<worker>`` (explicit acks,
  new messages only when first created: the edge catches up over HTTP at start). A restarted
  edge resumes from its consumer's acknowledged position.
- Heartbeats: each ``fetch`` first asks the origin ``<subject>.ping`` (core request/reply, the
  origins answer as queue group ``origin``) with the edge's report and a fresh nonce; the answer
  carries the log's first and last sequence and the nonce.
- Every message (event, ping, answer) carries ``EdgeCache-Signature``, an HMAC-SHA256 keyed with
  the node token: anyone else able to publish on the broker can forge neither events (an event
  with a made-up high sequence would make edges skip real ones) nor heartbeats (a forged or
  replayed answer would keep a stale edge from fencing itself). Unsigned or mis-signed messages
  are dropped and logged; a dropped event is a gap, filled over HTTP. If JetStream has not delivered everything up to the last sequence
  (consumer created late, stream trimmed, a publish lost), the gap is filled over HTTP from the
  origin's log, so the edge never skips an event.

Regions map onto NATS as leaf nodes of a hub (or clusters of a supercluster): see docs/deploy.md.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import nats.errors
import nats.js.errors
import orjson
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    StorageType,
    StreamConfig,
)

from edgecache.bus.base import Batch, BusError, Report, Subscription, sign, signed_by
from edgecache.config import BusConfig

__all__ = ["NatsAnnouncer", "NatsSubscription", "consumer_name", "ping_subject"]

log = logging.getLogger("edgecache.bus.nats")

CONNECT_TIMEOUT_S = 2.0        # one server; the first connection gets twice that in all
RECONNECT_AFTER_S = 5.0        # an edge without NATS reads the origin's log over HTTP meanwhile
PING_TIMEOUT_S = 5.0
FETCH_BATCH = 256
CATCH_UP_WAIT_S = 0.5          # how long JetStream gets to deliver what a ping says is missing
MIN_FETCH_S = 0.05
STREAM_MAX_AGE_S = 7 * 86400.0
STREAM_MAX_MSGS = 1_000_000
DUPLICATE_WINDOW_S = 600.0
CONSUMER_INACTIVE_S = 7 * 86400.0
SIGNATURE = "EdgeCache-Signature"
_NATS_ERRORS = (nats.errors.Error, nats.js.errors.Error, OSError, TimeoutError)


def _signature(msg: Any) -> str | None:
    return (msg.headers or {}).get(SIGNATURE)


def ping_subject(config: BusConfig) -> str:
    return f"{config.subject}.ping"


def consumer_name(edge: str) -> str:
    """A durable name NATS accepts: ``us-east/pod-7/0`` -> ``edge_us-east_pod-7_0``."""
    return "edge_" + re.sub(r"[^A-Za-z0-9_-]", "_", edge)


async def _quiet(exc: Exception) -> None:
    """nats-py's connection errors, one line each (its default prints a traceback per attempt)."""
    log.debug("NATS: %r", exc)


async def _connect(config: BusConfig, name: str) -> nats.NATS:
    """Connected (and reconnecting by itself from then on), or ``BusError`` within
    ``2 * CONNECT_TIMEOUT_S``."""
    servers = [u.strip() for u in config.nats_url.split(",")]
    nc = nats.NATS()
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S * 2):
            await nc.connect(servers=servers, name=name, connect_timeout=CONNECT_TIMEOUT_S, error_cb=_quiet,
                             allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=1.0)
        return nc
    except (*_NATS_ERRORS, nats.errors.NoServersError) as exc:
        try:
            await nc.close()
        except _NATS_ERRORS:
            pass
        raise BusError(f"cannot connect to NATS at {config.nats_url}: {exc!r}") from exc


class NatsAnnouncer:
    """The origin's side: publishes every event of the log, answers the edges' pings.

    ``read_since(seq)`` returns ``(seq, payload)`` pairs after ``seq`` from the log;
    ``on_ping(report)`` records an edge's report and returns ``{"first_seq", "last_seq"}``.
    """

    def __init__(self, config: BusConfig, token: str, read_since: Callable[[int], Awaitable[list[tuple[int, bytes]]]],
                 on_ping: Callable[[Report], Awaitable[dict[str, int]]]) -> None:
        self.config = config
        self._token = token
        self._read_since = read_since
        self._on_ping = on_ping
        self._nc: nats.NATS | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.published = 0            # the newest sequence the stream holds

    async def start(self) -> None:
        """Connect (once, now), then publish in the background, retrying while NATS cannot be
        reached: the origin keeps serving fills meanwhile (edges that cannot ping it fence
        themselves)."""
        try:
            await self._connect()
        except (BusError, *_NATS_ERRORS) as exc:
            log.warning("NATS bus: %r; retrying in the background", exc)
            await self._disconnect()
        self._task = asyncio.create_task(self._run())

    async def _run(self, retry_s: float = 1.0) -> None:
        while True:
            try:
                if self._nc is None:
                    await self._connect()
                await self._pump()
            except BusError as exc:
                log.warning("NATS bus: %s; retrying", exc)
            except _NATS_ERRORS as exc:
                log.warning("NATS bus: %r; retrying", exc)
            await self._disconnect()
            await asyncio.sleep(retry_s)

    async def _connect(self) -> None:
        self._nc = await _connect(self.config, "edgecache-origin")
        js = self._nc.jetstream()
        try:
            await js.stream_info(self.config.stream)
        except nats.js.errors.NotFoundError:
            await js.add_stream(StreamConfig(
                name=self.config.stream, subjects=[self.config.subject], storage=StorageType.FILE,
                max_age=STREAM_MAX_AGE_S, max_msgs=STREAM_MAX_MSGS, discard=DiscardPolicy.OLD,
                duplicate_window=DUPLICATE_WINDOW_S))
        try:
            last = await js.get_last_msg(self.config.stream, self.config.subject)
            self.published = int(orjson.loads(last.data)["seq"])
        except nats.js.errors.NotFoundError:
            self.published = 0
        await self._nc.subscribe(ping_subject(self.config), queue="origin", cb=self._ping)

    def wake(self) -> None:
        """A new event is in the log."""
        self._wake.set()

    async def _pump(self) -> None:
        assert self._nc is not None
        js = self._nc.jetstream()
        self._wake.set()
        while True:
            await self._wake.wait()
            self._wake.clear()
            for seq, payload in await self._read_since(self.published):
                await js.publish(self.config.subject, payload, stream=self.config.stream,
                                 headers={"Nats-Msg-Id": f"{self.config.stream}:{seq}",
                                          SIGNATURE: sign(self._token, payload)})
                self.published = seq

    async def _disconnect(self) -> None:
        nc, self._nc = self._nc, None
        if nc is not None:
            try:
                await nc.close()
            except _NATS_ERRORS:
                pass

    async def _ping(self, msg: Any) -> None:
        if not signed_by(self._token, msg.data, _signature(msg)):
            log.warning("dropping a ping without a valid signature on %s", msg.subject)
            return
        try:
            data = orjson.loads(msg.data)
            report, nonce = Report.from_json(data), data["nonce"]
            if not isinstance(nonce, str) or len(nonce) > 64:
                raise ValueError("a ping carries a nonce of at most 64 characters")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            log.warning("dropping a malformed ping: %s", exc)
            return
        answer = orjson.dumps({**await self._on_ping(report), "nonce": nonce})
        if self._nc is not None and msg.reply:
            await self._nc.publish(msg.reply, answer, headers={SIGNATURE: sign(self._token, answer)})

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._disconnect()


class NatsSubscription:
    """An edge worker's side. ``repair`` reads the origin's log over HTTP to fill gaps."""

    def __init__(self, config: BusConfig, token: str, edge: str, max_staleness_s: float,
                 repair: Subscription, incarnation: str = "") -> None:
        self.config = config
        self._token = token
        self.edge = edge
        self.incarnation = incarnation
        self.max_staleness_s = max_staleness_s
        self._repair = repair
        self._nc: nats.NATS | None = None
        self._sub: Any = None
        self._unacked: list[tuple[int, Any]] = []
        self._retry_at = 0.0
        self.degraded = False    # NATS unreachable: fetching over HTTP
        # events that came through NATS / filled over HTTP; fetches served over HTTP without NATS
        self.stats = {"delivered": 0, "repaired": 0, "fallback": 0}

    async def start(self) -> None:
        self._nc = await _connect(self.config, f"edgecache-edge-{self.edge}")
        try:
            self._sub = await self._nc.jetstream().pull_subscribe(
                self.config.subject, durable=consumer_name(self.edge), stream=self.config.stream,
                config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW, ack_policy=AckPolicy.EXPLICIT,
                                      ack_wait=30.0, max_ack_pending=10_000,
                                      inactive_threshold=CONSUMER_INACTIVE_S))
        except _NATS_ERRORS as exc:
            await self.close()
            raise BusError(f"cannot subscribe to stream {self.config.stream}: {exc!r}") from exc

    async def fetch(self, after: int, wait_s: float) -> Batch:
        """From JetStream; while NATS (or the origin's side of it) cannot be reached, straight from
        the origin's log over HTTP, so a broker outage neither fences the edges nor loses events."""
        try:
            batch = await self._fetch(after, wait_s)
        except BusError as exc:
            if not self.degraded:
                log.warning("NATS bus: %s; reading the origin's log over HTTP meanwhile", exc)
                self.degraded = True
            self.stats["fallback"] += 1
            return await self._repair.fetch(after, min(wait_s, RECONNECT_AFTER_S))
        if self.degraded:
            log.warning("NATS bus: back")
            self.degraded = False
        return batch

    async def _fetch(self, after: int, wait_s: float) -> Batch:
        if self._nc is None or self._sub is None:
            now = time.monotonic()
            if now < self._retry_at:
                raise BusError("not connected to NATS")
            self._retry_at = now + RECONNECT_AFTER_S
            await self.start()
        assert self._nc is not None
        nonce = secrets.token_hex(16)
        report = Report(self.edge, after, self.max_staleness_s, self.incarnation)
        ping = orjson.dumps({**report.to_json(), "nonce": nonce})
        try:
            reply = await self._nc.request(ping_subject(self.config), ping, timeout=PING_TIMEOUT_S,
                                           headers={SIGNATURE: sign(self._token, ping)})
            if not signed_by(self._token, reply.data, _signature(reply)):
                raise ValueError("the answer is not signed with the node token")
            answer = orjson.loads(reply.data)
            if answer.get("nonce") != nonce:
                raise ValueError("the answer is not to this ping")
            first, last = int(answer["first_seq"]), int(answer["last_seq"])
        except (*_NATS_ERRORS, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise BusError(f"ping to the origin over NATS: {exc!r}") from exc
        found: dict[int, dict[str, Any]] = {}
        try:   # nats-py refuses a timeout of 0; an empty fetch ends in (either kind of) TimeoutError
            msgs = await self._sub.fetch(batch=FETCH_BATCH,
                                         timeout=max(MIN_FETCH_S, wait_s if after >= last else CATCH_UP_WAIT_S))
        except (nats.errors.TimeoutError, TimeoutError):
            msgs = []
        except (*_NATS_ERRORS, ValueError) as exc:
            raise BusError(f"fetching from stream {self.config.stream}: {exc!r}") from exc
        for msg in msgs:
            if not signed_by(self._token, msg.data, _signature(msg)):
                log.error("dropping an event without a valid signature on %s (filled from the origin's log)",
                          self.config.subject)
                await msg.term()
                continue
            try:
                event = orjson.loads(msg.data)
                seq = int(event["seq"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                log.error("dropping a malformed message on %s", self.config.subject)
                await msg.term()
                continue
            self._unacked.append((seq, msg))
            if seq > after:
                found[seq] = event
        self.stats["delivered"] += len(found)
        wanted = max([last, *found])
        if any(s not in found for s in range(after + 1, min(wanted, after + FETCH_BATCH) + 1)):
            repaired = await self._repair.fetch(after, 0)
            for event in repaired.events:
                if event["seq"] not in found:
                    self.stats["repaired"] += 1
                found.setdefault(event["seq"], event)
            first, last = repaired.first_seq or first, max(last, repaired.last_seq)
        run, seq = [], after + 1
        while seq in found:
            run.append(found[seq])
            seq += 1
        return Batch(events=run, first_seq=first, last_seq=last)

    async def acknowledge(self, applied: int) -> None:
        done = [m for s, m in self._unacked if s <= applied]
        self._unacked = [(s, m) for s, m in self._unacked if s > applied]
        for msg in done:
            try:
                await msg.ack()
            except _NATS_ERRORS as exc:   # redelivered later and skipped: harmless
                log.warning("ack to NATS: %r", exc)

    async def leave(self) -> None:
        await self._repair.leave()
        if self._nc is not None:   # a node that comes back catches up over HTTP and gets a new consumer
            try:
                await self._nc.jetstream().delete_consumer(self.config.stream, consumer_name(self.edge))
            except _NATS_ERRORS as exc:
                log.warning("deleting consumer %s: %r", consumer_name(self.edge), exc)

    async def close(self) -> None:
        nc, self._nc, self._sub = self._nc, None, None
        if nc is not None:
            try:
                await nc.close()
            except _NATS_ERRORS:
                pass
