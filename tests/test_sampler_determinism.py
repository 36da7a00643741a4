"""Rows depend only on (seed, alpha, rollout index): not on the slot count, batch-mates, call order
or device count. Prompts of one bucket reuse the compiled engine."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from lpe_jax.decoding import paths
from lpe_jax.decoding.sampler import PairedSampler, prompt_bucket
from lpe_jax.model import qwen3

jax.config.update("jax_default_matmul_precision", "highest")

CFG = qwen3.Qwen3Config(80, 32, 2, 4, 2, 16, 64)
PROMPT = np.array([4, 8, 15, 16, 23, 42], np.int32)
ALPHAS = np.array([0.0, 0.3, 0.7])
EXACT = ("tokens", "lengths", "truncated", "nonfinite")
FLOAT = ("logp_original", "logp_variant")


@pytest.fixture(scope="module")
def models():
    return qwen3.init_random(CFG, seed=0), qwen3.init_random(CFG, seed=1)


def _sampler(models, **kw) -> PairedSampler:
    kw.setdefault("max_rows", 64)
    return PairedSampler(
        original=models[0],
        variant=models[1],
        path=paths.linear,
        max_new_tokens=6,
        eos_token_ids=[1, 2, 3],
        **kw,
    )


def _same(a, b, sl=np.s_[...]):
    """Discrete outputs bit-identical; log-probs equal up to float32 rounding (XLA's matmul
    kernels may sum in a different order for a different batch shape)."""
    for f in EXACT:
        np.testing.assert_array_equal(getattr(a, f)[sl], getattr(b, f), err_msg=f)
    for f in FLOAT:
        np.testing.assert_allclose(getattr(a, f)[sl], getattr(b, f), rtol=1e-6, atol=1e-5)


def test_same_seed_same_output_and_seed_matters(models):
    s = _sampler(models)
    r1 = s.sample(PROMPT, ALPHAS, rollouts_per_alpha=9, seed=5)
    r2 = s.sample(PROMPT, ALPHAS, rollouts_per_alpha=9, seed=5)
    _same(r1, r2)
    r3 = s.sample(PROMPT, ALPHAS, rollouts_per_alpha=9, seed=6)
    assert not np.array_equal(r1.tokens, r3.tokens)


def test_chunking_offset_and_batch_mates_do_not_change_rows(models):
    big = _sampler(models, max_rows=64).sample(PROMPT, ALPHAS, rollouts_per_alpha=9, seed=5)
    small = _sampler(models, max_rows=7).sample(PROMPT, ALPHAS, rollouts_per_alpha=9, seed=5)
    _same(big, small)
    s = _sampler(models)
    head = s.sample(PROMPT, ALPHAS, rollouts_per_alpha=4, seed=5)
    tail = s.sample(PROMPT, ALPHAS, rollouts_per_alpha=5, seed=5, rollout_offset=4)
    _same(big, head, np.s_[:, :4])
    _same(big, tail, np.s_[:, 4:])
    assert tail.rollout_offset == 4
    alone = s.sample(PROMPT, ALPHAS[1:2], rollouts_per_alpha=9, seed=5)
    _same(big, alone, np.s_[1:2])


def test_buckets_reuse_one_compiled_engine(models):
    # max_new_tokens=7 is used by no other test, so this sampler's engine starts uncompiled.
    s = PairedSampler(
        original=models[0],
        variant=models[1],
        path=paths.linear,
        max_new_tokens=7,
        eos_token_ids=[1],
        max_rows=64,
    )
    s.sample(PROMPT, ALPHAS[:2], rollouts_per_alpha=5, seed=0)
    first = s.num_compilations
    assert first >= 1  # the counter sees compilations at all
    s.sample(PROMPT[:4], ALPHAS[:2], rollouts_per_alpha=6, seed=1)  # other prompt, R, rows
    s.sample(np.arange(9, dtype=np.int32), ALPHAS[:1], rollouts_per_alpha=13, seed=2)
    assert prompt_bucket(4) == prompt_bucket(9) == 16
    # Same bucket: nothing more compiles but insert sizes not met before (powers of two).
    assert s.num_compilations - first <= 1, (first, s.num_compilations)
    before = s.num_compilations
    s.sample(np.arange(20, dtype=np.int32), ALPHAS[:1], rollouts_per_alpha=13, seed=0)
    assert s.num_compilations > before  # prompt bucket 32: a new engine


_MULTI_DEVICE = textwrap.dedent(
    """
    import sys
    import jax, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from lpe_jax.decoding import paths
    from lpe_jax.model import qwen3
    from lpe_jax.decoding.sampler import PairedSampler
    assert len(jax.local_devices()) == 8, jax.local_devices()
    cfg = qwen3.Qwen3Config(80, 32, 2, 4, 2, 16, 64)
    m_o, m_v = qwen3.init_random(cfg, seed=0), qwen3.init_random(cfg, seed=1)
    s = PairedSampler(original=m_o, variant=m_v, path=paths.linear, max_new_tokens=6,
                      eos_token_ids=[1, 2, 3], max_rows=20)
    assert s.num_devices == 8
    r = s.sample(np.array([4, 8, 15, 16, 23, 42]), np.array([0.0, 0.3, 0.7]),
                 rollouts_per_alpha=9, seed=5)
    np.savez(sys.argv[1], **{f: getattr(r, f) for f in
             ("tokens", "lengths", "truncated", "nonfinite", "logp_original", "logp_variant")})
    """
)


def test_eight_devices_match_one(models, tmp_path):
    one = _sampler(models).sample(PROMPT, ALPHAS, rollouts_per_alpha=9, seed=5)
    out = tmp_path / "eight.npz"
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    proc = subprocess.run(
        [sys.executable, "-c", _MULTI_DEVICE, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    eight = np.load(out)
    for f in EXACT:
        np.testing.assert_array_equal(eight[f], getattr(one, f), err_msg=f)
    for f in FLOAT:
        np.testing.assert_allclose(eight[f], getattr(one, f), rtol=1e-6, atol=1e-5)
