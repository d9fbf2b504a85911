"""One conformance suite over both buses: what an acknowledged invalidation means at every edge.

Each test runs on the embedded bus (edges long-poll the origin) and on NATS JetStream (the real
server at 127.0.0.1:4222: skipped where none runs, required under CI=true).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from edgecache.bus.nats import consumer_name
from edgecache.config import BusConfig
from nodes.app import NODE, create_app
from origin.app import create_origin_app
from tests.conftest import Stack, require_service
from tests.integration.test_cms_webhook import deliver

pytestmark = pytest.mark.integration

ADMIN = {"Authorization": "Bearer dev-admin-token"}
REGIONS = ("us-east", "eu-west", "ap-south")
HOST = socket.gethostname()


def me(region: str) -> str:
    """The bus identity of a region's (only) node and worker in these tests."""
    return f"{region}/{HOST}/0"


@pytest.fixture(params=["embedded", "nats"])
async def bus(request) -> BusConfig:
    if request.param == "embedded":
        yield BusConfig()
        return
    await asyncio.to_thread(require_service, "NATS", "127.0.0.1", 4222)
    name = f"T{uuid.uuid4().hex[:12]}"
    config = BusConfig(kind="nats", stream=name, subject=f"{name.lower()}.events", heartbeat_s=0.5)
    yield config
    import nats

    nc = await nats.connect(config.nats_url)
    try:
        await nc.jetstream().delete_stream(name)
    except Exception:   # never created: nothing to clean
        pass
    await nc.close()


def chat(text: str) -> dict:
    return {"model": "sim-llm", "messages": [{"role": "user", "content": text}]}


async def ask(session: aiohttp.ClientSession, edge: str, text: str, headers: dict | None = None) -> tuple[int, str]:
    async with session.post(edge + "/v1/chat/completions", json=chat(text),
                            headers={"Authorization": "Bearer k", **(headers or {})}) as r:
        await r.read()
        return r.status, r.headers.get("Cache-Status", "")


async def purge(stack: Stack, body: dict, query: str = "?wait=true") -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s, s.post(stack.origin_url + "/v1/purge" + query, json=body,
                                                    headers=ADMIN) as r:
        return r.status, orjson.loads(await r.read())


async def settled(stack: Stack) -> None:
    """Every edge has caught up with the log at least once (so it is not fenced)."""
    async with asyncio.timeout(15):
        for region in stack.edges:
            follower = stack.servers[region].app[NODE].events
            while follower.fenced():
                await follower.heard.wait()


@contextlib.asynccontextmanager
async def restarted(stack: Stack, region: str) -> AsyncIterator[tuple[str, TestServer]]:
    """The region's node started again on its data folder: (its URL, its server)."""
    server = TestServer(create_app(stack.node_configs[region]), host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/"), server
    finally:
        await server.close()


async def refund_policy_is_not_served(session: aiohttp.ClientSession, url: str) -> None:
    status, _ = await ask(session, url, "What is the refund policy?", {"Cache-Control": "only-if-cached"})
    assert status == 504


@pytest.fixture
async def three(make_stack, bus: BusConfig) -> Stack:
    stack = await make_stack(regions=REGIONS, bus=bus)
    await settled(stack)
    return stack


async def test_a_purge_acknowledged_with_wait_is_applied_at_every_edge(three: Stack, bus: BusConfig) -> None:
    async with aiohttp.ClientSession() as s:
        for edge in three.edges.values():
            assert (await ask(s, edge, "What is the warranty on chairs?", {"Cache-Tag": "doc:42"}))[0] == 200
        status, answer = await purge(three, {"tags": ["doc:42"]})
        assert status == 200 and answer["complete"] is True
        assert sorted(e["edge"] for e in answer["edges"]) == sorted(me(r) for r in REGIONS)
        assert all(e["applied_seq"] >= answer["seq"] and e["state"] == "applied" for e in answer["edges"])
        for edge in three.edges.values():   # no polling: the acknowledgement means applied
            status, _ = await ask(s, edge, "What is the warranty on chairs?", {"Cache-Control": "only-if-cached"})
            assert status == 504
    if bus.kind == "nats":   # the events really travelled through JetStream
        subs = [three.servers[r].app[NODE].events.subscription for r in REGIONS]
        assert all(sub.stats["delivered"] >= 1 for sub in subs)


async def test_a_redelivered_webhook_with_wait_is_acknowledged_and_applied_once(three: Stack) -> None:
    applied = []
    state = three.servers["us-east"].app[NODE]
    original = state.apply_event

    async def counting(event: dict) -> None:
        applied.append(event["seq"])
        await original(event)

    state.events._apply = counting
    first = await deliver(three, {"tags": ["doc:7"]}, msg_id="msg_redelivered")
    again_status, again = await _deliver_waiting(three, "msg_redelivered")
    assert first[0] == 200 and again_status == 200
    assert again["seq"] == first[1]["seq"] and again["new"] is False and again["complete"] is True
    assert applied == [first[1]["seq"]]


async def _deliver_waiting(stack: Stack, msg_id: str) -> tuple[int, dict]:
    import tests.integration.test_cms_webhook as hook

    ts = int(time.time())
    body = orjson.dumps({"tags": ["doc:7"]})
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(ts), "Content-Type": "application/json",
               "webhook-signature": hook.sign(hook.SECRET, msg_id, ts, body)}
    async with aiohttp.ClientSession() as s, s.post(stack.origin_url + "/hooks/cms?wait=true", data=body,
                                                    headers=headers) as r:
        return r.status, orjson.loads(await r.read())


