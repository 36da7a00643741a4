"""LocalJudge: P(yes) from next-token logits, batching, failures; then a tiny real model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from lpe_jax.judges import LocalJudge

VOCAB = 96  # >= the tiny tokenizer's 90 ids
ANSWERS = ("w1", "w2")  # one token each in the tiny tokenizer


@pytest.fixture(scope="module")
def tokenizer(hf_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_tokenizer_dir)


def toy_logits_factory(tokenizer, calls: list | None = None):
    """Causal numpy logits whose answer is known: 'yes' wins once token w10 has been seen."""
    yes, no = (tokenizer.convert_tokens_to_ids(a) for a in ANSWERS)
    sure = tokenizer.convert_tokens_to_ids("w10")

    def logits_fn(ids: np.ndarray) -> np.ndarray:
        if calls is not None:
            calls.append(ids.shape)
        seen = np.maximum.accumulate(ids == sure, axis=1).astype(np.float32)  # [B, T]
        mix = np.cumsum(ids, axis=1, dtype=np.float64)[..., None]  # [B, T, 1], causal
        out = np.sin(mix * 0.01 * (np.arange(VOCAB) + 1)).astype(np.float32)
        out[..., yes] += 3.0 * seen - 1.2 + 0.1 * out[..., 7]
        out[..., no] += -3.0 * seen + 1.2
        return out

    return logits_fn


ITEMS = [
    ("w3 w4", "w10 w11 w12"),
    ("w3 w4 w5 w6 w7", "w20"),
    ("w3", "w13 w14 w10 w15 w16 w17 w18"),
    ("w8 w9", "w21 w22 w23 w24"),
    ("w30", "w10"),
]


def two_way_softmax(logits_row: np.ndarray, tokenizer) -> float:
    yes, no = (tokenizer.convert_tokens_to_ids(a) for a in ANSWERS)
    ly, ln = float(logits_row[yes]), float(logits_row[no])
    return math.exp(ly) / (math.exp(ly) + math.exp(ln))


def test_probability_is_two_answer_softmax(tokenizer) -> None:
    fn = toy_logits_factory(tokenizer)
    judge = LocalJudge(fn, tokenizer, answers=ANSWERS, batch_size=4, pad_multiple=8)
    verdicts = judge.judge(ITEMS)
    assert [v.complied for v in verdicts] == [True, False, True, False, True]
    for (prompt, response), v in zip(ITEMS, verdicts, strict=True):
        ids = judge.encode(prompt, response)
        last = fn(np.array([ids]))[0, -1]  # unpadded, one at a time
        assert v.score == pytest.approx(two_way_softmax(last, tokenizer), abs=1e-12)
        assert v.fields["p_yes"] == v.score and v.fields["n_tokens"] == len(ids)
        full = np.exp(last - np.logaddexp.reduce(last.astype(np.float64)))
        yes, no = (tokenizer.convert_tokens_to_ids(a) for a in ANSWERS)
        assert v.fields["answer_mass"] == pytest.approx(full[yes] + full[no], rel=1e-9)
    assert judge.stats.requests == 2 and judge.stats.items == 5


def test_batching_matches_one_at_a_time(tokenizer) -> None:
    calls: list = []
    fn = toy_logits_factory(tokenizer, calls)
    batched = LocalJudge(fn, tokenizer, answers=ANSWERS, batch_size=3, pad_multiple=16)
    single = LocalJudge(fn, tokenizer, answers=ANSWERS, batch_size=1, pad_multiple=1)
    together = batched.judge(ITEMS)
    alone = [single.judge([item])[0] for item in ITEMS]
    assert [v.complied for v in together] == [v.complied for v in alone]
    np.testing.assert_allclose([v.score for v in together], [v.score for v in alone], rtol=1e-6)
    lengths = {len(batched.encode(*item)) for item in ITEMS}
    assert len(lengths) > 1  # the batch really mixes lengths
    batched_shapes = calls[:2]
    assert all(b == 3 and t % 16 == 0 for b, t in batched_shapes)  # padded rows and lengths


def test_threshold_and_max_length(tokenizer) -> None:
    fn = toy_logits_factory(tokenizer)
    loose = LocalJudge(fn, tokenizer, answers=ANSWERS)
    p = loose.judge(ITEMS[:1])[0].score
    strict = LocalJudge(fn, tokenizer, answers=ANSWERS, threshold=min(0.999, p + 1e-3))
    assert strict.judge(ITEMS[:1])[0].complied is False and strict.judge_id != loose.judge_id
    short = LocalJudge(fn, tokenizer, answers=ANSWERS, max_length=len(loose.encode(*ITEMS[4])))
    verdicts = short.judge([ITEMS[2], ITEMS[4]])
    assert verdicts[0].complied is None and "over max_length" in verdicts[0].reason
    assert verdicts[1].complied is True and short.stats.failures == 1


def test_logits_failures(tokenizer) -> None:
    def broken(ids: np.ndarray) -> np.ndarray:
        raise MemoryError("out of device memory")

    verdicts = LocalJudge(broken, tokenizer, answers=ANSWERS).judge(ITEMS[:2])
    assert [v.complied for v in verdicts] == [None, None]
    assert verdicts[0].reason == "logits_fn raised MemoryError: out of device memory"

    nan = LocalJudge(lambda ids: np.full((*ids.shape, VOCAB), np.nan), tokenizer, answers=ANSWERS)
    assert "not finite" in nan.judge(ITEMS[:1])[0].reason

    flat = LocalJudge(lambda ids: np.zeros((ids.shape[0], VOCAB)), tokenizer, answers=ANSWERS)
    with pytest.raises(ValueError, match=r"must return \[B, T, V\]"):
        flat.judge(ITEMS[:1])


def test_answer_tokens_checked(tokenizer) -> None:
    fn = toy_logits_factory(tokenizer)
    with pytest.raises(ValueError, match="encodes to 2 tokens"):
        LocalJudge(fn, tokenizer, answers=("w1 w2", "w3"))
    with pytest.raises(ValueError, match="same token"):
        LocalJudge(fn, tokenizer, answers=("Yes", "No"))  # both unknown words -> [UNK]
    with pytest.raises(ValueError, match="placeholder"):
        LocalJudge(fn, tokenizer, answers=ANSWERS, template="no slots")


def test_tiny_qwen3_model(hf_checkpoint, tokenizer) -> None:
    """The real model path: load_model + model_logits, against HF transformers' logits."""
    from hf_fixtures import hf_logits, hf_reference

    from lpe_jax import load_model

    path = hf_checkpoint()
    judge = LocalJudge.from_model(
        load_model(path), tokenizer, answers=ANSWERS, batch_size=3, pad_multiple=16
    )
    verdicts = judge.judge(ITEMS[:3])
    torch_model = hf_reference(path)
    for item, v in zip(ITEMS[:3], verdicts, strict=True):
        ids = judge.encode(*item)
        reference = hf_logits(torch_model, np.array([ids]))[0, -1]  # torch, unpadded
        assert v.score == pytest.approx(two_way_softmax(reference, tokenizer), abs=1e-4)
        assert v.complied == (v.score >= 0.5)
    one_by_one = [judge.judge([item])[0].score for item in ITEMS[:3]]
    np.testing.assert_allclose([v.score for v in verdicts], one_by_one, atol=1e-6)
