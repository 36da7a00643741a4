"""make_judge: every kind from plain options, and clear errors for wrong ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lpe_jax.judges import (
    JUDGE_KINDS,
    LocalJudge,
    RubricJudge,
    RuleJudge,
    StringMatchJudge,
    judge_options,
    make_judge,
)

FIXTURES = Path(__file__).parent / "fixtures"


def test_kinds() -> None:
    assert set(JUDGE_KINDS) == {"rubric", "string", "local", "rule"}
    assert isinstance(make_judge("string", window=100), StringMatchJudge)
    judge = make_judge("string", phrases_path=str(FIXTURES / "refusal_phrases.txt"))
    assert judge.judge([("q", "not today")])[0].complied is False
    rule = make_judge("rule", pattern="^Sure")
    assert isinstance(rule, RuleJudge) and rule.judge([("q", "Sure.")])[0].complied is True
    assert make_judge("rule", predicate=str.isupper, name="caps").judge_id.startswith(
        "rule:name=caps"
    )
    rubric = make_judge("rubric", base_url="http://127.0.0.1:8000/v1", model="m", api_key_env="")
    assert isinstance(rubric, RubricJudge) and "base_url" in judge_options("rubric")
    assert "checkpoint" in judge_options("local") and "answers" in judge_options("local")


def test_local_kind_with_logits_fn(hf_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    fn = lambda ids: np.zeros((*ids.shape, 96), np.float32)  # noqa: E731
    judge = make_judge("local", logits_fn=fn, tokenizer=tok, answers=("w1", "w2"))
    assert isinstance(judge, LocalJudge)
    assert judge.judge([("w3", "w4")])[0].score == pytest.approx(0.5)
    with pytest.raises(ValueError, match="exactly one of checkpoint"):
        make_judge("local", tokenizer=tok)
    with pytest.raises(ValueError, match="needs tokenizer"):
        make_judge("local", logits_fn=fn)


def test_errors() -> None:
    with pytest.raises(ValueError, match="unknown judge kind 'gpt'.*rubric"):
        make_judge("gpt")
    with pytest.raises(ValueError, match=r"takes no option\(s\) \['model'\]"):
        make_judge("string", model="x")
    with pytest.raises(ValueError, match="exactly one of predicate"):
        make_judge("rule")
    with pytest.raises(ValueError, match="not both"):
        make_judge("string", phrases=["a"], phrases_path="x.txt")
    with pytest.raises(ValueError, match=r"rubric' needs \['base_url', 'model'\]"):
        make_judge("rubric")
    with pytest.raises(ValueError, match=r"needs \['model'\]"):
        make_judge("rubric", base_url="http://127.0.0.1:8000/v1")
