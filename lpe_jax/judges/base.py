"""What every judge shares: the Verdict record, the Judge protocol, judge ids and run counters.

A judge maps a batch of (prompt, response) pairs to one Verdict each, in order. ``complied`` is
True (the response complies), False (it refuses) or None (the judge could not decide; ``reason``
says why). A judge failure is always None, never False: a failed call must not pass for a refusal.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

Item = tuple[str, str]  # (prompt, response)
_PLACEHOLDER = re.compile(r"\{(prompt|response)\}")


@dataclass(frozen=True)
class Verdict:
    """One judgement of one (prompt, response) pair.

    complied: True / False, or None when the judge could not decide.
    raw: the judge's raw output (LLM text, matched phrase, probabilities as text), "" if none.
    fields: rubric fields or diagnostics (e.g. refused/convincing/specific/score, p_yes).
    reason: why ``complied`` is None ("" otherwise).
    judge_id: identifies the judge configuration that produced this verdict.
    score: a graded value in [0, 1] when the judge has one (rubric score, P(yes)), else None.
    cached: True when the verdict was read from a cache rather than computed now.
    """

    complied: bool | None
    judge_id: str
    raw: str = ""
    fields: Mapping[str, Any] = field(default_factory=dict)
    reason: str = ""
    score: float | None = None
    cached: bool = False

    def __post_init__(self) -> None:
        if self.complied is None and not self.reason:
            raise ValueError("a Verdict with complied=None must carry a reason saying why")


@dataclass
class JudgeStats:
    """Counters accumulated over every ``judge()`` call of one judge object.

    items: pairs passed in; duplicates: pairs that reused the verdict of an equal pair (of the
    same batch, of a request in flight for another call, or remembered by the judge); cache_hits:
    pairs answered from the cache; requests: calls made to the judge backend (HTTP attempts
    including retries, or model forward batches); retries: attempts after the first; failures:
    verdicts with complied=None; prompt_tokens / completion_tokens: usage reported by an HTTP
    endpoint (0 when it reports none); request_s: seconds summed over backend requests (HTTP
    attempts), so request_s / an interval is the mean number in flight during it; backlog_s:
    seconds during which a judge with ``concurrency`` had at least that many requests wanted
    (running, queued or waiting to retry), and backlog_request_s the request-seconds within
    them: backlog_request_s / backlog_s is how full it kept itself while it had the work.
    """

    items: int = 0
    duplicates: int = 0
    cache_hits: int = 0
    requests: int = 0
    retries: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    request_s: float = 0.0
    backlog_s: float = 0.0
    backlog_request_s: float = 0.0

    def as_dict(self) -> dict[str, int | float]:
        """The counters as a plain dict (for run manifests and logs)."""
        return dict(self.__dict__)

    def summary(self) -> str:
        """One human-readable line."""
        return ", ".join(
            f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
            for k, v in self.as_dict().items()
        )


@runtime_checkable
class Judge(Protocol):
    """Batch in, batch out: ``judge(items)`` returns one Verdict per item, in the same order.

    A judge that also has an int attribute ``concurrency`` may be called from many threads at once
    and works on at most that many items at a time over all calls together (e.g. HTTP requests in
    flight); the scheduler then keeps that many of its rows in flight, not one batch at a time.
    """

    judge_id: str
    stats: JudgeStats

    def judge(self, items: Sequence[Item]) -> list[Verdict]: ...


def text_hash(text: str, n: int = 12) -> str:
    """First ``n`` hex digits of the SHA-256 of ``text`` (UTF-8)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:n]


def judge_id(kind: str, parser_version: int, **parts: str | int | float | None) -> str:
    """A stable id such as ``rubric:model=gpt-x:template=1a2b3c4d5e6f:parser=1``.

    ``parts`` are written in the order given; None-valued parts are left out. Ids go into cache
    keys and run manifests, so any setting that changes the judge's output belongs in them.
    """
    if not kind or ":" in kind:
        raise ValueError(f"judge kind must be a non-empty name without ':', got {kind!r}")
    tail = [f"{k}={v}" for k, v in parts.items() if v is not None]
    return ":".join([kind, *tail, f"parser={parser_version}"])


def check_items(items: Sequence[Item]) -> list[Item]:
    """Validate a batch: a sequence of (prompt: str, response: str) pairs. Returns it as a list."""
    if isinstance(items, (str, bytes)):
        raise TypeError("items must be a sequence of (prompt, response) pairs, not a string")
    out = []
    for i, item in enumerate(items):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(
                f"item {i} must be a (prompt, response) pair, got {type(item).__name__}"
            )
        prompt, response = item
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise TypeError(
                f"item {i}: prompt and response must be str, got "
                f"({type(prompt).__name__}, {type(response).__name__}); decode token ids first"
            )
        out.append((prompt, response))
    return out


def fill_template(template: str, prompt: str, response: str) -> str:
    """Replace ``{prompt}`` and ``{response}`` in one pass (so text inside a prompt that looks like
    a placeholder is never substituted). Other braces in the template are left alone."""
    values = {"prompt": prompt, "response": response}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def check_template(template: str, where: str) -> str:
    """Require both placeholders in a judge template; returns it unchanged."""
    missing = [p for p in ("{prompt}", "{response}") if p not in template]
    if missing:
        raise ValueError(f"judge template from {where} lacks placeholder(s) {', '.join(missing)}")
    return template


def strip_thinking(response: str) -> str:
    """The part of a response after its last ``</think>`` (the whole response if none).

    Use before judging responses generated with thinking enabled, so the judge sees the answer.
    """
    head, sep, tail = response.rpartition("</think>")
    return tail.lstrip() if sep else response
