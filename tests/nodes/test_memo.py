from nodes.memo import Memo


def test_memo_forgets_the_oldest_beyond_capacity() -> None:
    memo = Memo(2)
    memo.put("a", 1)
    memo.put("b", 2)
    memo.put("c", 3)
    assert (memo.get("a"), memo.get("b"), memo.get("c"), len(memo)) == (None, 2, 3, 2)


def test_memo_skips_keys_with_large_bytes() -> None:
    memo = Memo(8, max_item_bytes=4)
    memo.put(("chat", b"12345"), 1)
    memo.put(("chat", b"1234"), 2)
    assert memo.get(("chat", b"12345")) is None and memo.get(("chat", b"1234")) == 2
