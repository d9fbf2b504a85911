"""The edge's semantic tier: near-duplicate questions answered from cache, within their scope.

A lookup embeds the question (through the micro-batcher, off the loop), searches the scope's
vectors (in a worker thread), and asks the calibrated policy about each neighbour, nearest
first. A neighbour is served only if its entry is still fresh, in the same tenant and scope,
and the policy accepts the pair. Vectors of entries that are gone are dropped on the way.

Optional: without ``pip install edgecache[semantic]`` the tier reports why it is unavailable
and the node runs with its exact tiers only.

The edge embeds with the backend its policy was calibrated on (``SemanticPolicy.embedder``:
``onnx``, ``onnx-int8`` or ``torch``), never another: vectors of another backend would void the
policy's false-hit bound. When that backend cannot run here (onnxruntime missing, the model
export failing, ...) the tier is unavailable and ``/healthz`` says why; it does not fall back.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edgecache.config import SemanticConfig, TenantConfig
from edgecache.entry import Entry
from edgecache.errors import Overloaded
from edgecache.semantic import SemanticQuery

__all__ = ["EmbedderUnavailable", "PolicyUnavailable", "SemanticHit", "SemanticTier", "open_semantic_tier",
           "tenant_policies_for"]

log = logging.getLogger("edgecache.node.semantic")

SLACK_VECTORS = 64   # the index may hold this many vectors beyond twice the tiers' entries


class EmbedderUnavailable(RuntimeError):
    """The embedder backend the policy was calibrated on cannot run on this node."""


class PolicyUnavailable(RuntimeError):
    """The node's hit policy cannot be used: unreadable, or no threshold within the bound."""


@dataclass(frozen=True, slots=True)
class SemanticHit:
    entry: Entry
    cosine: float   # what Cache-Status reports: detail="semantic 0.962"
    score: float    # the verifier's score, which the calibrated threshold applies to


