"""RolloutEngine draws exactly the lockstep oracle's rows (tests/sampler_oracle.py, the decoder
PairedSampler used before it became a thin API over the engine), whatever the slots, order or
refills; PairedSampler, now on the engine, draws them too.

The models are tiny with a scaled LM head (logit std ~2), so tokens depend on the prompt and the
alpha: a bug that mixed up prompts, alphas or rows between slots would change tokens.
The path `_forced` is the linear path plus an EOS bias that depends on alpha, so a test can ask
for rows that end at their first token (alpha > 0.9) or never end (alpha < 0.1).
"""

import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sampler_oracle import LockstepSampler
from scipy import stats

from lpe_jax.decoding import paths
from lpe_jax.decoding.engine import BlockResult, RolloutEngine, RowBlock
from lpe_jax.decoding.paths import PathShape
from lpe_jax.decoding.rollouts import PAD_ID
from lpe_jax.decoding.sampler import PairedSampler
from lpe_jax.model import qwen3
from lpe_jax.model.forward import model_logits

jax.config.update("jax_default_matmul_precision", "highest")

CFG = qwen3.Qwen3Config(96, 32, 2, 4, 2, 16, 64, tie_word_embeddings=False)
EOS = (3, 11, 29, 50, 77)
T = 8
EXACT = ("tokens", "lengths", "truncated", "nonfinite")
PROMPTS = {
    "p0": np.array([5, 17, 2, 40, 9], np.int32),
    "p1": np.array([60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70], np.int32),
    "p2": np.array([7], np.int32),
    "p3": np.array([1, 2, 3, 4], np.int32),
    "p4": np.array([90, 80, 70, 60, 50, 40], np.int32),
    "long": (np.arange(20, dtype=np.int32) * 7) % 96,  # a longer bucket (32 positions)
}


def _forced_fn(l_o, l_v, alpha):
    bias = jnp.where(alpha > 0.9, 1e4, jnp.where(alpha < 0.1, -jnp.inf, 0.0))
    return (alpha * l_o + (1.0 - alpha) * l_v).at[:, list(EOS)].add(bias)


FORCED = PathShape("forced_eos", _forced_fn, (0.0, 1.0))


def _model(seed: int) -> qwen3.Qwen3:
    m = qwen3.init_random(CFG, seed=seed)
    m.lm_head[...] = m.lm_head[...] * 20.0
    return m


@pytest.fixture(scope="module")
def models():
    return _model(0), _model(1)


@pytest.fixture(scope="module")
def sampler(models):
    # The oracle. 8-row chunks: one compiled loop per prompt bucket serves every block.
    return LockstepSampler(
        original=models[0],
        variant=models[1],
        path=FORCED,
        max_new_tokens=T,
        eos_token_ids=EOS,
        max_rows=8,
    )


def _engine(models, **kw) -> RolloutEngine:
    kw = {"slots": 8, "max_prompts": 4, "steps_per_call": 4, "max_prompt_len": 20, **kw}
    return RolloutEngine(models[0], models[1], FORCED, T, EOS, **kw)


# Mixed prompts and alphas; p0 has many rows, the others few; 5 prompts > 4 table entries.
BLOCKS = [
    RowBlock("p0", PROMPTS["p0"], 0.5, 3, 0, 40, tag="big"),
    RowBlock("p1", PROMPTS["p1"], 0.2, 3, 5, 3),
    RowBlock("p2", PROMPTS["p2"], 0.8, 3, 0, 1),
    RowBlock("p3", PROMPTS["p3"], 0.5, 9, 2, 2),
    RowBlock("p4", PROMPTS["p4"], 0.2, 3, 0, 3),
    RowBlock("p1", PROMPTS["p1"], 0.8, 3, 0, 2),
    RowBlock("p0", PROMPTS["p0"], 0.2, 3, 7, 5),
    RowBlock("p2", PROMPTS["p2"], 0.95, 3, 0, 5),  # every row ends at its first token
    RowBlock("p3", PROMPTS["p3"], 0.05, 3, 0, 3),  # no row ever ends: all reach T
    RowBlock("long", PROMPTS["long"], 0.5, 3, 0, 4),
]


def _key(b: RowBlock) -> tuple:
    return (b.prompt_key, b.alpha, b.seed, b.rollout_start, b.count)


def _reference(sampler: LockstepSampler | PairedSampler, b: RowBlock):
    return sampler.sample(
        b.prompt_ids, [b.alpha], b.count, b.seed, rollout_offset=b.rollout_start, per_token=True
    )


