"""Bad inputs raise clear errors; NaN logits flag rows instead of being sampled."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpe_jax.decoding import paths
from lpe_jax.decoding.rollouts import PAD_ID, check_same_tokenizer
from lpe_jax.decoding.sampler import PairedSampler
from lpe_jax.model import qwen3

jax.config.update("jax_default_matmul_precision", "highest")

CFG = qwen3.Qwen3Config(64, 32, 1, 2, 1, 16, 64, max_position_embeddings=40)
UNTIED = qwen3.Qwen3Config(64, 32, 1, 2, 1, 16, 64, tie_word_embeddings=False)
PROMPT = np.array([1, 2, 3], np.int32)


@pytest.fixture(scope="module")
def models():
    return qwen3.init_random(CFG, seed=0), qwen3.init_random(CFG, seed=1)


def _sampler(models, **kw):
    kw = {"path": paths.linear, "max_new_tokens": 4, "eos_token_ids": [0], **kw}
    return PairedSampler(original=models[0], variant=models[1], **kw)


def test_construction_errors(models):
    other = qwen3.init_random(qwen3.Qwen3Config(72, 32, 1, 2, 1, 16, 64), seed=2)
    with pytest.raises(ValueError, match="vocab sizes differ"):
        PairedSampler(
            original=models[0],
            variant=other,
            path=paths.linear,
            max_new_tokens=4,
            eos_token_ids=[0],
        )
    with pytest.raises(ValueError, match="tokenizers differ"):
        _sampler(models, tokenizer_ids=("qwen3-abc", "llama-def"))
    _sampler(models, tokenizer_ids=("same", "same"))
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_same_tokenizer("a", "b")
    with pytest.raises(ValueError, match="max_new_tokens"):
        _sampler(models, max_new_tokens=0)
    with pytest.raises(ValueError, match="eos_token_ids"):
        _sampler(models, eos_token_ids=[64])
    with pytest.raises(ValueError, match="temperature"):
        _sampler(models, temperature=0.0)
    with pytest.raises(ValueError, match="max_rows"):
        _sampler(models, max_rows=0)
    with pytest.raises(ValueError, match="unknown path"):
        _sampler(models, path="nope")
    with pytest.raises(TypeError, match="original"):
        PairedSampler(
            original=None, variant=models[1], path=paths.linear, max_new_tokens=4, eos_token_ids=[0]
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alphas": [0.5, 1.5]}, r"linear.*\[0.0, 1.0\]"),
        ({"alphas": [np.nan]}, "finite"),
        ({"alphas": []}, "non-empty"),
        ({"alphas": [0.5, 0.5]}, "distinct"),
        ({"prompt_ids": np.arange(37)}, "max_position_embeddings"),
        ({"prompt_ids": np.array([], np.int32)}, "empty"),
        ({"prompt_ids": np.array([1, 64])}, r"\[0, 64\)"),
        ({"prompt_ids": np.array([-1, 3])}, r"\[0, 64\)"),
        ({"prompt_ids": np.array([1.0, 2.0])}, "integer"),
        ({"prompt_ids": np.ones((2, 3), np.int32)}, "1-D"),
        ({"rollouts_per_alpha": 0}, "rollouts_per_alpha"),
        ({"rollouts_per_alpha": 2.5}, "rollouts_per_alpha"),
        ({"seed": -1}, "seed"),
        ({"rollout_offset": -3}, "rollout_offset"),
    ],
)
def test_sample_errors(models, kwargs, match):
    args = {
        "prompt_ids": PROMPT,
        "alphas": [0.0, 1.0],
        "rollouts_per_alpha": 2,
        "seed": 0,
        **kwargs,
    }
    with pytest.raises(ValueError, match=match):
        _sampler(models).sample(**args)


def test_amplify_domain(models):
    with pytest.raises(ValueError, match="amplify"):
        _sampler(models, path=paths.amplify).sample(PROMPT, [0.5], 1, seed=0)


def test_nan_everywhere_flags_every_row(models):
    poisoned = qwen3.init_random(CFG, seed=1)
    poisoned.norm[...] = jnp.full_like(poisoned.norm[...], jnp.nan)  # all variant logits NaN
    s = PairedSampler(
        original=models[0], variant=poisoned, path=paths.linear, max_new_tokens=4, eos_token_ids=[0]
    )
    r = s.sample(PROMPT, [0.0, 0.5, 1.0], rollouts_per_alpha=3, seed=0)
    assert r.nonfinite.all() and (r.lengths == 0).all() and (r.tokens == PAD_ID).all()
    assert np.isnan(r.logp_original).all() and not r.truncated.any()


def test_nan_after_one_token_flags_only_those_rows():
    m_o = qwen3.init_random(UNTIED, seed=0)
    m_v = qwen3.init_random(UNTIED, seed=1)
    bad_tok = 7
    emb = m_v.embed_tokens[...]
    m_v.embed_tokens[...] = emb.at[bad_tok].set(jnp.nan)  # NaN once a row has sampled bad_tok
    s = PairedSampler(
        original=m_o, variant=m_v, path=paths.linear, max_new_tokens=8, eos_token_ids=[]
    )
    r = s.sample(PROMPT, [0.0, 0.5, 1.0], rollouts_per_alpha=40, seed=0)
    hit = (r.tokens[..., :-1] == bad_tok).any(-1)  # a final bad_tok is never fed to the model
    assert hit.any() and not hit.all()
    assert np.array_equal(r.nonfinite, hit)  # flagged exactly when the variant saw bad_tok
    last = np.take_along_axis(r.tokens, r.lengths[..., None] - 1, axis=-1)[..., 0]
    assert (last[r.nonfinite] == bad_tok).all()  # stopped right after it, nothing sampled later
    assert (r.lengths[~r.nonfinite] == 8).all() and r.truncated[~r.nonfinite].all()
    assert np.isnan(r.logp_variant[r.nonfinite]).all()
    assert np.isfinite(r.logp_variant[~r.nonfinite]).all()
