"""A judge from a Python predicate over the response text, for toy models and pass/fail checks."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

from lpe_jax.judges.base import Item, JudgeStats, Verdict, check_items, judge_id, text_hash

PARSER_VERSION = 1


class RuleJudge:
    """complied = predicate(response).

    predicate: str -> bool. It must return a real bool (numpy bools accepted); any other value,
        or an exception, gives complied=None with the reason, and the batch goes on.
    name: goes into judge_id (default: the predicate's qualified name). Give each distinct rule
        its own name: two rules with one name would share cache entries and manifests.
    """

    def __init__(self, predicate: Callable[[str], bool], name: str | None = None) -> None:
        if not callable(predicate):
            raise TypeError(f"predicate must be callable (str -> bool), got {type(predicate)}")
        name = name or getattr(predicate, "__qualname__", None) or type(predicate).__name__
        self.predicate = predicate
        self.name = name
        self.judge_id = judge_id("rule", PARSER_VERSION, name=name)
        self.stats = JudgeStats()

    @classmethod
    def from_pattern(cls, pattern: str, ignore_case: bool = False) -> RuleJudge:
        """complied = ``re.search(pattern, response)`` finds a match (flag-friendly form)."""
        if not pattern:
            raise ValueError("pattern must be a non-empty regular expression")
        try:
            regex = re.compile(pattern, re.I if ignore_case else 0)
        except re.error as e:
            raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {e}") from e
        name = f"re{'-i' if ignore_case else ''}-{text_hash(pattern)}"
        return cls(lambda response: regex.search(response) is not None, name=name)

    def judge(self, items: Sequence[Item]) -> list[Verdict]:
        """One Verdict per pair, in order."""
        items = check_items(items)
        self.stats.items += len(items)
        verdicts = [self._one(response) for _, response in items]
        self.stats.failures += sum(v.complied is None for v in verdicts)
        return verdicts

    def _one(self, response: str) -> Verdict:
        try:
            value = self.predicate(response)
        except Exception as e:  # a rule that fails on one response must not stop the run
            return Verdict(None, self.judge_id, reason=f"predicate raised {type(e).__name__}: {e}")
        if not isinstance(value, (bool, np.bool_)):
            return Verdict(
                None,
                self.judge_id,
                raw=repr(value)[:200],
                reason=f"predicate returned {type(value).__name__}, not bool",
            )
        return Verdict(bool(value), self.judge_id, raw=str(bool(value)))