async def test_no_edge_serves_a_purged_entry_after_the_acknowledgement(three: Stack) -> None:
    """The race: readers hammer every edge while purges land; a read that began after a purge's
    acknowledgement never returns the purged answer."""
    docs = range(8)
    async with aiohttp.ClientSession() as s:
        for edge in three.edges.values():
            for d in docs:
                assert (await ask(s, edge, f"Question about document {d}?", {"Cache-Tag": f"doc:{d}"}))[0] == 200
        acked: dict[int, float] = {}
        reads: list[tuple[int, float, int]] = []
        stop = asyncio.Event()

        async def reader(edge: str, offset: int) -> None:
            i = offset
            while not stop.is_set():
                d = docs[i % len(docs)]
                began = time.monotonic()
                status, _ = await ask(s, edge, f"Question about document {d}?", {"Cache-Control": "only-if-cached"})
                reads.append((d, began, status))
                i += 1

        async def purger() -> None:
            for d in docs:
                status, answer = await purge(three, {"tags": [f"doc:{d}"]})
                assert status == 200 and answer["complete"]
                acked[d] = time.monotonic()
                await asyncio.sleep(0.02)
            stop.set()

        readers = [asyncio.create_task(reader(edge, k)) for edge in three.edges.values() for k in range(2)]
        await purger()
        await asyncio.gather(*readers)
    late = [(d, status) for d, began, status in reads if d in acked and began > acked[d]]
    assert len(late) >= len(docs)                      # the readers did read after the purges
    assert [r for r in late if r[1] == 200] == []      # and never got a purged answer
    assert {status for _, status in late} == {504}
    assert any(status == 200 for d, began, status in reads if began < acked[d])   # hits before, not after


async def test_an_edge_that_was_down_catches_up_before_serving(make_stack, bus: BusConfig, tmp_path) -> None:
    stack = await make_stack(regions=("us-east", "eu-west"), bus=bus, data_root=tmp_path)
    await settled(stack)
    async with aiohttp.ClientSession() as s:
        await ask(s, stack.edges["us-east"], "What is the refund policy?", {"Cache-Tag": "doc:9"})
        await stack.servers["us-east"].close()
        _, answer = await purge(stack, {"tags": ["doc:9"]}, "?wait=true&timeout=0")
        async with restarted(stack, "us-east") as (url, _):
            await refund_policy_is_not_served(s, url)
            async with s.get(url + "/healthz") as r:
                assert (await r.json())["invalidation"]["applied_seq"] == answer["seq"]


