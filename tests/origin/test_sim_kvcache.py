"""The simulated server's prefix KV cache follows vLLM's automatic prefix caching rules."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from origin.sim.kvcache import BlockPool, PrefixCache, block_hashes, hash_block

BS = 4


def toks(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


# -- hashes -------------------------------------------------------------------------------

def test_only_full_blocks_get_a_hash():
    assert len(block_hashes(toks(0, 11), BS)) == 2
    assert len(block_hashes(toks(0, 12), BS)) == 3
    assert block_hashes(toks(0, 3), BS) == []


def test_block_hash_chains_from_its_parent():
    a = block_hashes(toks(0, 12), BS)
    assert a[0] == hash_block(0, toks(0, 4))
    assert a[1] == hash_block(a[0], toks(4, 4))
    assert a[2] == hash_block(a[1], toks(8, 4))


def test_equal_blocks_after_different_prefixes_hash_differently():
    a = block_hashes([1, 1, 1, 1, 7, 7, 7, 7], BS)
    b = block_hashes([2, 2, 2, 2, 7, 7, 7, 7], BS)
    assert a[0] != b[0]
    assert a[1] != b[1]


def test_shared_prefix_shares_leading_hashes_only():
    a = block_hashes([*toks(0, 8), 100, 101, 102, 103], BS)
    b = block_hashes([*toks(0, 8), 200, 201, 202, 203], BS)
    assert a[:2] == b[:2]
    assert a[2] != b[2]


def test_continuing_a_chain_matches_hashing_the_whole_sequence():
    whole = block_hashes(toks(0, 16), BS)
    tail = block_hashes(toks(0, 16), BS, parent=whole[1], start=8)
    assert whole[2:] == tail


# -- prefix hits ---------------------------------------------------------------------------

def test_repeated_prompt_hits_its_full_blocks():
    kv = PrefixCache(16, BS)
    assert kv.allocate(1, toks(0, 10), 2) == 0
    kv.free(1)
    assert kv.allocate(2, toks(0, 10), 2) == 8


def test_whole_prompt_match_recomputes_the_last_block():
    kv = PrefixCache(16, BS)
    kv.allocate(1, toks(0, 8), 1)
    kv.free(1)
    # both blocks are cached, but the last token is never served from cache
    assert kv.cached_tokens(toks(0, 8)) == 4
    assert kv.allocate(2, toks(0, 8), 1) == 4
    assert kv.cached_tokens(toks(0, 9)) == 8


def test_prompt_shorter_than_a_block_never_hits():
    kv = PrefixCache(16, BS)
    kv.allocate(1, toks(0, 3), 1)
    kv.free(1)
    assert kv.allocate(2, toks(0, 3), 1) == 0


def test_hit_stops_at_the_first_differing_block():
    kv = PrefixCache(16, BS)
    kv.allocate(1, toks(0, 13), 1)
    kv.free(1)
    prompt = [*toks(0, 4), 99, *toks(5, 8)]
    assert kv.allocate(2, prompt, 1) == 4


def test_concurrent_sequences_share_cached_blocks():
    kv = PrefixCache(16, BS)
    kv.allocate(1, toks(0, 9), 1)  # 3 blocks, 2 full and cached
    assert kv.allocate(2, toks(0, 9), 1) == 8
    assert kv.pool.num_used == 4  # 2 shared + 1 partial each
    kv.free(1)
    assert kv.pool.num_used == 3  # shared blocks still pinned by sequence 2
    kv.free(2)
    assert kv.pool.num_used == 0


def test_generated_tokens_fill_and_cache_blocks():
    kv = PrefixCache(16, BS)
    prompt = toks(0, 6)
    kv.allocate(1, prompt, 6)
    assert kv.pool.num_used == 2
    for t in range(100, 106):
        kv.append(1, t)
    assert kv.pool.num_used == 3
    kv.free(1)
    # a next turn that quotes the answer hits the blocks the answer filled
    assert kv.cached_tokens(prompt + list(range(100, 106)) + [7, 7]) == 12


def test_usage_counts_pinned_blocks_only():
    kv = PrefixCache(10, BS)
    kv.allocate(1, toks(0, 8), 4)
    assert kv.usage == pytest.approx(0.2)
    kv.free(1)
    assert kv.usage == 0.0
    assert kv.pool.num_cached == 2


# -- capacity, eviction and pinning --------------------------------------------------------

def test_least_recently_freed_blocks_are_evicted_first():
    kv = PrefixCache(4, BS)
    kv.allocate(1, toks(0, 9), 0)  # 3 blocks, 2 cached
    kv.free(1)
    kv.allocate(2, toks(100, 5), 0)  # 2 blocks, 1 cached
    kv.free(2)
    kv.allocate(3, toks(200, 5), 0)  # takes the 2 least recently freed blocks
    kv.free(3)
    assert kv.cached_tokens([*toks(100, 5), 0]) == 4
    assert kv.cached_tokens(toks(0, 9)) == 0


def test_a_sequence_tail_is_evicted_before_its_head():
    kv = PrefixCache(4, BS)
    kv.allocate(1, toks(0, 13), 0)  # 4 blocks, 3 cached
    kv.free(1)
    kv.allocate(2, toks(500, 2), 0)  # one new block: evicts the partial tail block
    kv.free(2)
    assert kv.cached_tokens(toks(0, 13)) == 12
    kv.allocate(3, toks(600, 2), 0)  # the next eviction takes the last full block
    assert kv.cached_tokens(toks(0, 13)) == 8


def test_reuse_refreshes_a_cached_block():
    kv = PrefixCache(4, BS)
    kv.allocate(1, toks(0, 5), 0)
    kv.free(1)
    kv.allocate(2, toks(100, 5), 0)
    kv.free(2)
    kv.allocate(3, toks(0, 5), 0)  # reuses sequence 1's block: now most recently freed
    kv.free(3)
    kv.allocate(4, toks(200, 8), 0)  # evicts two blocks: the oldest is sequence 2's
    kv.free(4)
    assert kv.cached_tokens(toks(0, 5)) == 4
    assert kv.cached_tokens(toks(100, 5)) == 0


def test_pinned_blocks_are_never_evicted():
    kv = PrefixCache(4, BS)
    kv.allocate(1, toks(0, 12), 0)  # pins 3 blocks
    assert kv.allocate(2, toks(100, 8), 0) is None  # needs 2, only 1 free
    assert kv.cached_tokens([*toks(0, 12), 1]) == 12
    assert kv.allocate(3, toks(100, 4), 0) == 0  # 1 fits
    assert kv.pool.num_free == 0


def test_refused_allocation_changes_nothing():
    kv = PrefixCache(4, BS)
    kv.allocate(1, toks(0, 9), 0)
    kv.free(1)
    kv.allocate(2, toks(100, 4), 0)
    before = (kv.pool.num_free, kv.pool.num_cached, kv.num_reserved)
    assert kv.allocate(3, toks(0, 9) + toks(300, 8), 0) is None
    assert (kv.pool.num_free, kv.pool.num_cached, kv.num_reserved) == before
    assert 3 not in kv


def test_hit_blocks_in_the_free_list_count_against_room():
    kv = PrefixCache(3, BS)
    kv.allocate(1, toks(0, 9), 0)  # 3 blocks, 2 cached
    kv.free(1)
    # reusing 2 cached blocks + 1 new block fits exactly
    assert kv.allocate(2, toks(0, 9), 0) == 8
    assert kv.pool.num_free == 0


def test_reservation_for_completion_tokens_holds_room():
    kv = PrefixCache(4, BS)
    assert kv.allocate(1, toks(0, 4), 8) == 0  # 1 block now, 2 reserved
    assert kv.pool.num_used == 1
    assert kv.num_reserved == 2
    assert kv.allocate(2, toks(100, 8), 0) is None  # 3 free, but 2 are promised
    assert kv.allocate(3, toks(100, 4), 0) == 0
    for t in range(8):
        kv.append(1, 1000 + t)
    assert kv.num_reserved == 0
    assert kv.pool.num_free == 0
    kv.free(1)
    kv.free(3)
    assert kv.pool.num_free == 4


def test_freeing_before_using_the_reservation_returns_it():
    kv = PrefixCache(4, BS)
    kv.allocate(1, toks(0, 4), 12)
    kv.free(1)
    assert kv.num_reserved == 0
    assert kv.allocate(2, toks(100, 16), 0) == 0


def test_fits_ever_compares_the_whole_budget_with_capacity():
    kv = PrefixCache(4, BS)
    assert kv.fits_ever(10, 6)
    assert not kv.fits_ever(10, 7)


def test_reset_forgets_cached_blocks_but_not_while_pinned():
    kv = PrefixCache(4, BS)
    kv.allocate(1, toks(0, 9), 0)
    assert not kv.pool.reset()
    kv.free(1)
    assert kv.pool.reset()
    assert kv.cached_tokens(toks(0, 9)) == 0


def test_misuse_raises():
    kv = PrefixCache(4, BS)
    kv.allocate(1, toks(0, 4), 0)
    with pytest.raises(ValueError):
        kv.allocate(1, toks(0, 4), 0)
    with pytest.raises(ValueError):
        kv.pool.take(5)
    pool = BlockPool(2)
    with pytest.raises(ValueError):
        pool.free([pool.blocks[0]])
    with pytest.raises(ValueError):
        BlockPool(0)
    with pytest.raises(ValueError):
        PrefixCache(4, 0)


# -- invariants under random use -----------------------------------------------------------

class PrefixCacheMachine(RuleBasedStateMachine):
    """Random admissions, tokens and frees keep the pool's books balanced."""

    @initialize(capacity=st.integers(1, 12))
    def setup(self, capacity: int) -> None:
        self.kv = PrefixCache(capacity, BS)
        self.budget: dict[int, int] = {}
        self.next_id = 0

    @rule(prefix=st.integers(0, 3), extra=st.integers(1, 14), max_new=st.integers(0, 8))
    def admit(self, prefix: int, extra: int, max_new: int) -> None:
        # prompts share prefixes: a few fixed stems plus a tail
        prompt = [prefix] * 8 + list(range(extra))
        self.next_id += 1
        cached = self.kv.allocate(self.next_id, prompt, max_new)
        if cached is not None:
            assert cached % BS == 0
            assert cached <= len(prompt) - 1
            self.budget[self.next_id] = max_new

    @precondition(lambda self: any(self.budget.values()))
    @rule(data=st.data())
    def generate(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(sorted(k for k, v in self.budget.items() if v)))
        self.kv.append(seq, data.draw(st.integers(0, 3)))
        self.budget[seq] -= 1

    @precondition(lambda self: self.budget)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(sorted(self.budget)))
        self.kv.free(seq)
        del self.budget[seq]

    @invariant()
    def books_balance(self) -> None:
        pool = self.kv.pool
        pinned = [b for b in pool.blocks if b.ref_cnt > 0]
        assert pool.num_used == len(pinned)
        assert pool.num_free + pool.num_used == pool.capacity
        assert 0 <= self.kv.num_reserved <= pool.num_free
        for block in pool.blocks:
            if block.block_hash is not None:
                assert pool.get(block.block_hash) is not None
        if not self.budget:
            assert pool.num_used == 0
            assert self.kv.num_reserved == 0


TestPrefixCacheMachine = PrefixCacheMachine.TestCase
TestPrefixCacheMachine.settings = settings(max_examples=150, stateful_step_count=40,
                                           deadline=None)
