"""A judged run directory becomes the evaluation's RolloutBank, field by field."""

import numpy as np
import pytest

from lpe_jax.runs.bank import bank_from_store
from lpe_jax.runs.store import RolloutStore

ALPHAS = [0.0, 0.5, 1.0]


def _store(tmp_path, n=120, judged=True):
    store = RolloutStore.open(tmp_path / "run", {"alphas": ALPHAS, "seed": 0})
    rng = np.random.default_rng(0)
    for pid in ("a", "b"):
        for alpha in ALPHAS:
            lengths = rng.integers(1, 9, n).astype(np.int32)
            store.write_chunk(
                pid,
                alpha,
                {
                    "tokens": np.zeros((n, 8), np.int32),
                    "lengths": lengths,
                    "logp_original": rng.normal(-10, 1, n).astype(np.float32),
                    "logp_variant": rng.normal(-5, 1, n).astype(np.float32),
                    "truncated": np.zeros(n, bool),
                    "nonfinite": np.arange(n) == 3,
                },
            )
            if judged:
                v = (rng.random(n) < 0.5 * (1 - alpha)).astype(np.int8)
                v[3] = -1
                store.set_verdicts(pid, alpha, v, "rule")
    return store


def test_fields_map_from_chunks(tmp_path):
    store = _store(tmp_path)
    bank = bank_from_store(store, truth_counts={"a": (3, 100_000), "b": (0, 100_000)})
    assert bank.prompt_ids == ("a", "b")
    np.testing.assert_array_equal(bank.alphas, [0.0, 0.5])
    assert bank.compliance.shape == (2, 2, 120)
    zero = store.read_chunk("a", 0.0)
    np.testing.assert_allclose(
        bank.is_log_weights[0, :3], (zero["logp_original"] - zero["logp_variant"])[:3]
    )
    assert bank.is_compliance[0, 3] == -1 and bank.is_log_weights[0, 3] == 0.0  # non-finite row
    top = store.read_chunk("b", 1.0)
    assert bank.screen_k[1] == int((top["verdicts"][:100] == 1).sum())
    np.testing.assert_array_equal(bank.truth_k, [3, 0])
    assert bank.truth_mean_tokens[1] == pytest.approx(top["lengths"].mean())


def test_truth_from_exact_rates_is_a_seeded_binomial(tmp_path):
    store = _store(tmp_path)
    a = bank_from_store(store, truth_rates={"a": 1e-4, "b": 0.0}, seed=1)
    b = bank_from_store(store, truth_rates={"a": 1e-4, "b": 0.0}, seed=1)
    np.testing.assert_array_equal(a.truth_k, b.truth_k)
    assert a.truth_k[1] == 0 and a.true_r1[0] == 1e-4


def test_bad_runs_are_named(tmp_path):
    with pytest.raises(ValueError, match="judge.py"):
        bank_from_store(_store(tmp_path / "x", judged=False))
    store = _store(tmp_path / "y")
    with pytest.raises(ValueError, match="no ground-truth counts for prompt 'b'"):
        bank_from_store(store, truth_counts={"a": (1, 10)})
    with pytest.raises(ValueError, match="not both"):
        bank_from_store(store, truth_counts={}, truth_rates={})
    with pytest.raises(ValueError, match="screen needs 100"):
        bank_from_store(_store(tmp_path / "z", n=50))
    other = RolloutStore.open(tmp_path / "w", {"alphas": [0.5, 1.0]})
    with pytest.raises(ValueError, match="must include 0"):
        bank_from_store(other)


def test_truth_file_is_counts_or_rates_never_a_mix(tmp_path):
    from lpe_jax.runs.bank import read_truth_file

    f = tmp_path / "t.json"
    f.write_text('{"a": [3, 100000], "b": [0, 100000]}')
    assert read_truth_file(f) == (None, {"a": (3, 100000), "b": (0, 100000)})
    f.write_text('{"a": 1e-5, "b": 0}')
    assert read_truth_file(f) == ({"a": 1e-5, "b": 0.0}, None)
    for bad in ('{"a": 1e-5, "b": [0, 10]}', '{"a": "x"}', "{}", "[1, 2]"):
        f.write_text(bad)
        with pytest.raises(ValueError, match="t.json"):
            read_truth_file(f)


def test_toy_truth_only_for_the_toy_original(tmp_path):
    from lpe_jax.organisms import toy

    truth = toy.toy_truth_for(toy.TOY_DIR / "original")
    assert len(truth) == len(toy.toy_prompts()) and all(0 < r < 1e-2 for r in truth.values())
    assert toy.toy_truth_for(tmp_path) is None


def test_bank_from_curves_draws_verdicts_at_the_exact_rates():
    from lpe_jax.runs.bank import bank_from_curves

    alphas = np.array([0.0, 0.5])
    curves = np.array([[0.9, 0.2], [0.5, 0.0]])
    b = bank_from_curves(["a", "b"], alphas, curves, np.array([1e-3, 0.0]), rollouts=4000)
    assert b.compliance.shape == (2, 2, 4000) and b.is_log_weights is None
    np.testing.assert_allclose(b.compliance.mean(-1), curves, atol=0.03)
    assert b.truth_k[1] == 0 and b.screen_k[1] == 0 and np.all(b.truth_n == 100_000)
    again = bank_from_curves(["a", "b"], alphas, curves, np.array([1e-3, 0.0]), rollouts=4000)
    np.testing.assert_array_equal(b.compliance, again.compliance)
    with pytest.raises(ValueError, match="curves must be"):
        bank_from_curves(["a"], alphas, curves, np.array([1e-3, 0.0]))
