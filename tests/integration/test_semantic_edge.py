"""The semantic tier end to end: paraphrases hit within their scope, nothing else does."""

from __future__ import annotations

import aiohttp
import orjson
import pytest

from edgecache.config import SemanticConfig
from tests.conftest import Stack

pytest.importorskip("sentence_transformers", reason="the semantic extra is not installed")
pytest.importorskip("faiss", reason="the semantic extra is not installed")

pytestmark = pytest.mark.integration

SEMANTIC = {"semantic": SemanticConfig(enabled=True)}


def chat(question: str, **extra: object) -> dict:
    return {"model": "sim-llm", "temperature": 0, **extra,
            "messages": [{"role": "system", "content": "You are the support bot of Acme."},
                         {"role": "user", "content": question}]}


async def ask(edge: str, body: dict, key: str = "sk-a", **headers: str) -> tuple[str, str]:
    async with aiohttp.ClientSession() as s, s.post(edge + "/v1/chat/completions", json=body,
                                                    headers={"Authorization": f"Bearer {key}", **headers}) as r:
        assert r.status == 200, await r.text()
        answer = orjson.loads(await r.read())["choices"][0]["message"]["content"]
        return r.headers["Cache-Status"], answer


@pytest.fixture
async def edge_stack(make_stack) -> Stack:
    return await make_stack(node_overrides=SEMANTIC)


async def test_paraphrase_is_a_semantic_hit_with_the_stored_answer(edge_stack: Stack) -> None:
    edge = edge_stack.edges["us-east"]
    _, first = await ask(edge, chat("How do I reset my password?"))
    status, second = await ask(edge, chat("How can I reset my password?"))
    assert 'hit; detail="semantic 0.' in status
    assert second == first
    assert await edge_stack.origin_requests() == 1
    async with aiohttp.ClientSession() as s, s.get(edge + "/healthz") as r:
        health = await r.json()
    assert health["semantic"]["status"] == "enabled" and health["semantic"]["hits"] == 1


async def test_questions_about_different_accounts_do_not_share_answers(edge_stack: Stack) -> None:
    edge = edge_stack.edges["us-east"]
    await ask(edge, chat("What is the balance of account 1234?"))
    status, _ = await ask(edge, chat("What is the balance of account 5678?"))
    assert "fwd=miss" in status
    assert await edge_stack.origin_requests() == 2


async def test_unrelated_question_misses(edge_stack: Stack) -> None:
    edge = edge_stack.edges["us-east"]
    await ask(edge, chat("How do I reset my password?"))
    status, _ = await ask(edge, chat("Where can I download my invoices?"))
    assert "fwd=miss" in status


@pytest.mark.parametrize(("second", "key", "headers"), [
    (chat("How can I reset my password?"), "sk-other-tenant", {}),
    (chat("How can I reset my password?", model="other-model"), "sk-a", {}),
    (chat("How can I reset my password?", temperature=0.9), "sk-a", {}),
    (chat("How can I reset my password?", n=2), "sk-a", {}),
    (chat("How can I reset my password?", tools=[{"type": "function", "function": {
        "name": "lookup", "parameters": {"type": "object", "properties": {}}}}]), "sk-a", {}),
    (chat("How can I reset my password?"), "sk-a", {"X-EdgeCache-Semantic": "off"}),
])
async def test_no_semantic_hit_across_scopes_or_when_refused(edge_stack: Stack, second: dict, key: str,
                                                             headers: dict) -> None:
    edge = edge_stack.edges["us-east"]
    await ask(edge, chat("How do I reset my password?"))
    async with aiohttp.ClientSession() as s, s.post(edge + "/v1/chat/completions", json=second,
                                                    headers={"Authorization": f"Bearer {key}", **headers}) as r:
        assert "semantic" not in r.headers["Cache-Status"]


async def test_purged_tag_removes_semantic_answers(edge_stack: Stack) -> None:
    from nodes.app import NODE

    edge = edge_stack.edges["us-east"]
    await ask(edge, chat("How do I reset my password?"), **{"Cache-Tag": "doc:42"})
    state = edge_stack.servers["us-east"].app[NODE]
    assert await state.purge_tags(frozenset({"doc:42"})) == 1
    assert state.semantic is not None and len(state.semantic.index) == 0
    status, _ = await ask(edge, chat("How can I reset my password?"))
    assert "fwd=miss" in status