def _assert_same(ref, got, logp_tol: float = 1e-5) -> None:
    """Tokens bit-identical; log-probs within logp_tol (relative, and absolute below 1): the
    engine's attention sums the same terms in another order (other shapes, gathered prefix)."""
    for f in EXACT:
        np.testing.assert_array_equal(getattr(got, f), getattr(ref, f), err_msg=f)
    for f in ("logp_original", "logp_variant", "logp_sampled"):
        np.testing.assert_allclose(getattr(got, f), getattr(ref, f), rtol=logp_tol, atol=logp_tol)
    assert got.tokens.dtype == ref.tokens.dtype and got.lengths.dtype == ref.lengths.dtype
    assert got.alphas.dtype == ref.alphas.dtype and got.rollout_offset == ref.rollout_offset


@pytest.fixture(scope="module")
def engine_results(models):
    e = _engine(models, per_token=True)
    for b in BLOCKS:
        e.submit(b)
    out = e.run()
    assert e.idle
    return e, {_key(r.block): r for r in out}


def test_engine_reproduces_sampler_rows(engine_results, sampler):
    e, results = engine_results
    assert len(results) == len(BLOCKS)
    for b in BLOCKS:
        r = results[_key(b)]
        assert isinstance(r, BlockResult) and r.block is b
        ref = _reference(sampler, b)
        _assert_same(ref, r.rollouts)
        for f in ("token_logp_original", "token_logp_variant", "token_logp_path"):
            np.testing.assert_allclose(getattr(r.rollouts, f), getattr(ref, f), atol=1e-5)
    assert results[_key(BLOCKS[0])].block.tag == "big"
    # 6 prompts through 4 table entries: some were evicted, and each prefilled when resident.
    assert e.stats.prefills >= 6 and e.stats.evictions >= 2
    assert e.stats.rows == sum(b.count for b in BLOCKS) and e.stats.blocks == len(BLOCKS)


def test_paired_sampler_is_the_engine(models, sampler):
    """PairedSampler, a thin API over the engine, draws the oracle's rows (all alphas of a prompt
    in one call, per-token log-probs included); one model (variant=None) draws the two-model
    rows at alpha = 1, where the linear path is the original's logits."""
    s = PairedSampler(models[0], models[1], FORCED, T, EOS, max_rows=8)
    for ids in (PROMPTS["p1"], PROMPTS["long"]):  # the second needs a longer prompt bucket
        call = dict(alphas=[0.2, 0.5, 0.8], rollouts_per_alpha=5, seed=3, rollout_offset=5)
        got = s.sample(ids, per_token=True, **call)
        ref = sampler.sample(ids, per_token=True, **call)
        assert got.tokens.shape == (3, 5, T)
        _assert_same(ref, got)
        for f in ("token_logp_original", "token_logp_variant", "token_logp_path"):
            np.testing.assert_allclose(getattr(got, f), getattr(ref, f), atol=1e-5)
    assert s.sample(PROMPTS["p1"], [0.5], 2, seed=3).token_logp_path is None
    one = PairedSampler(models[0], None, "linear", T, EOS, max_rows=8)
    two = PairedSampler(models[0], models[0], "linear", T, EOS, max_rows=8)
    r1, r2 = (x.sample(PROMPTS["p0"], [1.0], 6, seed=4) for x in (one, two))
    np.testing.assert_array_equal(r1.tokens, r2.tokens)
    np.testing.assert_array_equal(r1.lengths, r2.lengths)
    assert np.isnan(r1.logp_original).all() and np.isfinite(r2.logp_original).all()
    np.testing.assert_allclose(r1.logp_sampled, r2.logp_sampled, rtol=1e-6)  # its own log p
    assert one._rt.engine._spec.gd_v is None  # one forward pass per token


def test_rows_that_end_at_once_or_never(engine_results):
    _, results = engine_results
    first = results[_key(BLOCKS[7])].rollouts
    assert (first.lengths == 1).all() and np.isin(first.tokens[..., 0], EOS).all()
    assert (first.tokens[..., 1:] == PAD_ID).all() and not first.truncated.any()
    never = results[_key(BLOCKS[8])].rollouts
    assert (never.lengths == T).all() and never.truncated.all()
    assert not np.isin(never.tokens, EOS).any()


def test_slots_stay_full_while_rows_wait(engine_results):
    e, _ = engine_results
    rows = sum(b.count for b in BLOCKS)
    # 64 rows through 8 slots: refill keeps slots busy, only the final drain leaves them idle.
    assert rows > 4 * e.slots
    assert e.stats.slot_use > 0.8, e.stats