class SemanticTier:
    """Embedder, scoped vector index and hit policies of one edge node.

    ``embedder`` names the backend the batcher's model runs (the policy's: ``open_semantic_tier``).
    ``policy`` judges every tenant's pairs but those in ``tenant_policies`` (a tenant's own
    calibration or bound, ``[[tenants]]``); tenants in ``off`` (name -> why) never use the tier."""

    def __init__(self, config: SemanticConfig, batcher: Any, index: Any, policy: Any, embedder: str, *,
                 tenant_policies: Mapping[str, Any] | None = None, off: Mapping[str, str] | None = None,
                 held: Callable[[], int] | None = None,
                 alive: Callable[[], Callable[[bytes], bool]] | None = None) -> None:
        self.config = config
        self.embedder = embedder
        self.batcher = batcher
        self.index = index
        self.policy = policy
        self.tenant_policies = dict(tenant_policies or {})
        self.off = dict(off or {})
        # the entries the tiers hold, and a test of a key being one of them: vectors of evicted
        # entries are dropped once the index outgrows the tiers (blocking: called in a worker thread)
        self._held = held
        self._alive = alive
        self._held_count = 0   # the tiers' entries when last counted
        self.lookups = 0
        self.hits = 0
        self.overloaded = 0

    def serves(self, tenant: str) -> bool:
        """False for a tenant kept out of the semantic tier (no lookups, nothing remembered)."""
        return tenant not in self.off

    def policy_for(self, tenant: str) -> Any:
        return self.tenant_policies.get(tenant, self.policy)

    async def embed(self, text: str) -> Any | None:
        """The question's vector, or None when the embedder's queue is full."""
        try:
            return await self.batcher.embed(text)
        except Overloaded:
            self.overloaded += 1
            return None

    async def lookup(self, query: SemanticQuery, vector: Any, tenant: str,
                     fetch: Callable[[bytes], Awaitable[Entry | None]],
                     tags: frozenset[str] = frozenset()) -> SemanticHit | None:
        """The nearest stored answer, if the policy accepts it for ``query`` and it carries every
        one of the request's ``tags`` (else a purge of one of them would not reach it).

        Only the nearest live neighbour is judged: the policy's false-hit bound is calibrated
        per pair, and judging several candidates until one passes would multiply it. Further
        candidates stand in only for neighbours whose entries are gone (purged, expired).
        """
        self.lookups += 1
        policy = self.policy_for(tenant)
        neighbours = await asyncio.to_thread(self.index.search, query.scope, vector, self.config.candidates,
                                             policy.min_cosine)
        gone: list[bytes] = []
        hit = None
        for n in neighbours:
            entry = await fetch(n.key)
            if (entry is None or entry.tenant != tenant or entry.semantic_scope != query.scope
                    or entry.query is None):
                gone.append(n.key)
                continue
            if not tags <= entry.tags:
                break   # the nearest answer depends on less than this request: not served
            verdict = policy.judge(query.text, entry.query, n.score, vector, n.vector)
            if verdict.hit:
                hit = SemanticHit(entry, verdict.cosine, verdict.score)
            break
        if gone:
            await asyncio.to_thread(self.index.remove, gone)
        if hit is not None:
            self.hits += 1
        return hit

    async def remember(self, entry: Entry, vector: Any | None) -> None:
        """Index a stored answer's question (embedding it now if the lookup did not)."""
        if entry.semantic_scope is None or entry.query is None:
            return
        if vector is None:
            vector = await self.embed(entry.query)
            if vector is None:
                return
        await asyncio.to_thread(self.index.add, entry.semantic_scope, entry.key, vector)
        if self._held is not None and self._alive is not None \
                and len(self.index) > 2 * self._held_count + SLACK_VECTORS:
            await asyncio.to_thread(self._drop_evicted)

    def _drop_evicted(self) -> None:
        """Drop the vectors whose entries both tiers evicted, once the index holds more than twice
        the tiers' entries (so each pass at least halves it: O(1) amortised per answer)."""
        assert self._held is not None and self._alive is not None
        count = self._held_count = self._held()
        if len(self.index) > 2 * count + SLACK_VECTORS:
            dropped = self.index.reconcile(self._alive())
            log.debug("semantic index: dropped %d vectors of evicted entries", dropped)

    async def forget(self, keys: list[bytes]) -> int:
        return await asyncio.to_thread(self.index.remove, keys) if keys else 0

    def health(self) -> dict[str, Any]:
        out = {"status": "enabled", "vectors": len(self.index), "lookups": self.lookups, "hits": self.hits,
               "overloaded": self.overloaded, "embedder": self.embedder,
               "threshold": self.policy.threshold,
               "max_false_hit_rate": self.policy.max_false_hit_rate}
        tenants = {name: {"status": "enabled", "threshold": p.threshold, "max_false_hit_rate": p.max_false_hit_rate}
                   for name, p in self.tenant_policies.items()}
        tenants.update((name, {"status": why}) for name, why in self.off.items())
        if tenants:
            out["tenants"] = tenants
        return out

    async def save_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.config.save_interval_s)
            try:
                await asyncio.to_thread(self.index.save)
            except Exception:
                log.exception("saving the vector index failed")

    async def close(self) -> None:
        await self.batcher.close()
        await asyncio.to_thread(self.index.close)


async def open_semantic_tier(config: SemanticConfig, data_dir: str, alive: Callable[[], Callable[[bytes], bool]],
                             *, worker: int = 0, tenants: Sequence[TenantConfig] = (),
                             held: Callable[[], int] | None = None) -> tuple[SemanticTier | None, str]:
    """Load the model, the policies and the saved vectors; (None, reason) when it cannot.

    ``alive()`` (blocking) gives a test of a key being held by the node's tiers: saved vectors
    of entries gone are dropped at start, and, with ``held()`` (the entries the tiers hold),
    vectors of evicted entries as the index grows.

    Worker processes of one node share the disk tier but not memory: each keeps the vectors
    of the answers it filled, in a folder of its own (``vectors``, ``vectors-1``, …).
    A tenant whose own policy cannot be used (unreadable, another embedder's, a bound its
    table does not support) is kept out of the tier, with the reason in ``/healthz``; the
    other tenants are not affected.
    """
    if not config.enabled:
        return None, "disabled"
    try:   # imports read files and the model loads for seconds: all of it off the loop
        folder = os.path.join(data_dir, "vectors" if worker == 0 else f"vectors-{worker}")
        policy, embedder, index, batcher_class = await asyncio.to_thread(_load, config, folder, alive)
        tenant_policies, off = await asyncio.to_thread(tenant_policies_for, config, policy, tenants)
    except ImportError as exc:
        log.warning("semantic tier unavailable (pip install 'edgecache[semantic]'): %s", exc)
        return None, f"unavailable: {exc.name or exc} is not installed (pip install 'edgecache[semantic]')"
    except (EmbedderUnavailable, PolicyUnavailable) as exc:
        log.error("semantic tier unavailable: %s", exc)
        return None, f"unavailable: {exc}"
    batcher = batcher_class(embedder.encode, window_s=config.batch_window_s, max_batch=config.max_batch,
                            max_queue=config.max_queue)
    await batcher.start()
    return SemanticTier(config, batcher, index, policy, embedder.backend, tenant_policies=tenant_policies,
                        off=off, held=held, alive=alive), "enabled"