async def test_restarted_edge_keeps_its_semantic_index_consistent_with_disk(make_stack, tmp_path) -> None:
    from aiohttp.test_utils import TestServer

    from nodes.app import NODE, create_app

    stack = await make_stack(node_overrides=SEMANTIC, data_root=tmp_path)
    edge = stack.edges["us-east"]
    _, first = await ask(edge, chat("How do I reset my password?"))
    await ask(edge, chat("Where can I download my invoices?"), **{"Cache-Tag": "doc:7"})
    await stack.servers["us-east"].app[NODE].purge_tags(frozenset({"doc:7"}))
    await stack.servers["us-east"].close()
    restarted = TestServer(create_app(stack.node_configs["us-east"]), host="127.0.0.1")
    await restarted.start_server()
    try:
        url = str(restarted.make_url("")).rstrip("/")
        assert len(restarted.app[NODE].semantic.index) == 1
        status, second = await ask(url, chat("How can I reset my password?"), **{"Cache-Control": "only-if-cached"})
        assert "semantic" in status and second == first
    finally:
        await restarted.close()


@pytest.fixture
def policy_on(tmp_path):
    """The shipped policy's file, saying it was calibrated on each embedder backend in turn."""
    from edgecache.semantic_policy import DEFAULT_PATH

    doc = orjson.loads(DEFAULT_PATH.read_bytes())
    paths = {}
    for embedder in ("onnx", "onnx-int8", "torch"):
        paths[embedder] = tmp_path / f"policy-{embedder}.json"
        paths[embedder].write_bytes(orjson.dumps({**doc, "embedder": embedder}))
    return lambda embedder: str(paths[embedder])


async def health_of(edge: str) -> dict:
    async with aiohttp.ClientSession() as s, s.get(edge + "/healthz") as r:
        return (await r.json())["semantic"]


@pytest.mark.parametrize(("policy_embedder", "other"), [("onnx-int8", "onnx"), ("onnx", "onnx-int8")])
async def test_the_edge_embeds_with_the_backend_its_policy_was_calibrated_on(make_stack, policy_on, model_cache,
                                                                             policy_embedder, other) -> None:
    import asyncio

    import numpy as np

    from edgecache.stores.embed import Embedder
    from nodes.app import NODE

    config = SemanticConfig(enabled=True, policy_path=policy_on(policy_embedder), model_cache_dir=model_cache)
    stack = await make_stack(node_overrides={"semantic": config})
    health = await health_of(stack.edges["us-east"])
    assert health["status"] == "enabled" and health["embedder"] == policy_embedder
    question = "How do I export the invoices of my whole team?"
    served = await stack.servers["us-east"].app[NODE].semantic.embed(question)
    want, unwanted = await asyncio.to_thread(
        lambda: [Embedder(backend=b, cache_dir=model_cache).encode([question])[0] for b in (policy_embedder, other)])
    assert np.allclose(served, want, atol=1e-6)
    assert not np.allclose(served, unwanted, atol=1e-3)


async def test_a_policy_whose_embedder_cannot_run_leaves_the_tier_unavailable_and_says_why(
        make_stack, policy_on, model_cache, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)    # as if onnxruntime were not installed
    config = SemanticConfig(enabled=True, policy_path=policy_on("onnx-int8"), model_cache_dir=model_cache)
    stack = await make_stack(node_overrides={"semantic": config})
    edge = stack.edges["us-east"]
    health = await health_of(edge)
    assert health["status"].startswith("unavailable")
    assert "onnx-int8" in health["status"] and "onnxruntime" in health["status"]
    status, _ = await ask(edge, chat("How do I reset my password?"))      # exact tiers still serve
    status, _ = await ask(edge, chat("How can I reset my password?"))
    assert "semantic" not in status and "fwd=miss" in status


