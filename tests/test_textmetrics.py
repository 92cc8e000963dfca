"""ROUGE, BLEU, loop detection and the paired bootstrap on hand-made inputs."""

from __future__ import annotations

import numpy as np
import pytest

from medqa.metrics import paired_bootstrap
from medqa.textmetrics import bleu, generation_scores, is_repetitive, rouge

REF = "Drink plenty of fluids and take paracetamol for the fever, and see a doctor if it lasts."


def test_identical_and_disjoint_text():
    assert rouge([REF], [REF]) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert bleu([REF], [REF]) == pytest.approx(100.0)
    other = "Quantum chromodynamics describes gluons binding quarks inside hadrons"
    assert rouge([other], [REF]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    assert bleu([other], [REF]) == pytest.approx(0.0)


def test_partial_overlap_is_between():
    pred = "Drink plenty of fluids and rest."
    r = rouge([pred], [REF])
    assert 0 < r["rouge2"] < r["rouge1"] < 1
    # ROUGE-1 F by hand: 5 shared unigrams (drink plenti of fluid and); 6 predicted, 17 reference words.
    p, rec = 5 / 6, 5 / 17
    assert r["rouge1"] == pytest.approx(2 * p * rec / (p + rec), abs=1e-6)


def test_loops_and_empty():
    assert is_repetitive("I I I I I I I I I I I I I I I I")
    assert not is_repetitive(REF)
    s = generation_scores(["", "I I I I I I I I I I I I I I", REF], [REF, REF, REF])
    assert s["empty_share"] == pytest.approx(1 / 3) and s["repetitive_share"] == pytest.approx(1 / 3)


def test_paired_bootstrap():
    rng = np.random.default_rng(0)
    tokens = rng.integers(20, 60, size=50)
    base = tokens * rng.uniform(3.0, 4.0, size=50)
    better = base - tokens * 0.5
    r = paired_bootstrap(base, better, tokens, 500, seed=0)
    assert r["loss_delta"] == pytest.approx(-0.5) and r["p_value"] == pytest.approx(1 / 501)
    same = paired_bootstrap(base, base, tokens, 500, seed=0)
    assert same["loss_delta"] == 0 and same["p_value"] == 1.0
    noisy = paired_bootstrap(base, base + tokens * rng.normal(0, 0.3, size=50), tokens, 500, seed=0)
    assert 0.01 < noisy["p_value"] < 0.99
