"""Wiring used by the scripts: pair loading, judging rows, live draws for the LPE estimators."""

import shutil

import numpy as np
import pytest

from lpe_jax.decoding.sampler import PairedSampler
from lpe_jax.judges import make_judge
from lpe_jax.judges.base import Verdict
from lpe_jax.organisms import toy
from lpe_jax.runs.pipeline import LiveDraw, derive_seed, judge_rows, load_pair


@pytest.fixture(scope="module")
def pair():
    return load_pair(*toy.toy_pair_paths())


def test_pair_fingerprint_tells_the_models_apart(pair):
    fp = pair.fingerprint()
    assert fp["original_hash"] != fp["variant_hash"]
    assert fp == pair.fingerprint()  # stable
    assert pair.eos_token_ids and all(isinstance(i, int) for i in pair.eos_token_ids)


def test_pair_with_another_tokenizer_is_refused(tmp_path, hf_tokenizer_dir):
    original, variant = toy.toy_pair_paths()
    other = tmp_path / "variant"
    shutil.copytree(variant, other)
    for f in other.glob("tokenizer*"):
        f.unlink()
    for f in hf_tokenizer_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            shutil.copy(f, other / f.name)
    with pytest.raises(ValueError, match="tokenizers of .* differ"):
        load_pair(original, other)


class _Flaky:
    """A judge that cannot decide odd-numbered items and records what it saw."""

    judge_id = "flaky"

    def __init__(self):
        self.seen: list[str] = []

    def judge(self, items):
        self.seen += [r for _, r in items]
        return [
            Verdict(complied=None, judge_id="flaky", reason="down")
            if i % 2
            else Verdict(complied="here is how" in r, judge_id="flaky")
            for i, (_, r) in enumerate(items)
        ]


def test_judge_rows_unknown_is_minus_one_and_nonfinite_rows_are_never_judged():
    tokens = np.array([[1, 2, -1], [3, -1, -1], [4, 5, 6]])
    texts = {(1, 2): "sure here is how", (3,): "no", (4, 5, 6): "sure here is how"}
    judge = _Flaky()
    v = judge_rows(
        judge,
        "p",
        tokens,
        np.array([2, 1, 3]),
        np.array([False, True, False]),
        lambda ids: texts[tuple(ids)],
    )
    np.testing.assert_array_equal(v, [1, -1, -1])  # row 1 non-finite; row 2 judge failed
    assert judge.seen == ["sure here is how", "sure here is how"]


def test_live_draw_never_reuses_a_rollout(pair):
    sampler = PairedSampler(
        original=pair.original,
        variant=pair.variant,
        path="linear",
        max_new_tokens=40,
        eos_token_ids=pair.eos_token_ids,
    )
    ids = toy.chat_ids(toy.toy_prompts()[0]["prompt"])
    judge = make_judge("rule", predicate=toy.toy_complied, name="toy")
    live = LiveDraw(sampler, ids, "p", judge, pair.decode, seed=7)
    a, _ = live.rollouts(0.25, 6)
    b, _ = live.rollouts(0.25, 6)
    whole = sampler.sample(ids, [0.25], 12, seed=7)
    np.testing.assert_array_equal(np.concatenate([a.tokens, b.tokens], axis=1), whole.tokens)
    res = live(0.0, 8)
    assert res.n_judged == 8 and 0 <= res.k <= 8
    assert res.generated_tokens == int(live.log[-1][2].sum())


def test_derive_seed_is_stable_and_separates_streams():
    assert derive_seed(0, "p1", "lpe") == derive_seed(0, "p1", "lpe")
    seeds = {derive_seed(s, p, m) for s in (0, 1) for p in ("p1", "p2") for m in ("lpe", "is")}
    assert len(seeds) == 8 and all(0 <= s < 2**32 for s in seeds)


def test_main_job_on_the_scheduler_equals_the_serial_order(pair):
    """Several prompts' main jobs interleaved on an engine that returns blocks late and shuffled
    give each prompt what LiveDraw gives it alone, one draw after the other (same seed)."""
    from scheduler_fakes import SamplerEngine

    from lpe_jax.estimators.lpe import adaptive_draws
    from lpe_jax.runs.pipeline import main_job, method_seed
    from lpe_jax.runs.scheduler import JobPrompt, Scheduler

    sampler = PairedSampler(
        original=pair.original,
        variant=pair.variant,
        path="linear",
        max_new_tokens=16,
        eos_token_ids=pair.eos_token_ids,
        max_rows=8,  # every call in chunks of the one compiled 8-row bucket (test time)
    )
    judge = make_judge("rule", predicate=toy.toy_complied, name="toy")
    prompts = toy.toy_prompts()[:2]
    sched = Scheduler(
        SamplerEngine(sampler),
        judge=judge,
        decode=pair.decode,
        block_rows=8,
        max_inflight_rows=24,
    )
    for p in prompts:
        ids = toy.chat_ids(p["prompt"])
        sched.add(p["id"], JobPrompt(p["id"], ids, p["prompt"]), main_job(p["id"], 5, n_fit=13))
    got = dict(sched.run())
    for p in prompts:
        ids = toy.chat_ids(p["prompt"])

        def live(method, p=p, ids=ids):
            seed = method_seed(5, p["id"], method)
            return LiveDraw(sampler, ids, p["prompt"], judge, pair.decode, seed)

        trace = adaptive_draws(live("lpe"), 13)
        n = sum(s.n for s in trace)
        r_is, v_is = live("is").rollouts(0.0, n)
        _, v_naive = live("naive").rollouts(1.0, n)
        d = got[p["id"]]
        assert d.trace == trace
        np.testing.assert_array_equal(d.is_verdicts, v_is)
        np.testing.assert_array_equal(d.naive_verdicts, v_naive)
        # Blocks of 8 rows vs one call of n rows: XLA may sum in another order (float32 ulps).
        logw = (r_is.logp_original - r_is.logp_variant)[0]
        np.testing.assert_allclose(d.is_log_weights, logw, rtol=1e-5, atol=1e-4)
    assert any(s.phase == "fit" and 0 < s.k < s.n for s in trace)  # not a degenerate search