@pytest.fixture
def not_a_folder(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    return blocker


async def test_a_policy_whose_model_cannot_be_exported_leaves_the_tier_unavailable(make_stack, policy_on,
                                                                                   not_a_folder) -> None:
    blocker = not_a_folder
    config = SemanticConfig(enabled=True, policy_path=policy_on("onnx-int8"),
                            model_cache_dir=str(blocker / "models"))   # a read-only image without the export
    stack = await make_stack(node_overrides={"semantic": config})
    health = await health_of(stack.edges["us-east"])
    assert health["status"].startswith("unavailable: the policy was calibrated on the onnx-int8 embedder")


@pytest.fixture
def tenant_policies(tmp_path) -> dict[str, str]:
    """strict: the shipped policy with every threshold at 1.0 (the verifier never lets a pair
    through); odd: the same, saying it was calibrated on another embedder than the node's."""
    from edgecache.semantic_policy import DEFAULT_PATH

    doc = orjson.loads(DEFAULT_PATH.read_bytes())
    for verifier in doc["verifiers"].values():
        verifier["calibration"]["rows"] = [[1.0, *row[1:]] for row in verifier["calibration"]["rows"]]
    (tmp_path / "strict.json").write_bytes(orjson.dumps(doc))
    doc["embedder"] = "torch" if doc["embedder"] != "torch" else "onnx-int8"
    (tmp_path / "odd.json").write_bytes(orjson.dumps(doc))
    return {"strict": str(tmp_path / "strict.json"), "odd": str(tmp_path / "odd.json")}


async def test_each_tenant_gets_its_own_policy_or_none(make_stack, tenant_policies) -> None:
    import asyncio

    from edgecache.config import TenantConfig
    from nodes.app import NODE

    strict_policy, other_embedder = tenant_policies["strict"], tenant_policies["odd"]
    tenants = (TenantConfig("acme", ("sk-acme",)),                                    # the node's policy
               TenantConfig("bank", ("sk-bank",), semantic_policy_path=strict_policy),
               TenantConfig("quiet", ("sk-quiet",), semantic=False),
               TenantConfig("tight", ("sk-tight",), semantic_max_false_hit_rate=0.00001),  # below the table
               TenantConfig("odd", ("sk-odd",), semantic_policy_path=str(other_embedder)),
               TenantConfig("fine", ("sk-fine",), semantic_max_false_hit_rate=0.02))
    stack = await make_stack(node_overrides=SEMANTIC, tenants=tenants)
    edge = stack.edges["us-east"]
    for key in ("sk-acme", "sk-bank", "sk-quiet", "sk-tight", "sk-odd"):
        _, first = await ask(edge, chat("How do I reset my password?"), key)
        status, second = await ask(edge, chat("How can I reset my password?"), key)
        if key == "sk-acme":
            assert 'detail="semantic 0.' in status and second == first
        else:
            assert "semantic" not in status and "fwd=miss" in status, (key, status)
    health = await health_of(edge)
    assert health["status"] == "enabled" and health["hits"] == 1
    tenants_health = health["tenants"]
    assert "acme" not in tenants_health                      # on the node's policy: nothing to say
    assert tenants_health["bank"]["status"] == "enabled" and tenants_health["bank"]["threshold"] == 1.0
    assert tenants_health["fine"]["max_false_hit_rate"] == 0.02
    assert tenants_health["fine"]["threshold"] < health["threshold"]   # a looser bound, a lower bar
    assert tenants_health["quiet"]["status"].startswith("off")
    assert "below what this calibration supports" in tenants_health["tight"]["status"]
    assert "embedder" in tenants_health["odd"]["status"]
    # answers of tenants kept out were never indexed: acme's first question, bank's two
    state = stack.servers["us-east"].app[NODE]
    await asyncio.gather(*state.writes)
    assert len(state.semantic.index) == 3


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"max_false_hit_rate": 0.00001}, "below what this calibration supports"),
    ({"policy_path": "/nonexistent/policy.json"}, "No such file"),
])
async def test_a_policy_the_node_cannot_use_leaves_the_tier_unavailable_and_exact_hits_working(
        make_stack, overrides, reason) -> None:
    stack = await make_stack(node_overrides={"semantic": SemanticConfig(enabled=True, **overrides)})
    edge = stack.edges["us-east"]
    health = await health_of(edge)
    assert health["status"].startswith("unavailable") and reason in health["status"]
    _, first = await ask(edge, chat("How do I reset my password?"))
    status, again = await ask(edge, chat("How do I reset my password?"))
    assert "; hit;" in status and again == first


async def test_a_paraphrase_naming_a_tag_the_stored_answer_lacks_is_not_served_from_it(edge_stack: Stack) -> None:
    edge = edge_stack.edges["us-east"]
    await ask(edge, chat("How do I reset my password?"))
    status, _ = await ask(edge, chat("How can I reset my password?"), **{"Cache-Tag": "doc:42"})
    assert "semantic" not in status and "fwd=miss" in status   # a purge of doc:42 could not reach it


async def test_vectors_of_entries_both_tiers_evicted_do_not_pile_up(make_stack) -> None:
    import asyncio

    from nodes.app import NODE
    from nodes.semantic import SLACK_VECTORS

    stack = await make_stack(node_overrides={**SEMANTIC, "memory_bytes": 4096, "disk_bytes": 0})
    edge = stack.edges["us-east"]
    state = stack.servers["us-east"].app[NODE]
    for seed in range(160):   # each a scope of its own: no later search in it would meet the vector
        await ask(edge, chat("How do I reset my password?", seed=seed))
    while state.writes:
        await asyncio.gather(*list(state.writes), return_exceptions=True)
    held = len(state.memory) + await asyncio.to_thread(len, state.disk)
    assert held < 160 - SLACK_VECTORS   # the tiers evicted most of them
    assert len(state.semantic.index) <= 2 * held + SLACK_VECTORS
