"""The fine-tuning experiment's measure: hit rate at the loosest threshold within a false-hit bound."""

from __future__ import annotations

import pytest

pytest.importorskip("numpy")

from bench.semantic_finetune import hit_rates


def test_hit_rates_take_the_loosest_threshold_within_the_bound() -> None:
    # ten non-duplicates: at 10 % one false hit is allowed (the 0.95), at 5 % none
    neg = [0.95, 0.90, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    pos = [0.99, 0.96, 0.92, 0.6, 0.2]
    cos, labels = neg + pos, [0] * 10 + [1] * 5
    out = hit_rates(cos, labels, bounds=(0.05, 0.1, 0.2))
    assert out["0.05"]["false_hit_rate"] == 0 and out["0.05"]["hit_rate"] == pytest.approx(2 / 5)
    assert out["0.1"]["false_hit_rate"] == pytest.approx(0.1) and out["0.1"]["hit_rate"] == pytest.approx(3 / 5)
    assert out["0.2"]["false_hit_rate"] == pytest.approx(0.2) and out["0.2"]["hit_rate"] == pytest.approx(4 / 5)
    assert out["0.1"]["threshold"] > 0.90


def test_hit_rates_with_every_non_duplicate_allowed() -> None:
    out = hit_rates([0.1, 0.2, 0.3], [0, 1, 1], bounds=(1.0,))
    assert out["1"]["hit_rate"] == 1.0 and out["1"]["false_hit_rate"] == 1.0