def test_independent_of_slot_count_submission_order_and_attention_blocks(models, engine_results):
    # Attention read in blocks of 3 token positions (3 blocks for T = 8, the last clamped), bounded
    # by the longest of 3 rows of different lengths; the fixture's engine reads one block of 8.
    # The oracle's attention reads every position in one softmax.
    _, results = engine_results
    e = _engine(models, slots=3, max_prompts=2, steps_per_call=3, attention_block=3)
    late = BLOCKS[::-1]
    for b in late[:4]:
        e.submit(b)
    out = e.poll() + e.poll()  # some rows are in flight when the rest arrive
    for b in late[4:]:
        e.submit(b)
    out += e.run()
    assert len(out) == len(BLOCKS)
    for r in out:
        _assert_same(results[_key(r.block)].rollouts, r.rollouts)


def test_refill_cap_changes_steps_not_rows(models, engine_results):
    # One refill per step (the fixture's engine refills all 8 slots at once): rows wait for a
    # slot longer, so the engine takes more steps, but every row is the same.
    full, results = engine_results
    e = _engine(models, refills_per_step=1)
    for b in BLOCKS:
        e.submit(b)
    out = e.run()
    assert len(out) == len(BLOCKS) and e.stats.steps > full.stats.steps
    assert e.stats.refills_per_step == 1  # a cap the caller sets stays
    for r in out:
        _assert_same(results[_key(r.block)].rollouts, r.rollouts)
    with pytest.raises(ValueError, match="refills_per_step"):
        _engine(models, refills_per_step=0)


def test_the_refill_cap_follows_row_length(models, engine_results):
    # By default the cap starts at max(8, S/16) = 8 and is reset after every 4 S = 64 ended rows
    # to what their length needs: rows of one token (alpha 0.95) need every slot refilled each
    # step; rows that never end (alpha 0.05, T = 8 tokens) need 1.5 * 16 / 8 = 3, below the 8.
    _, results = engine_results
    e = _engine(models, slots=16)
    assert e.stats.refills_per_step == 8
    e.submit(RowBlock("p2", PROMPTS["p2"], 0.95, 5, 0, 6 * e.slots))
    e.run()
    assert e.stats.refills_per_step == 16
    for b in BLOCKS:
        e.submit(b)
    e.submit(RowBlock("p3", PROMPTS["p3"], 0.05, 5, 0, 6 * e.slots))
    out = {_key(r.block): r for r in e.run()}
    assert e.stats.refills_per_step == 8
    for b in BLOCKS:  # the cap changed while these rows ran; they do not depend on it
        _assert_same(results[_key(b)].rollouts, out[_key(b)].rollouts)


def test_nonfinite_rows_flagged_and_slots_reused_cleanly():
    # Variant logits turn NaN once a row feeds bad_tok; the slot that row used must not poison
    # the rows that take it later (masked attention multiplies stale values by 0: 0 * NaN = NaN).
    m_o, m_v = _model(0), _model(1)
    bad_tok = 7
    m_v.embed_tokens[...] = m_v.embed_tokens[...].at[bad_tok].set(jnp.nan)
    blocks = [
        RowBlock("p0", PROMPTS["p0"], 0.5, 1, 0, 30),
        RowBlock("p3", PROMPTS["p3"], 0.2, 1, 0, 30),
    ]
    e = _engine((m_o, m_v), slots=3, max_prompts=2)  # shapes shared with the test above
    for b in blocks:
        e.submit(b)
    out = {r.block.prompt_key: r.rollouts for r in e.run()}
    s = LockstepSampler(
        original=m_o, variant=m_v, path=FORCED, max_new_tokens=T, eos_token_ids=EOS, max_rows=8
    )
    flagged = 0
    for b in blocks:
        ref = _reference(s, b)
        _assert_same(ref, out[b.prompt_key])
        got = out[b.prompt_key]
        flagged += got.nonfinite.sum()
        assert np.isnan(got.logp_variant[got.nonfinite]).all()
        assert np.isfinite(got.logp_variant[~got.nonfinite]).all()
    assert 0 < flagged < 40, flagged  # some rows hit bad_tok, most did not: slots were reused


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(prompt_ids=np.ones((2, 3), np.int32)), "1-D"),
        (dict(prompt_ids=np.array([1.0, 2.0])), "integer"),
        (dict(prompt_ids=np.array([], np.int32)), "empty"),
        (dict(prompt_ids=np.array([1, 96])), r"\[0, 96\)"),
        (dict(prompt_ids=np.arange(300) % 96), "max_prompt_len"),
        (dict(prompt_key=["unhashable"]), "hashable"),
        (dict(prompt_key="p1"), "other prompt_ids"),
        (dict(alpha=1.5), r"forced_eos.*\[0.0, 1.0\]"),
        (dict(alpha=float("nan")), "finite"),
        (dict(count=0), "count"),
        (dict(count=2.5), "count"),
        (dict(seed=-1), "seed"),
        (dict(seed=2**32), "seed"),
        (dict(rollout_start=-1), "rollout_start"),
        (dict(rollout_start=2**32 - 2, count=3), "count"),
    ],
)
def test_submit_errors(engine_results, change, match):
    e, _ = engine_results
    block = dataclasses.replace(RowBlock("new", PROMPTS["p0"], 0.5, 3, 0, 2), **change)
    with pytest.raises(ValueError, match=match):
        e.submit(block)
    assert e.idle  # a rejected block leaves nothing queued


