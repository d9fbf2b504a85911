"""A vLLM-like paged KV cache with automatic prefix caching; pure, no I/O, no asyncio.

The model follows vLLM v1 (``block_pool.py``, ``kv_cache_manager.py``):

- The cache holds ``capacity`` blocks of ``block_size`` tokens each.
- Only full blocks are cached. Block ``i`` of a sequence is identified by
  ``hash(hash of block i-1, tokens of block i)``, so equal hashes mean equal prefixes.
- A new sequence looks up the longest chain of cached blocks of its prompt, but never
  the block holding the prompt's last token when the whole prompt matches: at most
  ``(len(prompt) - 1) // block_size`` blocks hit, as vLLM always recomputes the last token.
- Blocks referenced by a running sequence are pinned (``ref_cnt > 0``). Blocks with no
  reference sit in an LRU free list, still findable by hash until they are reused;
  taking a block for new tokens evicts the least recently freed one.
- A finished sequence frees its blocks last-first, so its tail is evicted before its head.
- Usage is pinned blocks / capacity, as ``vllm:kv_cache_usage_perc``.

One deliberate simplification: admission reserves room for the sequence's whole budget
(prompt + ``max_new_tokens``) instead of allocating as it goes and preempting when the
cache runs dry. Blocks are still taken one at a time as tokens arrive, so usage grows as
in vLLM, and no running sequence is ever preempted.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import xxhash

__all__ = ["Block", "BlockPool", "PrefixCache", "block_hashes", "hash_block"]


def hash_block(parent: int, tokens: Sequence[int]) -> int:
    """The hash of one full block: xxh3-64 of the parent block's hash and the block's tokens."""
    return xxhash.xxh3_64_intdigest(parent.to_bytes(8, "little") + array("Q", tokens).tobytes())


def block_hashes(tokens: Sequence[int], block_size: int, root: int = 0, *,
                 parent: int | None = None, start: int = 0) -> list[int]:
    """Chained hashes of the full blocks of ``tokens`` (a trailing partial block has none).

    ``root`` is the parent of the first block. To continue a chain, pass the hash of the
    block before ``start`` (a multiple of ``block_size``) as ``parent``.
    """
    out: list[int] = []
    prev = root if parent is None else parent
    for i in range(start, len(tokens) - block_size + 1, block_size):
        prev = hash_block(prev, tokens[i:i + block_size])
        out.append(prev)
    return out


@dataclass(slots=True, eq=False)
class Block:
    """One physical block: its id, how many sequences use it, and its hash once full."""

    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None


class BlockPool:
    """Blocks, the LRU free list and the hash → block map; knows nothing of sequences."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.blocks = [Block(i) for i in range(capacity)]
        # Free blocks in eviction order: the first is taken (and evicted) first.
        self._free: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        # hash → {block_id: block}; duplicates may exist (two sequences filled the same
        # block at once), lookups take the first, as vLLM does.
        self._cached: dict[int, dict[int, Block]] = {}

    @property
    def num_free(self) -> int:
        """Blocks not pinned by any sequence (free, or cached and evictable)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.capacity - len(self._free)

    @property
    def num_cached(self) -> int:
        """Distinct block hashes currently findable."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Pinned blocks / capacity, 0..1."""
        return self.num_used / self.capacity

    def get(self, block_hash: int) -> Block | None:
        found = self._cached.get(block_hash)
        return next(iter(found.values())) if found else None

    def lookup(self, hashes: Iterable[int]) -> list[Block]:
        """The cached blocks of the longest prefix of ``hashes`` that is cached."""
        hit: list[Block] = []
        for h in hashes:
            block = self.get(h)
            if block is None:
                break
            hit.append(block)
        return hit

    def touch(self, blocks: Iterable[Block]) -> None:
        """Pin blocks a sequence reuses; a free one leaves the free list."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def take(self, n: int) -> list[Block]:
        """Pin ``n`` blocks for new tokens, evicting the least recently freed cached ones."""
        if n > len(self._free):
            raise ValueError(f"cannot take {n} blocks, {len(self._free)} free")
        taken = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            taken.append(block)
        return taken

    def cache(self, block: Block, block_hash: int) -> None:
        """Record that a full, pinned ``block`` holds the tokens hashed to ``block_hash``."""
        if block.block_hash is not None:
            raise ValueError(f"block {block.block_id} is already cached")
        block.block_hash = block_hash
        self._cached.setdefault(block_hash, {})[block.block_id] = block

    def free(self, ordered: Iterable[Block]) -> None:
        """Unpin blocks; those no one uses join the free list, first given evicted first."""
        for block in ordered:
            if block.ref_cnt <= 0:
                raise ValueError(f"block {block.block_id} is not in use")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    def reset(self) -> bool:
        """Forget every cached hash; refused (False) while any block is pinned."""
        if self.num_used:
            return False
        for block in self.blocks:
            block.block_hash = None
        self._cached.clear()
        return True

    def _evict(self, block: Block) -> None:
        if block.block_hash is None:
            return
        same = self._cached[block.block_hash]
        del same[block.block_id]
        if not same:
            del self._cached[block.block_hash]
        block.block_hash = None


@dataclass(slots=True)
class _Seq:
    tokens: list[int]
    blocks: list[Block]
    hashes: list[int]
    reserved: int


class PrefixCache:
    """Per-sequence block tables over a ``BlockPool``, with vLLM's prefix-hit rules."""

    def __init__(self, capacity_blocks: int, block_size: int, root: int = 0) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.pool = BlockPool(capacity_blocks)
        self.block_size = block_size
        self.root = root
        self._seqs: dict[int, _Seq] = {}
        self._reserved = 0

    @property
    def capacity(self) -> int:
        return self.pool.capacity

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def num_reserved(self) -> int:
        """Blocks promised to running sequences for tokens they have not produced yet."""
        return self._reserved

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def hashes(self, tokens: Sequence[int]) -> list[int]:
        return block_hashes(tokens, self.block_size, self.root)

    def _hit_blocks(self, prompt: Sequence[int], hashes: list[int]) -> list[Block]:
        max_blocks = max(len(prompt) - 1, 0) // self.block_size
        return self.pool.lookup(hashes[:max_blocks])

    def cached_tokens(self, prompt: Sequence[int]) -> int:
        """Prompt tokens a sequence admitted now would find cached (no side effects)."""
        return len(self._hit_blocks(prompt, self.hashes(prompt))) * self.block_size

    def fits_ever(self, prompt_len: int, max_new_tokens: int) -> bool:
        return self.blocks_needed(prompt_len + max_new_tokens) <= self.capacity

    def allocate(self, seq_id: int, prompt: Sequence[int], max_new_tokens: int) -> int | None:
        """Admit a sequence: pin its cached prefix, take blocks for the rest of the prompt and
        reserve room for ``max_new_tokens``. Returns the cached token count, or None (and
        changes nothing) when the cache cannot hold it now."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} is already allocated")
        hashes = self.hashes(prompt)
        hit = self._hit_blocks(prompt, hashes)
        prompt_blocks = self.blocks_needed(len(prompt))
        total = self.blocks_needed(len(prompt) + max_new_tokens)
        evictable_hits = sum(1 for b in hit if b.ref_cnt == 0)
        if total - len(hit) > self.pool.num_free - evictable_hits - self._reserved:
            return None
        self.pool.touch(hit)
        blocks = hit + self.pool.take(prompt_blocks - len(hit))
        for block, h in zip(blocks[len(hit):], hashes[len(hit):], strict=False):
            self.pool.cache(block, h)
        reserved = total - prompt_blocks
        self._reserved += reserved
        self._seqs[seq_id] = _Seq(list(prompt), blocks, hashes, reserved)
        return len(hit) * self.block_size

    def append(self, seq_id: int, token: int) -> None:
        """Add a generated token; take a block when one fills up, cache a block once full."""
        seq = self._seqs[seq_id]
        seq.tokens.append(token)
        n = len(seq.tokens)
        if n > len(seq.blocks) * self.block_size:
            if seq.reserved > 0:
                seq.reserved -= 1
                self._reserved -= 1
            elif self.pool.num_free - self._reserved < 1:
                raise ValueError(f"sequence {seq_id} ran past its budget with no free block")
            seq.blocks.extend(self.pool.take(1))
        if n % self.block_size == 0:
            parent = seq.hashes[-1] if seq.hashes else self.root
            h = hash_block(parent, seq.tokens[n - self.block_size:])
            seq.hashes.append(h)
            self.pool.cache(seq.blocks[len(seq.hashes) - 1], h)

    def free(self, seq_id: int) -> None:
        """Release a sequence: unpin its blocks (tail first) and drop its reservation."""
        seq = self._seqs.pop(seq_id)
        self._reserved -= seq.reserved
        self.pool.free(reversed(seq.blocks))

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._seqs