async def test_wait_reports_a_silent_edge_as_pending_until_it_fences(make_stack, bus: BusConfig) -> None:
    stack = await make_stack(regions=("us-east", "eu-west"), bus=bus, node_overrides={"max_staleness_s": 1.0})
    await settled(stack)
    silent = stack.servers["eu-west"].app[NODE].events.subscription

    async def crash() -> None:   # gone without a word: it may still be serving, for all we know
        pass

    silent.leave = crash
    await stack.servers["eu-west"].close()
    status, answer = await purge(stack, {"tags": ["doc:1"]}, "?wait=true&timeout=0")
    states = {e["edge"]: e["state"] for e in answer["edges"]}
    assert status == 202 and answer["complete"] is False
    assert states == {me("us-east"): states[me("us-east")], me("eu-west"): "pending"}
    status, answer = await purge(stack, {"tags": ["doc:2"]}, "?wait=true&timeout=10")
    states = {e["edge"]: e["state"] for e in answer["edges"]}
    assert status == 200 and states == {me("us-east"): "applied", me("eu-west"): "fenced"}


async def test_a_node_that_shuts_down_cleanly_is_not_waited_for(make_stack, bus: BusConfig) -> None:
    stack = await make_stack(regions=("us-east", "eu-west"), bus=bus)
    await settled(stack)
    await stack.servers["eu-west"].close()
    status, answer = await purge(stack, {"tags": ["doc:1"]}, "?wait=true&timeout=10")
    assert status == 200 and [e["edge"] for e in answer["edges"]] == [me("us-east")]


async def test_an_origin_restart_keeps_the_sequence_and_the_edges_follow(make_stack, bus: BusConfig,
                                                                         tmp_path) -> None:
    stack = await make_stack(regions=("us-east",), bus=bus, origin_overrides={"data_dir": str(tmp_path / "origin")})
    await settled(stack)
    _, first = await purge(stack, {"tags": ["doc:1"]})
    old = stack.servers["origin"]
    port = old.port
    await old.close()
    assert stack.config is not None
    new = TestServer(create_origin_app(replace(stack.config)), host="127.0.0.1", port=port)
    await new.start_server()
    try:
        async with aiohttp.ClientSession() as s:
            await ask(s, stack.edges["us-east"], "Is shipping free?", {"Cache-Tag": "doc:2"})
            status, second = await purge(stack, {"tags": ["doc:2"]})
            assert status == 200 and second["seq"] == first["seq"] + 1 and second["complete"]
            assert [e["applied_seq"] for e in second["edges"]] == [second["seq"]]
            status, _ = await ask(s, stack.edges["us-east"], "Is shipping free?", {"Cache-Control": "only-if-cached"})
            assert status == 504
    finally:
        await new.close()


@pytest.mark.parametrize("bus", ["nats"], indirect=True)
async def test_each_nats_edge_is_a_durable_consumer(three: Stack, bus: BusConfig) -> None:
    import nats

    nc = await nats.connect(bus.nats_url)
    try:
        js = nc.jetstream()
        for region in REGIONS:
            info = await js.consumer_info(bus.stream, consumer_name(me(region)))
            assert info.config.durable_name == consumer_name(me(region))
        _, answer = await purge(three, {"all": True})
        last = await js.get_last_msg(bus.stream, bus.subject)
        assert orjson.loads(last.data)["seq"] == answer["seq"]
        assert last.headers["Nats-Msg-Id"] == f"{bus.stream}:{answer['seq']}"
    finally:
        await nc.close()


@pytest.mark.parametrize("query", ["?wait=maybe", "?wait=true&timeout=-1", "?wait=true&timeout=soon",
                                   "?wait=true&timeout=1000"])
async def test_bad_wait_parameters_are_400_and_record_nothing(three: Stack, query: str) -> None:
    status, answer = await purge(three, {"tags": ["doc:3"]}, query)
    assert status == 400 and answer["error"]["type"] == "invalid_request_error"
    status, answer = await purge(three, {"tags": ["doc:3"]}, "")
    assert status == 200 and answer["seq"] == 1