def test_max_positions_and_construction_errors(models):
    short = qwen3.Qwen3Config(96, 32, 2, 4, 2, 16, 64, max_position_embeddings=12)
    m = qwen3.init_random(short, seed=0)
    e = RolloutEngine(m, m, FORCED, T, EOS, slots=2, max_prompts=1)
    with pytest.raises(ValueError, match="max_position_embeddings 12"):
        e.submit(RowBlock("k", np.arange(5, dtype=np.int32), 0.5, 0, 0, 1))
    with pytest.raises(TypeError, match="RowBlock"):
        e.submit(("k", [1, 2], 0.5, 0, 0, 1))
    for kw, match in [
        (dict(slots=0), "slots"),
        (dict(max_prompts=0), "max_prompts"),
        (dict(steps_per_call=0), "steps_per_call"),
        (dict(max_prompt_len=0), "max_prompt_len"),
        (dict(per_token=1), "per_token"),
        (dict(attention_block=-1), "attention_block"),
        (dict(attention_block=2.0), "attention_block"),
        (dict(reserve_bytes=-1), "reserve_bytes"),
    ]:
        with pytest.raises(ValueError, match=match):
            _engine(models, **kw)
    with pytest.raises(ValueError, match="eos_token_ids"):
        RolloutEngine(models[0], models[1], FORCED, T, [96])


