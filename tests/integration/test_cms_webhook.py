"""The signed CMS webhook: forged and stale deliveries change nothing, redeliveries apply once."""

from __future__ import annotations

import time

import aiohttp
import orjson
import pytest

from edgecache.config import AuthConfig
from edgecache.webhook import sign
from tests.conftest import NODE_TOKEN, Stack

pytestmark = pytest.mark.integration

SECRET = AuthConfig().webhook_secret    # the topology's (test) secret


async def deliver(stack: Stack, payload: object, *, msg_id: str = "msg_1", secret: str = SECRET,
                  timestamp: int | None = None, headers: dict | None = None, raw: bytes | None = None) -> tuple[int, dict]:
    body = raw if raw is not None else orjson.dumps(payload)
    ts = int(time.time()) if timestamp is None else timestamp
    signed = {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": sign(secret, msg_id, ts, body),
              "Content-Type": "application/json", **(headers or {})}
    async with aiohttp.ClientSession() as s, s.post(stack.origin_url + "/hooks/cms", data=body, headers=signed) as r:
        return r.status, orjson.loads(await r.read())


async def last_seq(stack: Stack) -> int:
    async with aiohttp.ClientSession() as s, s.get(stack.origin_url + "/v1/events",
                                                   headers={"Authorization": f"Bearer {NODE_TOKEN}"}) as r:
        return (await r.json())["last_seq"]


async def test_signed_generic_webhook_becomes_one_event(stack: Stack) -> None:
    status, answer = await deliver(stack, {"tags": ["doc:42", "doc:43"]})
    assert status == 200 and answer["new"] and answer["event"]["tags"] == ["doc:42", "doc:43"]
    assert await last_seq(stack) == answer["seq"] == 1


@pytest.mark.parametrize("kwargs", [
    {"secret": "whsec_" + "YW5vdGhlci1zZWNyZXQtb2YtZW5vdWdoLWJ5dGVz"},
    {"timestamp": int(time.time()) - 3600},
    {"timestamp": int(time.time()) + 3600},
])
async def test_forged_or_stale_webhooks_are_refused_and_change_nothing(stack: Stack, kwargs: dict) -> None:
    status, answer = await deliver(stack, {"tags": ["doc:42"]}, **kwargs)
    assert status == 401 and answer["error"]["type"] == "authentication_error"
    assert await last_seq(stack) == 0


async def test_a_replayed_delivery_is_acknowledged_with_its_sequence_and_not_applied_again(stack: Stack) -> None:
    _, first = await deliver(stack, {"tags": ["doc:1"]}, msg_id="msg_a")
    _, other = await deliver(stack, {"tags": ["doc:2"]}, msg_id="msg_b")
    status, again = await deliver(stack, {"tags": ["doc:1"]}, msg_id="msg_a")
    assert status == 200 and again["seq"] == first["seq"] and not again["new"]
    assert again["event"]["source_id"] == "webhook:msg_a"   # never a purge's Idempotency-Key
    assert await last_seq(stack) == other["seq"] == 2


@pytest.mark.parametrize("raw", [b"{not json", b"[]", b'{"colour": "blue"}', b'{"tags": ["bad tag"]}',
                                 b'{"prefixes": {"kb": {"text": ""}}}', b'{"prefixes": {"bad id!": null}}'])
async def test_malformed_webhooks_are_400_and_change_nothing(stack: Stack, raw: bytes) -> None:
    status, answer = await deliver(stack, None, raw=raw)
    assert status == 400 and "error" in answer
    assert await last_seq(stack) == 0


@pytest.mark.parametrize(("payload", "headers", "tag"), [
    ({"sys": {"id": "5KsDBWseXY6QegucYAoacS", "type": "Entry"}},
     {"X-Contentful-Topic": "ContentManagement.Entry.publish"}, "doc:5KsDBWseXY6QegucYAoacS"),
    ({"_id": "article-7", "_type": "article"}, {}, "doc:article-7"),
    ({"event": "entry.update", "model": "article", "entry": {"id": 7, "documentId": "h3k9x"}}, {}, "doc:h3k9x"),
    ({"event": "entry.delete", "model": "article", "entry": {"id": 7}}, {}, "doc:article-7"),
])
async def test_cms_payloads_map_to_document_tags(stack: Stack, payload: dict, headers: dict, tag: str) -> None:
    status, answer = await deliver(stack, payload, headers=headers)
    assert status == 200 and answer["event"]["tags"] == [tag]


async def test_sanity_drafts_purge_nothing(stack: Stack) -> None:
    status, answer = await deliver(stack, {"_id": "drafts.article-7"})
    assert status == 200 and answer["event"]["tags"] == []


async def test_webhook_updates_prefixes_whole(stack: Stack) -> None:
    status, answer = await deliver(stack, {"tags": ["doc:9"], "prefixes": {"kb": {"text": "Policy v2", "tags": ["doc:9"]}}})
    assert status == 200 and answer["event"]["prefixes"][0]["id"] == "kb"
    async with aiohttp.ClientSession() as s, s.get(stack.origin_url + "/v1/prefixes/kb",
                                                   headers={"Authorization": "Bearer dev-admin-token"}) as r:
        assert (await r.json())["text"] == "Policy v2"
