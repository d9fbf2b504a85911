"""Calibration turns a target false-hit rate into a threshold whose rate holds on new pairs."""

from __future__ import annotations

import json
import math
import random

import pytest

from edgecache.calibration import Calibration, calibrate, clopper_pearson_upper, wilson_upper


def binomial_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


@pytest.mark.parametrize(("k", "n"), [(0, 10), (1, 10), (3, 30), (5, 100), (50, 100), (99, 100)])
def test_clopper_pearson_bound_is_where_k_or_fewer_events_become_5_percent_likely(k: int, n: int) -> None:
    u = clopper_pearson_upper(k, n, 0.95)
    assert binomial_cdf(k, n, u) == pytest.approx(0.05, abs=1e-6)
    assert u > k / n


def test_bounds_shrink_with_more_trials_and_grow_with_confidence() -> None:
    assert clopper_pearson_upper(10, 1000) < clopper_pearson_upper(1, 100)
    assert clopper_pearson_upper(10, 1000, 0.99) > clopper_pearson_upper(10, 1000, 0.95)
    assert clopper_pearson_upper(100, 100) == 1.0
    # Wilson is close to the exact bound away from 0 and never below the observed rate
    assert wilson_upper(200, 2000) == pytest.approx(clopper_pearson_upper(200, 2000), rel=0.02)
    assert wilson_upper(0, 50) > 0.0


def synthetic(rng: random.Random, n_neg: int, n_pos: int) -> tuple[list[float], list[int]]:
    """Non-duplicates score uniformly on [0, 1] (so a threshold t has a true false-hit rate of
    1 - t); duplicates score high."""
    scores = [rng.random() for _ in range(n_neg)] + [rng.random() ** 0.1 for _ in range(n_pos)]
    return scores, [0] * n_neg + [1] * n_pos


def test_chosen_threshold_keeps_the_true_false_hit_rate_within_target_in_95_percent_of_samples() -> None:
    rng = random.Random(7)
    target, runs, over, naive_over = 0.05, 200, 0, 0
    for _ in range(runs):
        scores, labels = synthetic(rng, 400, 100)
        cal = calibrate(scores, labels, confidence=0.95, max_rate=0.07)
        over += (1.0 - cal.threshold_for(target)) > target
        negatives = sorted((s for s, y in zip(scores, labels, strict=True) if not y), reverse=True)
        naive_over += (1.0 - negatives[int(target * len(negatives))]) > target    # no margin
    assert over / runs <= 0.08           # 5 % expected; binomial noise over 200 runs
    assert naive_over / runs >= 0.3      # the empirical threshold alone misses about half the time


def test_threshold_rises_as_the_target_falls_and_unsupported_targets_raise() -> None:
    scores, labels = synthetic(random.Random(1), 3000, 1000)
    cal = calibrate(scores, labels)
    targets = [0.002, 0.005, 0.01, 0.02, 0.05, 0.1]
    thresholds = [cal.threshold_for(t) for t in targets]
    assert thresholds == sorted(thresholds, reverse=True)
    assert len(set(thresholds)) == len(thresholds)
    rows = [cal.row_for(t) for t in targets]
    assert all(r.upper_bound <= t for r, t in zip(rows, targets, strict=True))
    assert [r.hit_rate for r in rows] == sorted(r.hit_rate for r in rows)
    assert cal.min_rate == pytest.approx(1 - 0.05 ** (1 / 3000))
    with pytest.raises(ValueError, match="below what this calibration supports"):
        cal.threshold_for(cal.min_rate / 2)


def test_row_counts_the_false_hits_strictly_above_its_threshold() -> None:
    scores, labels = synthetic(random.Random(2), 2000, 500)
    cal = calibrate(scores, labels)
    for row in cal.rows[::37]:
        assert row.false_hits == sum(1 for s, y in zip(scores, labels, strict=True) if not y and s > row.threshold)
        assert row.hit_rate == pytest.approx(sum(1 for s, y in zip(scores, labels, strict=True)
                                                 if y and s > row.threshold) / 500)


def test_refused_pairs_never_hit_but_count_among_the_non_duplicates() -> None:
    scores = [float("-inf")] * 900 + [0.1 * i for i in range(10)] + [2.0] * 10
    labels = [0] * 910 + [1] * 10
    cal = calibrate(scores, labels)
    assert cal.negatives == 910
    assert cal.rows[-1].false_hits <= 9
    assert cal.row_for(0.02).hit_rate == 1.0