def test_reserve_bytes_leave_memory_free_for_a_device_judge(models, monkeypatch):
    """Sized from free memory, the engine plans its slots and prompt table around the bytes a
    device judge's batch needs (memory.judge_batch_bytes): fewer slots, as the plan says."""
    from lpe_jax.decoding import memory

    probe = _engine(models, slots=None, max_prompts=None)  # CPU: the default sizes
    slot, prompt = (
        probe.planned_bytes()["slot"],
        probe.planned_bytes()["table"] // probe.max_prompts,
    )
    free = 64 * slot + 8 * prompt
    monkeypatch.setattr(memory, "device_free_bytes", lambda device: free)
    plain = _engine(models, slots=None, max_prompts=None)
    reserved = _engine(models, slots=None, max_prompts=None, reserve_bytes=free // 2)
    want = memory.plan_engine(free // 2, slot, prompt)
    assert (reserved.slots, reserved.max_prompts) == want
    assert reserved.slots < plain.slots


def test_compilations_bounded(models):
    # max_prompts=3 is used by no other test, so this engine's shapes start uncompiled.
    e = _engine(models, slots=4, max_prompts=3, steps_per_call=5)
    rng = np.random.default_rng(0)

    def round_of_blocks(seed: int) -> None:
        for i in range(6):
            key = f"q{seed}-{i}"
            ids = rng.integers(0, 96, size=int(rng.integers(2, 16))).astype(np.int32)
            e.submit(RowBlock(key, ids, float(rng.uniform(0.15, 0.85)), seed, 0, i + 1))
        e.run()

    round_of_blocks(0)
    first = e.stats.compilations
    assert first >= 1  # the counter sees compilations at all
    round_of_blocks(1)
    round_of_blocks(2)
    # New prompts (same length bucket), alphas, counts and insert sizes compile nothing more,
    # except insert buckets not met before (powers of two up to the queue size).
    assert e.stats.compilations - first <= 2, (first, e.stats.compilations)


def _chi2_pvalue(tokens: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square p-value of token counts against probs [V], low-expectation bins merged."""
    observed = np.bincount(tokens, minlength=probs.size).astype(np.float64)
    expected = probs * tokens.size
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    obs, exp = obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()
    return stats.chisquare(obs, exp).pvalue


def test_token_frequencies_follow_the_path():
    # Two prompts at two alphas in one engine; token 0 comes from the prompt table, token 1 from a
    # decode step through the slot's copied prompt: both must follow softmax(path logits).
    cfg = qwen3.Qwen3Config(64, 32, 1, 2, 1, 16, 64, tie_word_embeddings=False)
    m_o, m_v = qwen3.init_random(cfg, seed=0), qwen3.init_random(cfg, seed=1)
    for m in (m_o, m_v):
        m.lm_head[...] = m.lm_head[...] * 20.0
    # Rows of 2 tokens free half the slots every step: refilling them all at once (the default
    # cap starts at 16) keeps 3,000 rows to ~24 steps. A row's tokens depend on its key, not on
    # when it got a slot, so the cap changes no token.
    e = RolloutEngine(
        m_o, m_v, "linear", 2, [], slots=256, max_prompts=2, steps_per_call=8, refills_per_step=256
    )
    cases = {"a": (np.array([7, 3, 12], np.int32), 0.5), "b": (np.array([40, 2], np.int32), 0.3)}
    for key, (ids, alpha) in cases.items():
        e.submit(RowBlock(key, ids, alpha, 11, 0, 1500))
    out = {r.block.prompt_key: r.rollouts.tokens[0] for r in e.run()}

    def expected(ids: np.ndarray, alpha: float) -> np.ndarray:
        lo, lv = model_logits(m_o, ids)[-1], model_logits(m_v, ids)[-1]
        return np.asarray(jax.nn.softmax(paths.linear(lo, lv, np.float32(alpha))), np.float64)

    for key, (ids, alpha) in cases.items():
        tokens = out[key]
        assert _chi2_pvalue(tokens[:, 0], expected(ids, alpha)) > 1e-3, key
        top = np.bincount(tokens[:, 0]).argmax()
        after = tokens[tokens[:, 0] == top, 1]
        assert after.size > 200
        p = _chi2_pvalue(after, expected(np.append(ids, top), alpha))
        assert p > 1e-3, (key, p)
    # The test has power: prompt a's first tokens are not prompt b's distribution.
    assert _chi2_pvalue(out["a"][:, 0], expected(*cases["b"])) < 1e-6


_FOUR_DEVICES = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from lpe_jax.model import qwen3
    from lpe_jax.decoding.engine import RolloutEngine, RowBlock
    from lpe_jax.decoding.paths import PathShape
    assert len(jax.local_devices()) == 4, jax.local_devices()
    EOS = (3, 11, 29, 50, 77)
    def forced(l_o, l_v, alpha):
        bias = jnp.where(alpha > 0.9, 1e4, jnp.where(alpha < 0.1, -jnp.inf, 0.0))
        return (alpha * l_o + (1.0 - alpha) * l_v).at[:, list(EOS)].add(bias)
    cfg = qwen3.Qwen3Config(96, 32, 2, 4, 2, 16, 64, tie_word_embeddings=False)
    models = [qwen3.init_random(cfg, seed=s) for s in (0, 1)]
    for m in models:
        m.lm_head[...] = m.lm_head[...] * 20.0
    e = RolloutEngine(*models, PathShape("forced_eos", forced, (0.0, 1.0)), 8, EOS, slots=4,
                      max_prompts=4, steps_per_call=4, max_prompt_len=16)
    assert e.slots == 4 and e._spec.mesh.size == 4
    blocks = [RowBlock(k, np.array(ids, np.int32), a, seed, start, n)
              for k, ids, a, seed, start, n in eval(sys.argv[2])]
    for b in blocks:
        e.submit(b)
    out = {r.block.prompt_key + str(r.block.alpha): r.rollouts for r in e.run()}
    np.savez(sys.argv[1], **{k + "/" + f: getattr(r, f) for k, r in out.items()
             for f in ("tokens", "lengths", "nonfinite", "logp_original", "logp_variant")})
    """
)


def test_four_devices_match_one(engine_results, tmp_path):
    _, results = engine_results
    blocks = [b for b in BLOCKS if b.prompt_key != "long"][:6]
    spec = [
        (b.prompt_key, b.prompt_ids.tolist(), b.alpha, b.seed, b.rollout_start, b.count)
        for b in blocks
    ]
    out = tmp_path / "four.npz"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", _FOUR_DEVICES, str(out), repr(spec)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    four = np.load(out)
    for b in blocks:
        ref, name = results[_key(b)].rollouts, b.prompt_key + str(b.alpha)
        for f in ("tokens", "lengths", "nonfinite"):
            np.testing.assert_array_equal(four[f"{name}/{f}"], getattr(ref, f), err_msg=f)
        for f in ("logp_original", "logp_variant"):
            np.testing.assert_allclose(four[f"{name}/{f}"], getattr(ref, f), rtol=1e-5, atol=1e-5)