def tenant_policies_for(config: SemanticConfig, node_policy: Any,
                        tenants: Sequence[TenantConfig]) -> tuple[dict[str, Any], dict[str, str]]:
    """The tenants' own policies (those that differ from the node's) and the tenants kept out
    of the semantic tier, with why. A tenant's policy must name the node's embedder: its
    vectors are the only ones this node has."""
    from edgecache.semantic_policy import SemanticPolicy

    policies: dict[str, Any] = {}
    off: dict[str, str] = {}
    loaded: dict[tuple[str, float], Any] = {}
    for tenant in tenants:
        if not tenant.semantic:
            off[tenant.name] = "off (tenant configuration)"
            continue
        path = tenant.semantic_policy_path or config.policy_path
        rate = tenant.semantic_max_false_hit_rate or config.max_false_hit_rate
        if (path, rate) == (config.policy_path, config.max_false_hit_rate):
            continue
        if (path, rate) not in loaded:
            try:
                loaded[path, rate] = SemanticPolicy.load(path or None, max_false_hit_rate=rate)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                loaded[path, rate] = f"unavailable: the tenant's policy ({path or 'shipped'}, " \
                                     f"max_false_hit_rate {rate:g}): {exc}"
        policy = loaded[path, rate]
        if not isinstance(policy, str) and policy.embedder != node_policy.embedder:
            policy = (f"unavailable: the tenant's policy was calibrated on the {policy.embedder} embedder; "
                      f"this node embeds with {node_policy.embedder}")
        if isinstance(policy, str):
            log.error("semantic tier off for tenant %s: %s", tenant.name, policy)
            off[tenant.name] = policy
        else:
            policies[tenant.name] = policy
    return policies, off


def _load(config: SemanticConfig, folder: str,
          alive: Callable[[], Callable[[bytes], bool]]) -> tuple[Any, Any, Any, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")   # the model ships in a package: never download
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")   # no progress bars in service logs
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from edgecache.semantic_policy import SemanticPolicy
    from edgecache.stores.embed import Embedder, MicroBatcher
    from edgecache.stores.vectors import VectorIndex

    try:
        policy = SemanticPolicy.load(config.policy_path or None, max_false_hit_rate=config.max_false_hit_rate)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PolicyUnavailable(f"the policy ({config.policy_path or 'shipped'}, max_false_hit_rate "
                                f"{config.max_false_hit_rate:g}): {exc}") from exc
    try:   # exactly the policy's backend: Embedder never falls back when one is named
        embedder = Embedder(backend=policy.embedder, cache_dir=config.model_cache_dir or None)
    except ImportError as exc:
        raise EmbedderUnavailable(f"the policy was calibrated on the {policy.embedder} embedder, which needs "
                                  f"{exc.name or exc} (not installed: pip install 'edgecache[semantic]')") from exc
    except Exception as exc:
        raise EmbedderUnavailable(f"the policy was calibrated on the {policy.embedder} embedder, which cannot run "
                                  f"here: {type(exc).__name__}: {exc}") from exc
    if embedder.backend != policy.embedder:
        raise EmbedderUnavailable(f"the policy was calibrated on the {policy.embedder} embedder, "
                                  f"but {embedder.backend} loaded")
    index = VectorIndex(folder)
    dropped = index.reconcile(alive())   # vectors of entries the tiers no longer hold
    if dropped:
        log.info("semantic index: dropped %d vectors whose entries are gone", dropped)
    return policy, embedder, index, MicroBatcher