@pytest.mark.parametrize("bus", ["nats"], indirect=True)
async def test_a_nats_edge_fills_a_gap_in_the_stream_from_the_origins_log(make_stack, bus: BusConfig,
                                                                          tmp_path) -> None:
    import nats

    stack = await make_stack(regions=("us-east",), bus=bus, data_root=tmp_path)
    await settled(stack)
    async with aiohttp.ClientSession() as s:
        await ask(s, stack.edges["us-east"], "What is the refund policy?", {"Cache-Tag": "doc:9"})
        await stack.servers["us-east"].close()
        _, answer = await purge(stack, {"tags": ["doc:9"]}, "?wait=true&timeout=0")
        nc = await nats.connect(bus.nats_url)
        try:   # the stream loses the message before the edge comes back
            js = nc.jetstream()
            async with asyncio.timeout(10):
                while (await js.stream_info(bus.stream)).state.last_seq < 1:   # noqa: ASYNC110 (server state)
                    await asyncio.sleep(0.01)
            await js.purge_stream(bus.stream)
        finally:
            await nc.close()
        async with restarted(stack, "us-east") as (url, server):
            await refund_policy_is_not_served(s, url)
            events = server.app[NODE].events
            assert events.applied == answer["seq"] and events.subscription.stats["repaired"] == 1


@pytest.mark.parametrize("bus", ["nats"], indirect=True)
async def test_forged_nats_messages_are_dropped(make_stack, bus: BusConfig) -> None:
    """Someone who can publish on the broker but has no node token can neither inject an event
    (a made-up high sequence would make edges skip real ones) nor speak for an edge."""
    import nats

    stack = await make_stack(regions=("us-east", "eu-west"), bus=bus)
    await settled(stack)
    silent = stack.servers["eu-west"].app[NODE].events.subscription

    async def crash() -> None:
        pass

    silent.leave = crash
    await stack.servers["eu-west"].close()
    nc = await nats.connect(bus.nats_url)
    try:
        forged = {"seq": 10**6, "created": 0, "source_id": "x", "tags": ["doc:1"], "keys": [], "prefixes": [],
                  "all": True, "soft": False}
        await nc.jetstream().publish(bus.subject, orjson.dumps(forged), stream=bus.stream)
        report = {"edge": me("eu-west"), "applied": 10**6, "max_staleness_s": 60.0, "nonce": "n"}
        await nc.publish(f"{bus.subject}.ping", orjson.dumps(report), headers={"EdgeCache-Signature": "0" * 64})
        await nc.flush()
    finally:
        await nc.close()
    status, answer = await purge(stack, {"tags": ["doc:2"]}, "?wait=true&timeout=1")
    states = {e["edge"]: (e["state"], e["applied_seq"]) for e in answer["edges"]}
    assert status == 202 and states[me("eu-west")][0] == "pending"          # the forged report was ignored
    assert states[me("us-east")] == ("applied", answer["seq"])               # the real events still apply
    assert stack.servers["us-east"].app[NODE].events.applied == answer["seq"] < 10**6


async def test_a_nats_outage_neither_fences_the_edges_nor_loses_an_event(make_stack) -> None:
    """With the broker unreachable, edges read the origin's log over HTTP: still current, still
    applying every purge, and a wait=true acknowledgement still means applied."""
    bus = BusConfig(kind="nats", nats_url="nats://127.0.0.1:9", heartbeat_s=0.5)   # nothing listens there
    stack = await make_stack(regions=("us-east", "eu-west"), bus=bus)
    await settled(stack)
    async with aiohttp.ClientSession() as s:
        for edge in stack.edges.values():
            await ask(s, edge, "What is the refund policy?", {"Cache-Tag": "doc:9"})
        status, answer = await purge(stack, {"tags": ["doc:9"]})
        assert status == 200 and answer["complete"] and len(answer["edges"]) == 2
        for region, edge in stack.edges.items():
            await refund_policy_is_not_served(s, edge)
            subscription = stack.servers[region].app[NODE].events.subscription
            assert subscription.degraded and subscription.stats["fallback"] >= 1


@pytest.mark.parametrize("bus", ["nats"], indirect=True)
async def test_an_idle_nats_fetch_is_an_empty_batch_not_an_outage(three: Stack) -> None:
    """Nothing new, no wait or a short one (the catch-up at start asks with 0 s): an empty batch
    through NATS, never a fall back to HTTP."""
    follower = three.servers["us-east"].app[NODE].events
    subscription = follower.subscription
    before = dict(subscription.stats)
    for wait_s in (0.0, 0.2, 0.2):
        batch = await subscription.fetch(follower.applied, wait_s)
        assert batch.events == [] and batch.last_seq == follower.applied
    assert subscription.stats == before and not subscription.degraded