def test_table_survives_a_json_round_trip_and_thins_to_max_rows() -> None:
    scores, labels = synthetic(random.Random(3), 5000, 1000)
    cal = calibrate(scores, labels, max_rows=60, method="wilson")
    assert len(cal.rows) == 60
    again = Calibration.from_dict(cal.to_dict())
    assert again.method == "wilson" and again.negatives == 5000
    for t in (0.005, 0.01, 0.05):
        assert again.threshold_for(t) == pytest.approx(cal.threshold_for(t), abs=1e-6)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="non-duplicate"):
        calibrate([0.9, 0.8], [1, 1])
    with pytest.raises(ValueError, match="method"):
        calibrate([0.1], [0], method="bonferroni")
    with pytest.raises(ValueError, match="strict to loose"):
        Calibration.from_dict({"negatives": 10, "positives": 1, "confidence": 0.95,
                               "rows": [[0.5, 1, 0.3, 0.1], [0.9, 0, 0.2, 0.0]]})


# The calibration tool (edgecache calibrate) on labeled pairs that carry their cosines.

TOPICS = ["reset my password", "cancel my order", "change my email", "delete my account", "update my card",
          "export my data", "invite a teammate", "rename a project", "enable two factor login", "close a ticket"]


def write_pairs(path, n: int = 400, seed: int = 5) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        t = rng.choice(TOPICS)
        if i % 3 == 0:
            rows.append({"a": f"How do I {t}?", "b": f"How can I {t}?", "label": 1,
                         "cosine": rng.uniform(0.9, 0.99)})
        else:
            other = rng.choice([x for x in TOPICS if x != t])
            rows.append({"text_a": f"How do I {t}?", "text_b": f"How do I {other}?", "label": 0,
                         "cosine": rng.uniform(0.6, 0.97)})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return rows


@pytest.fixture
def text_only_policy(tmp_path):
    from edgecache.semantic_policy import DEFAULT_PATH

    doc = json.loads(DEFAULT_PATH.read_text())
    doc["verifiers"] = {"text": doc["verifiers"]["text"]}
    path = tmp_path / "base.json"
    path.write_text(json.dumps(doc))
    return path


def test_calibrate_tool_writes_a_policy_calibrated_on_the_given_pairs(tmp_path, text_only_policy, capsys) -> None:
    from edgecache.calibrate import main
    from edgecache.semantic_policy import SemanticPolicy

    rows = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "mine.json"
    assert main([str(tmp_path / "pairs.jsonl"), "--policy", str(text_only_policy), "--out", str(out),
                 "--targets", "0.02,0.05"]) == 0
    doc = json.loads(out.read_text())
    table = doc["verifiers"]["text"]["calibration"]
    assert table["negatives"] == sum(1 for r in rows if r["label"] == 0)
    assert table["positives"] == sum(1 for r in rows if r["label"] == 1)
    policy = SemanticPolicy.load(out, max_false_hit_rate=0.05)
    assert not policy.has_vector_verifier
    assert "target" in capsys.readouterr().out


def test_calibrate_tool_check_mode_reports_without_writing(tmp_path, text_only_policy, capsys) -> None:
    from edgecache.calibrate import main

    write_pairs(tmp_path / "pairs.jsonl")
    status = main([str(tmp_path / "pairs.jsonl"), "--policy", str(text_only_policy), "--check",
                   "--targets", "0.05"])
    assert status in (0, 1)
    assert "text" in capsys.readouterr().out
    assert list(tmp_path.glob("*.json")) == [text_only_policy]


def test_calibrate_tool_names_the_bad_line(tmp_path, text_only_policy, capsys) -> None:
    from edgecache.calibrate import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": "x", "b": "y", "label": 1, "cosine": 0.9}\n{"a": "x", "label": 3}\n')
    assert main([str(bad), "--policy", str(text_only_policy), "--out", str(tmp_path / "o.json")]) == 2
    assert "line 2" in capsys.readouterr().err


@pytest.mark.parametrize(("base", "flag", "written"), [
    ("onnx-int8", [], "onnx-int8"), (None, [], "onnx"), ("onnx-int8", ["--embedder", "torch"], "torch")])
def test_calibrate_tool_records_the_embedder_it_calibrated_on(tmp_path, text_only_policy, base, flag,
                                                               written) -> None:
    from edgecache.calibrate import main
    from edgecache.semantic_policy import SemanticPolicy

    doc = json.loads(text_only_policy.read_text())
    doc.pop("embedder", None)
    if base is not None:
        doc["embedder"] = base
    text_only_policy.write_text(json.dumps(doc))
    write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "mine.json"
    assert main([str(tmp_path / "pairs.jsonl"), "--policy", str(text_only_policy), "--out", str(out),
                 "--targets", "0.05", *flag]) == 0
    assert json.loads(out.read_text())["embedder"] == written
    assert SemanticPolicy.load(out, max_false_hit_rate=0.05).embedder == written
