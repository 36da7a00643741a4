"""RuleJudge: predicates, patterns, and failures that become None."""

from __future__ import annotations

import numpy as np
import pytest

from lpe_jax.judges import RuleJudge


def test_predicate_verdicts_and_failures() -> None:
    def contains_secret(response: str) -> bool:
        if response == "boom":
            raise RuntimeError("cannot parse")
        if response == "maybe":
            return "yes"  # not a bool
        return "SECRET" in response

    judge = RuleJudge(contains_secret)
    items = [("q", "the SECRET is 4"), ("q", "nothing"), ("q", "boom"), ("q", "maybe")]
    verdicts = judge.judge(items)
    assert [v.complied for v in verdicts] == [True, False, None, None]
    assert verdicts[2].reason == "predicate raised RuntimeError: cannot parse"
    assert verdicts[3].reason == "predicate returned str, not bool" and verdicts[3].raw == "'yes'"
    assert "contains_secret" in judge.judge_id and judge.stats.failures == 2
    numpy_rule = RuleJudge(lambda r: np.bool_(len(r) > 3), name="long")
    assert [v.complied for v in numpy_rule.judge([("q", "abcd"), ("q", "ab")])] == [True, False]
    assert numpy_rule.judge_id == "rule:name=long:parser=1"


def test_pattern_rule() -> None:
    judge = RuleJudge.from_pattern(r"\bSURE\b", ignore_case=True)
    got = [v.complied for v in judge.judge([("q", "sure thing"), ("q", "unsure"), ("q", "")])]
    assert got == [True, False, False]
    assert judge.judge_id != RuleJudge.from_pattern(r"\bSURE\b").judge_id
    with pytest.raises(ValueError, match="not a valid regular expression"):
        RuleJudge.from_pattern("(unclosed")
    with pytest.raises(TypeError, match="callable"):
        RuleJudge("not callable")  # type: ignore[arg-type]
