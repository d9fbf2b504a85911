"""The simulated GPU server over HTTP: OpenAI shapes, prefix caching, queueing, metrics."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from edgecache.config import SimConfig
from origin.sim import create_sim_app
from origin.sim.app import ENGINE
from origin.sim.engine import Engine

MODEL = "sim-llm"
SYSTEM = "You are the support assistant of an edge cache. Answer briefly and politely. " * 8


class Gate:
    """Injected sleep: the first ``passes`` simulated delays pass, later ones wait for ``open``."""

    def __init__(self, passes: int = 0) -> None:
        self.passes = passes
        self.open = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        if self.passes > 0:
            self.passes -= 1
            await asyncio.sleep(0)
            return
        await self.open.wait()


@pytest.fixture
def sim(aiohttp_client):
    async def start(gate: Gate | None = None, **overrides):
        fields = {"time_scale": 0.0 if gate is None else 1.0} | overrides
        app = create_sim_app(SimConfig(**fields),
                             **({"sleep": gate.sleep} if gate is not None else {}))
        return await aiohttp_client(app), app[ENGINE]
    return start


def chat(user: str, system: str = SYSTEM, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "system", "content": system},
                                         {"role": "user", "content": user}]} | extra


async def post_json(client, path: str, body: dict) -> tuple[int, dict]:
    resp = await client.post(path, json=body)
    return resp.status, await resp.json()


async def metrics(client) -> dict[tuple[str, tuple], float]:
    text = await (await client.get("/metrics")).text()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(m: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(({"model_name": MODEL, "engine": "0"} | labels).items())))
    return m[key]


def sse_events(raw: bytes) -> list:
    assert raw.endswith(b"data: [DONE]\n\n")
    frames = raw.split(b"\n\n")
    assert frames[-1] == b"" and frames[-2] == b"data: [DONE]"
    return [orjson.loads(f.removeprefix(b"data: ")) for f in frames[:-2]]


# -- shapes --------------------------------------------------------------------------------

async def test_chat_completion_has_the_openai_shape(sim):
    client, _ = await sim()
    status, body = await post_json(client, "/v1/chat/completions", chat("hello", max_tokens=6))
    assert status == 200
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["model"] == MODEL and isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice == {"index": 0, "message": {"role": "assistant",
                                              "content": choice["message"]["content"]},
                      "logprobs": None, "finish_reason": "length"}
    assert choice["message"]["content"].startswith("sim-answer ")
    usage = body["usage"]
    assert usage["completion_tokens"] == 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + 6
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}


async def test_text_completion_has_the_openai_shape(sim):
    client, _ = await sim()
    status, body = await post_json(client, "/v1/completions",
                                   {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4})
    assert status == 200
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    [choice] = body["choices"]
    assert set(choice) == {"index", "text", "logprobs", "finish_reason"}
    assert body["usage"]["completion_tokens"] == 4


async def test_echo_prepends_the_prompt(sim):
    client, _ = await sim()
    _, plain = await post_json(client, "/v1/completions",
                               {"model": MODEL, "prompt": "Echo me", "max_tokens": 3})
    _, echoed = await post_json(client, "/v1/completions",
                                {"model": MODEL, "prompt": "Echo me", "max_tokens": 3, "echo": True})
    assert echoed["choices"][0]["text"] == "Echo me" + plain["choices"][0]["text"]


async def test_models_health_and_unknown_routes(sim):
    client, _ = await sim()
    assert (await client.get("/health")).status == 200
    body = await (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [MODEL]
    assert body["data"][0]["object"] == "model"
    assert (await client.get("/v1/nothing")).status == 404


async def test_n_choices_differ_by_index_and_share_the_prompt_marker(sim):
    client, _ = await sim()
    _, body = await post_json(client, "/v1/chat/completions",
                              chat("pick", n=3, max_tokens=12, temperature=0.8))
    texts = [c["message"]["content"] for c in body["choices"]]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert len(set(texts)) == 3
    assert len({t.split()[1] for t in texts}) == 1
    assert body["usage"]["completion_tokens"] == 36


async def test_stop_string_ends_the_answer_with_finish_reason_stop(sim):
    client, _ = await sim()
    _, full = await post_json(client, "/v1/chat/completions", chat("q", max_tokens=20))
    text = full["choices"][0]["message"]["content"]
    word = " " + text.split()[4]
    _, stopped = await post_json(client, "/v1/chat/completions",
                                 chat("q", max_tokens=20, stop=[word]))
    choice = stopped["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == text[:text.index(word)]
    assert stopped["usage"]["completion_tokens"] < 20


# -- determinism ---------------------------------------------------------------------------

async def test_answers_are_deterministic_across_servers_and_differ_across_prompts(sim):
    one, _ = await sim()
    two, _ = await sim()
    _, a1 = await post_json(one, "/v1/chat/completions", chat("What is a CDN?", seed=7))
    _, a2 = await post_json(two, "/v1/chat/completions", chat("What is a CDN?", seed=7))
    _, b = await post_json(one, "/v1/chat/completions", chat("What is an origin?", seed=7))
    text = a1["choices"][0]["message"]["content"]
    assert a2["choices"][0]["message"]["content"] == text
    other = b["choices"][0]["message"]["content"]
    assert other.split()[1] != text.split()[1]


async def test_cached_answer_is_the_same_text(sim):
    client, _ = await sim()
    _, first = await post_json(client, "/v1/chat/completions", chat("repeat me"))
    _, again = await post_json(client, "/v1/chat/completions", chat("repeat me"))
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert again["choices"][0]["message"] == first["choices"][0]["message"]


# -- streaming -----------------------------------------------------------------------------

async def test_chat_stream_has_role_content_finish_usage_and_done(sim):
    client, _ = await sim()
    _, whole = await post_json(client, "/v1/chat/completions", chat("stream me", max_tokens=8))
    resp = await client.post("/v1/chat/completions", json=chat(
        "stream me", max_tokens=8, stream=True, stream_options={"include_usage": True}))
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(await resp.read())
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert len({e["id"] for e in events}) == 1
    first, *middle, closing, last = events
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["usage"] is None for e in events[:-1])
    content = "".join(e["choices"][0]["delta"]["content"] for e in middle)
    assert content == whole["choices"][0]["message"]["content"]
    assert all(e["choices"][0]["finish_reason"] is None for e in middle)
    assert closing["choices"][0]["finish_reason"] == "length"
    assert closing["choices"][0]["delta"] == {}
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == 8
    assert last["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


async def test_stream_without_include_usage_carries_no_usage(sim):
    client, _ = await sim()
    resp = await client.post("/v1/chat/completions", json=chat("x", max_tokens=3, stream=True))
    events = sse_events(await resp.read())
    assert all("usage" not in e for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length"


async def test_completion_stream_concatenates_to_the_whole_text(sim):
    client, _ = await sim()
    body = {"model": MODEL, "prompt": ["first prompt", "second prompt"], "max_tokens": 5, "n": 2}
    _, whole = await post_json(client, "/v1/completions", body)
    resp = await client.post("/v1/completions", json=body | {"stream": True})
    events = sse_events(await resp.read())
    assert all(e["object"] == "text_completion" for e in events)
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    for e in events:
        [c] = e["choices"]
        texts[c["index"]] = texts.get(c["index"], "") + c["text"]
        if c["finish_reason"]:
            finish[c["index"]] = c["finish_reason"]
    assert texts == {c["index"]: c["text"] for c in whole["choices"]}
    assert finish == dict.fromkeys(range(4), "length")


# -- prefix cache --------------------------------------------------------------------------

async def test_cached_tokens_rise_on_a_repeated_shared_prefix(sim):
    client, _ = await sim()
    cached = []
    tag = "What is a tag? Explain it in detail, with examples about edge caches and origins."
    for question in ("What is a purge?", tag, tag):
        _, body = await post_json(client, "/v1/chat/completions", chat(question))
        cached.append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
        assert cached[-1] % 16 == 0
    assert cached[0] == 0
    assert 0 < cached[1] < cached[2]
    m = await metrics(client)
    assert sample(m, "vllm:prefix_cache_hits_total") == sum(cached)
    assert sample(m, "vllm:prefix_cache_queries_total") == sample(m, "vllm:prompt_tokens_total")


async def test_small_kv_cache_evicts_least_recently_used_prefixes(sim):
    client, _ = await sim(kv_capacity_blocks=12)

    async def cached(stem: int) -> int:
        body = {"model": MODEL, "prompt": [stem] * 80, "max_tokens": 1}
        _, out = await post_json(client, "/v1/completions", body)
        return out["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert await cached(1) == 0
    assert await cached(1) == 64  # 4 of 5 full blocks: the last token is always computed
    assert await cached(2) == 0
    assert await cached(3) == 0  # 12 blocks cannot hold three 6-block sequences
    assert await cached(1) == 0


async def test_blocks_of_a_running_request_are_pinned_not_evicted(sim):
    gate = Gate()
    client, engine = await sim(gate, kv_capacity_blocks=12)
    a_prompt = [1] * 80
    running = asyncio.create_task(client.post("/v1/completions", json={
        "model": MODEL, "prompt": a_prompt, "max_tokens": 16}))  # 6 blocks pinned or promised
    await asyncio.wait_for(engine.wait_until(lambda: engine.num_running == 1), 5)
    waiting = asyncio.create_task(client.post("/v1/completions", json={
        "model": MODEL, "prompt": [2] * 100, "max_tokens": 1}))  # needs 7 blocks
    await asyncio.wait_for(engine.wait_until(lambda: engine.num_waiting == 1), 5)
    assert engine.num_running == 1  # a free slot, but no room: it waits rather than evict
    assert engine.kv.cached_tokens([*a_prompt, 0]) == 80
    m = await metrics(client)
    assert sample(m, "vllm:kv_cache_usage_perc") == pytest.approx(5 / 12)
    gate.open.set()
    assert (await running).status == 200
    assert (await waiting).status == 200


# -- errors --------------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "body", "status"), [
    ("/v1/chat/completions", b"{not json", 400),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}]}', 400),
    ("/v1/chat/completions",
     b'{"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}', 404),
    ("/v1/completions", b'{"model": "sim-llm", "prompt": "x", "max_tokens": 0}', 400),
    ("/v1/completions", b'{"model": "sim-llm", "prompt": "x", "max_tokens": 70}', 400),
    ("/v1/completions", b'{"model": "sim-llm", "prompt": "' + b"w " * 70 + b'"}', 400),
])
async def test_bad_requests_get_openai_error_bodies(sim, path, body, status):
    client, _ = await sim(max_model_len=64)
    resp = await client.post(path, data=body, headers={"Content-Type": "application/json"})
    assert resp.status == status
    error = (await resp.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]


async def test_unknown_model_is_404_like_vllm(sim):
    client, _ = await sim()
    status, body = await post_json(client, "/v1/chat/completions", chat("x") | {"model": "nope"})
    assert status == 404
    assert body["error"]["message"] == "The model `nope` does not exist."


async def test_request_that_can_never_fit_the_kv_cache_is_400(sim):
    client, _ = await sim(kv_capacity_blocks=2)
    status, body = await post_json(client, "/v1/completions",
                                   {"model": MODEL, "prompt": [5] * 30, "max_tokens": 8})
    assert status == 400
    assert "KV cache" in body["error"]["message"]


# -- queueing, back-pressure, disconnects ------------------------------------------------

async def test_requests_beyond_max_running_queue_and_beyond_max_waiting_get_429(sim):
    gate = Gate()
    client, engine = await sim(gate, max_running=1, max_waiting=1)
    first = asyncio.create_task(client.post("/v1/chat/completions", json=chat("a")))
    await asyncio.wait_for(engine.wait_until(lambda: engine.num_running == 1), 5)
    second = asyncio.create_task(client.post("/v1/chat/completions", json=chat("b")))
    await asyncio.wait_for(engine.wait_until(lambda: engine.num_waiting == 1), 5)
    m = await metrics(client)
    assert sample(m, "vllm:num_requests_running") == 1
    assert sample(m, "vllm:num_requests_waiting") == 1

    refused = await client.post("/v1/chat/completions", json=chat("c"))
    assert refused.status == 429
    assert refused.headers["Retry-After"] == "1"
    assert (await refused.json())["error"]["type"] == "rate_limit_error"

    assert not second.done()
    gate.open.set()
    assert (await first).status == 200
    assert (await second).status == 200
    m = await metrics(client)
    assert sample(m, "vllm:request_success_total", finished_reason="length") == 2
    assert sample(m, "vllm:num_requests_running") == 0


async def test_client_disconnect_mid_stream_frees_its_slot_and_blocks(sim):
    gate = Gate(passes=2)  # prefill and one decode step pass, then the stream stalls
    client, engine = await sim(gate, max_running=1)
    resp = await client.post("/v1/chat/completions",
                             json=chat("long answer", max_tokens=50, stream=True))
    role = await resp.content.readuntil(b"\n\n")
    token = await resp.content.readuntil(b"\n\n")
    assert b'"role":"assistant"' in role and b'"content":"sim"' in token
    assert engine.num_running == 1 and engine.kv_usage > 0
    queued = asyncio.create_task(client.post("/v1/chat/completions", json=chat("next")))
    await asyncio.wait_for(engine.wait_until(lambda: engine.num_waiting == 1), 5)

    resp.close()  # the client goes away mid-stream

    await asyncio.wait_for(engine.wait_until(lambda: engine.num_waiting == 0), 5)
    gate.open.set()
    assert (await queued).status == 200
    await asyncio.wait_for(engine.wait_until(lambda: engine.num_running == 0), 5)
    assert engine.kv_usage == 0.0
    m = await metrics(client)
    assert sample(m, "vllm:request_success_total", finished_reason="abort") == 1


async def test_client_disconnect_while_queued_leaves_the_queue(sim):
    gate = Gate()
    client, engine = await sim(gate, max_running=1)
    first = asyncio.create_task(client.post("/v1/chat/completions", json=chat("a")))
    await asyncio.wait_for(engine.wait_until(lambda: engine.num_running == 1), 5)
    queued = asyncio.create_task(client.post("/v1/chat/completions", json=chat("b")))
    await asyncio.wait_for(engine.wait_until(lambda: engine.num_waiting == 1), 5)
    queued.cancel()  # closes the connection
    await asyncio.wait_for(engine.wait_until(lambda: engine.num_waiting == 0), 5)
    gate.open.set()
    assert (await first).status == 200


# -- metrics -------------------------------------------------------------------------------

async def test_metrics_use_vllm_names_with_a_model_name_label(sim):
    client, _ = await sim()
    await post_json(client, "/v1/chat/completions", chat("count me", max_tokens=5))
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    m = await metrics(client)
    for name in ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                 "vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:time_to_first_token_seconds_count",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total"):
        sample(m, name)
    assert sample(m, "vllm:time_to_first_token_seconds_count") == 1
    assert sample(m, "vllm:generation_tokens_total") == 5
    assert sample(m, "vllm:request_success_total", finished_reason="length") == 1
    assert sample(m, "vllm:kv_cache_usage_perc") == 0.0


async def test_each_server_has_its_own_metrics(sim):
    one, _ = await sim()
    two, _ = await sim()
    await post_json(one, "/v1/chat/completions", chat("only here"))
    assert sample(await metrics(one), "vllm:request_success_total", finished_reason="length") == 1
    assert sample(await metrics(two), "vllm:request_success_total", finished_reason="length") == 0


async def test_reset_prefix_cache_forgets_cached_blocks(sim):
    client, _ = await sim()
    await post_json(client, "/v1/chat/completions", chat("warm"))
    assert (await client.post("/reset_prefix_cache")).status == 200
    _, body = await post_json(client, "/v1/chat/completions", chat("warm"))
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_app_is_a_plain_aiohttp_application():
    app = create_sim_app(SimConfig())
    assert isinstance(app, web.Application)
    assert isinstance(app[ENGINE], Engine)
