"""docs/observability.md lists exactly the metric families a real stack exposes (names, types, labels)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp
import pytest

from origin.app import ORIGIN
from tests.conftest import StackFactory, async_openai

pytestmark = pytest.mark.integration

DOC = Path(__file__).resolve().parent.parent / "docs" / "observability.md"
ROW = re.compile(r"^\| `((?:edgecache_|vllm:)[\w:]+)` \| (\w+) \| ([^|]*) \|")
SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{([^}]*)\})?\s")
SUFFIXES = {"counter": ("",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}

Families = dict[str, tuple[str, frozenset[str] | None]]   # name -> (type, labels; None: no samples seen)


def documented(text: str) -> Families:
    out: Families = {}
    for line in text.splitlines():
        m = ROW.match(line)
        if m:
            name, kind, labels = m.groups()
            assert name not in out, f"{name} is listed twice"
            out[name] = (kind, frozenset(x.strip() for x in labels.split(",") if x.strip() not in ("", "—")))
    return out


def exposed(text: str) -> Families:
    """Families of a Prometheus text exposition; a counter's or histogram's ``_created`` is its own."""
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    created = {n for n, t in types.items() if t == "gauge" and n.endswith("_created")
               and (types.get(n[:-8] + "_total") == "counter" or types.get(n[:-8]) == "histogram")}
    families: Families = {}
    for name, kind in types.items():
        if name in created:
            continue
        labels: set[str] | None = None
        for line in text.splitlines():
            m = SAMPLE.match(line)
            if m and any(m.group(1) == name + s for s in SUFFIXES.get(kind, ("",))):
                found = set(re.findall(r'(\w+)="', m.group(2) or "")) - {"le"}
                labels = found if labels is None else labels | found
        families[name] = (kind, None if labels is None else frozenset(labels))
    return families


async def scrape(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


async def test_every_exposed_family_is_documented_and_every_documented_one_exposed(
        make_stack: StackFactory) -> None:
    stack = await make_stack(sims=1)
    async with await async_openai(stack.edges["us-east"] + "/v1") as c:   # so that labelled series exist
        await c.chat.completions.create(model="sim-llm", messages=[{"role": "user", "content": "metrics?"}])
    await stack.servers["origin"].app[ORIGIN].pool.scrape_metrics()      # the backend's prefix hit rate
    texts = await asyncio.gather(*(scrape(u) for u in (stack.edges["us-east"], stack.origin_url, stack.sim_urls[0])))
    live: Families = {}
    for text in texts:
        live.update(exposed(text))
    docs = documented(await asyncio.to_thread(DOC.read_text, encoding="utf-8"))

    ours = {n for n in live if n.startswith("edgecache_")}
    assert ours, "the stack exposed no edgecache_* family"
    assert sorted(ours - docs.keys()) == [], "exposed but not in docs/observability.md"
    assert sorted(docs.keys() - live.keys()) == [], "in docs/observability.md but not exposed"
    assert sorted(n for n in live if n.startswith("vllm:") and n not in docs) == []
    for name, (kind, labels) in docs.items():
        live_kind, live_labels = live[name]
        assert kind == live_kind, f"{name}: documented as {kind}, exposed as {live_kind}"
        assert live_labels is None or labels == live_labels, f"{name}: labels {sorted(labels)} != {sorted(live_labels)}"
    assert sum(labels is not None for _, labels in live.values()) >= len(live) - 1   # labels were checked


def test_exposition_parsing_folds_created_series_into_their_family() -> None:
    text = ("# TYPE a_total counter\na_total{x=\"1\"} 1.0\n# TYPE a_created gauge\na_created{x=\"1\"} 9.0\n"
            "# TYPE h histogram\nh_bucket{le=\"1\",y=\"2\"} 1.0\nh_count{y=\"2\"} 1.0\n"
            "# TYPE h_created gauge\nh_created{y=\"2\"} 9.0\n# TYPE g_created gauge\n")
    assert exposed(text) == {"a_total": ("counter", frozenset({"x"})), "h": ("histogram", frozenset({"y"})),
                             "g_created": ("gauge", None)}
