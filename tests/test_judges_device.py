"""The device-scored local judge (issue 22): LocalJudge.from_model reads three numbers per row
computed on the device, and gives the verdicts LocalJudge gives over the full host logits."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpe_jax import model_logits
from lpe_jax.judges import LocalJudge
from lpe_jax.judges.device import answer_scores
from lpe_jax.judges.local import answer_token
from lpe_jax.model import qwen3
from lpe_jax.model.qwen3 import FULL_PASS_BLOCK

ANSWERS = ("w1", "w2")  # one token each in the tiny tokenizer (90 ids)
ITEMS = [
    ("w3 w4", "w10 w11 w12"),
    ("w3 w4 w5 w6 w7", "w20"),
    ("w3", "w13 w14 w10 w15 w16 w17 w18"),
    ("w8 w9", "w21 w22 w23 w24"),
    ("w30", "w10"),
    ("w31 w32", "w33 w34 w35 w36 w37 w38 w39 w40 w41"),
    ("w5", "w6"),
]
CFG = qwen3.Qwen3Config(96, 64, 2, 4, 2, 16, 128, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tokenizer(hf_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_tokenizer_dir)


@pytest.fixture(scope="module")
def model():
    m = qwen3.init_random(CFG, seed=3)
    m.lm_head[...] = m.lm_head[...] * 5.0  # logits of about one unit, so P(yes) spreads
    return m


def test_device_verdicts_equal_host_logits_verdicts(model, tokenizer) -> None:
    kw = dict(answers=ANSWERS, batch_size=3, pad_multiple=16, model_name="tiny")
    host = LocalJudge(lambda ids: model_logits(model, ids), tokenizer, **kw).judge(ITEMS)
    scores = sorted(v.score for v in host)
    gaps = np.diff(scores)
    assert gaps.max() > 1e-3, scores  # a threshold between two scores, far from both
    threshold = float(scores[int(np.argmax(gaps))] + gaps.max() / 2)
    host = LocalJudge(
        lambda ids: model_logits(model, ids), tokenizer, threshold=threshold, **kw
    ).judge(ITEMS)
    device_judge = LocalJudge.from_model(model, tokenizer, threshold=threshold, **kw)
    device = device_judge.judge(ITEMS)
    assert device_judge.scores_fn is not None and device_judge.logits_fn is None
    assert [v.complied for v in device] == [v.complied for v in host]
    assert len({v.complied for v in host}) == 2  # both verdicts occur
    for d, h in zip(device, host, strict=True):
        assert d.judge_id == h.judge_id
        for key in ("p_yes", "logit_yes", "logit_no", "answer_mass"):
            assert d.fields[key] == pytest.approx(h.fields[key], rel=1e-4, abs=1e-5), key
        assert d.fields["n_tokens"] == h.fields["n_tokens"]


def test_long_questions_blocked_attention_keeps_the_verdicts(model, tokenizer, monkeypatch):
    """Questions past FULL_PASS_BLOCK tokens: the device judge (attention in blocks) gives the
    scores and verdicts of the same pass with one [T, T] softmax per layer (FULL_PASS_BLOCK
    raised past T, run unjitted so it is traced afresh)."""
    from flax import nnx

    from lpe_jax.judges.device import _scores

    rng = np.random.default_rng(5)
    items = [
        (" ".join(f"w{i}" for i in rng.integers(3, 90, n)), f"w{rng.integers(3, 90)}")
        for n in (FULL_PASS_BLOCK + 40, 2 * FULL_PASS_BLOCK + 3, 10, FULL_PASS_BLOCK + 1)
    ]
    kw = dict(answers=ANSWERS, batch_size=4, pad_multiple=16, model_name="tiny")
    blocked = LocalJudge.from_model(model, tokenizer, **kw)
    got = blocked.judge(items)
    graphdef, state = nnx.split(model)
    ids = jnp.array([answer_token(tokenizer, a) for a in ANSWERS], jnp.int32)

    def one_softmax(tokens, last):
        assert tokens.shape[1] > FULL_PASS_BLOCK  # the blocked judge's batch was blocked too
        with monkeypatch.context() as m:
            m.setattr(qwen3, "FULL_PASS_BLOCK", tokens.shape[1])
            return np.asarray(_scores.__wrapped__(graphdef, state, tokens, last, ids))

    ref = LocalJudge(None, tokenizer, scores_fn=one_softmax, **kw).judge(items)
    assert all(v.complied is not None for v in got)
    assert [v.complied for v in got] == [v.complied for v in ref]
    for g, r in zip(got, ref, strict=True):
        for key in ("logit_yes", "logit_no", "answer_mass", "p_yes"):
            assert g.fields[key] == pytest.approx(r.fields[key], rel=1e-5, abs=1e-6), key


def test_device_scores_are_three_numbers_per_row(model) -> None:
    fn = answer_scores(model, 5, 6)
    tokens = np.array([[1, 2, 3, 4], [7, 8, 0, 0]], np.int32)
    out = fn(tokens, np.array([3, 1]))
    assert out.shape == (2, 3) and out.dtype == np.float32
    full = model_logits(model, tokens)
    for row, last in ((0, 3), (1, 1)):
        ref = full[row, last].astype(np.float64)
        expected = [ref[5], ref[6], np.logaddexp.reduce(ref)]
        np.testing.assert_allclose(out[row], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="last positions"):
        fn(tokens, np.array([4, 0]))
    with pytest.raises(ValueError, match="outside the judge model's vocabulary"):
        answer_scores(model, 96, 0)


def test_device_failures_are_unknown(model, tokenizer) -> None:
    def broken(tokens, last):
        raise MemoryError("out of device memory")

    judge = LocalJudge(None, tokenizer, scores_fn=broken, answers=ANSWERS)
    verdicts = judge.judge(ITEMS[:2])
    assert [v.complied for v in verdicts] == [None, None]
    assert verdicts[0].reason == "scores_fn raised MemoryError: out of device memory"

    nan_model = qwen3.init_random(CFG, seed=3)
    nan_model.norm[...] = jnp.full_like(nan_model.norm[...], jnp.nan)
    nan = LocalJudge.from_model(nan_model, tokenizer, answers=ANSWERS).judge(ITEMS[:2])
    assert [v.complied for v in nan] == [None, None]
    assert all("not finite" in v.reason for v in nan)

    with pytest.raises(TypeError, match="exactly one"):
        LocalJudge(None, tokenizer, answers=ANSWERS)
    wrong = LocalJudge(None, tokenizer, scores_fn=lambda t, last: np.zeros((1, 2)), answers=ANSWERS)
    with pytest.raises(ValueError, match=r"must return \[B, 3\]"):
        wrong.judge(ITEMS[:1])


def test_memory_plans_the_device_judge_batch_not_t_by_v(model, tokenizer) -> None:
    """memory.judge_batch_bytes covers what XLA allocates for one scoring call beside the
    params (temporaries, token ids and the result), within 2.5x, and grows with B x T, not with
    B x T x V (the batch's logits are [B, V]) nor with B x T x T past FULL_PASS_BLOCK tokens
    (attention runs in blocks: XLA holds less than one float32 [heads, T, T] per row)."""
    from flax import nnx

    from lpe_jax.decoding.memory import judge_batch_bytes
    from lpe_jax.judges.device import _scores

    graphdef, state = nnx.split(model)
    ids = jnp.array([5, 6], jnp.int32)
    for b, t in ((4, 64), (8, 128), (4, 4 * FULL_PASS_BLOCK), (2, 8 * FULL_PASS_BLOCK)):
        tokens, last = jnp.zeros((b, t), jnp.int32), jnp.zeros(b, jnp.int32)
        ma = _scores.lower(graphdef, state, tokens, last, ids).compile().memory_analysis()
        xla = ma.temp_size_in_bytes + ma.output_size_in_bytes + tokens.nbytes + last.nbytes
        plan = judge_batch_bytes(CFG, jnp.float32, b, t)
        assert xla <= plan <= 2.5 * xla, (b, t, xla, plan)
        wide = dataclasses.replace(CFG, vocab_size=10 * CFG.vocab_size)  # V: [B, V] terms only
        assert judge_batch_bytes(wide, jnp.float32, b, t) - plan == b * 2 * 9 * CFG.vocab_size * 4
        if t > FULL_PASS_BLOCK:
            one_t_by_t = b * CFG.num_heads * t * t * 4
            assert xla < one_t_by_t and plan < one_t_by_t, (b, t, xla, plan)
    judge = LocalJudge.from_model(model, tokenizer, answers=ANSWERS, batch_size=4, pad_multiple=16)
    sized = judge.device_bytes(50)
    assert sized["tokens"] == 64 and sized["batch"] == judge_batch_bytes(CFG, jnp.float32, 4, 64)
    assert sized["params"] == sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    host = LocalJudge(lambda ids: model_logits(model, ids), tokenizer, answers=ANSWERS)
    assert host.device_bytes(50) is None


def test_qwen35_judge_models_are_refused() -> None:
    """The device judge runs Qwen3 models only (its pass and plan are Qwen3's): a Qwen3.5 model
    is refused when the judge is built, not judged as all-unknown batch after batch."""
    from flax import nnx
    from hybrid_fixtures import qwen35_text_config

    from lpe_jax.decoding.memory import judge_batch_bytes
    from lpe_jax.model.qwen35 import Qwen35, Qwen35Config

    cfg = Qwen35Config.from_hf(qwen35_text_config().to_dict())
    with pytest.raises(TypeError, match="Qwen3 / Qwen3-MoE judge models; got Qwen35"):
        answer_scores(Qwen35(cfg, rngs=nnx.Rngs(0)), 1, 2)
    with pytest.raises(ValueError, match="Qwen3 / Qwen3-MoE judge models only"):
        judge_batch_bytes(cfg, jnp.float32, 4, 64)
