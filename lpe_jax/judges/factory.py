"""``make_judge(kind, **options)``: build any judge from plain values (e.g. absl flags).

Kinds and their options:

- ``rubric``: the ``RubricJudge`` arguments (base_url, model, api_key_env, template_path,
  threshold, cache_path, max_concurrency, timeout_s, max_retries, ...).
- ``string``: phrases (list) or phrases_path (file, one per line), window.
- ``local``: checkpoint (a model directory: loads weights and tokenizer; imports JAX) or
  logits_fn + tokenizer; plus the ``LocalJudge`` keyword arguments.
- ``rule``: predicate (callable str -> bool) or pattern (regex; complied = it matches) with
  ignore_case, and name.

An option the kind does not take is an error naming the ones it does (``judge_options(kind)``).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from lpe_jax.judges.base import Judge
from lpe_jax.judges.rubric import RubricJudge
from lpe_jax.judges.rule import RuleJudge
from lpe_jax.judges.string_match import StringMatchJudge

JUDGE_KINDS = ("rubric", "string", "local", "rule")


def _local_options() -> list[str]:
    from lpe_jax.judges.local import LocalJudge

    own = [n for n in inspect.signature(LocalJudge).parameters if n not in ("self",)]
    return ["checkpoint", "dtype", *own]


def judge_options(kind: str) -> list[str]:
    """Names of the options ``make_judge(kind, ...)`` accepts."""
    if kind == "rubric":
        return list(inspect.signature(RubricJudge).parameters)
    if kind == "string":
        return ["phrases", "phrases_path", "window"]
    if kind == "local":
        return _local_options()
    if kind == "rule":
        return ["predicate", "pattern", "ignore_case", "name"]
    raise ValueError(f"unknown judge kind {kind!r}; choose one of {list(JUDGE_KINDS)}")


def make_judge(kind: str, **options: Any) -> Judge:
    """A judge of ``kind`` (one of JUDGE_KINDS) from ``options`` (see the module docstring)."""
    allowed = judge_options(kind)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"judge kind {kind!r} takes no option(s) {unknown}; it takes {allowed}")
    if kind == "rubric":
        missing = [k for k in ("base_url", "model") if not options.get(k)]
        if missing:
            raise ValueError(
                f"judge kind 'rubric' needs {missing}: the OpenAI-compatible endpoint and the "
                "judge model, e.g. base_url='http://127.0.0.1:8000/v1', model='Qwen/Qwen3-8B' "
                '(from the scripts: --judge_options=\'{"base_url": ..., "model": ...}\')'
            )
        return RubricJudge(**options)
    if kind == "string":
        return _make_string(**options)
    if kind == "rule":
        return _make_rule(**options)
    return _make_local(**options)


def _make_string(phrases: Any = None, phrases_path: Any = None, window: int | None = None) -> Judge:
    if phrases is not None and phrases_path is not None:
        raise ValueError("string judge: pass phrases or phrases_path, not both")
    if phrases_path is not None:
        return StringMatchJudge.from_file(phrases_path, window=window)
    return StringMatchJudge(phrases, window=window)


def _make_rule(
    predicate: Any = None, pattern: str | None = None, ignore_case: bool = False, name: Any = None
) -> Judge:
    if (predicate is None) == (pattern is None):
        raise ValueError("rule judge: pass exactly one of predicate (str -> bool) or pattern")
    if pattern is not None:
        if name is not None:
            raise ValueError("rule judge: name is derived from pattern; pass it with predicate")
        return RuleJudge.from_pattern(pattern, ignore_case=ignore_case)
    return RuleJudge(predicate, name=name)


def _make_local(checkpoint: Any = None, dtype: str = "float32", **kwargs: Any) -> Judge:
    from lpe_jax.judges.local import LocalJudge

    has_fn = kwargs.get("logits_fn") is not None
    if (checkpoint is not None) == has_fn:
        raise ValueError("local judge: pass exactly one of checkpoint (a model dir) or logits_fn")
    if has_fn:
        if kwargs.get("tokenizer") is None:
            raise ValueError("local judge: logits_fn needs tokenizer too")
        return LocalJudge(**kwargs)
    if kwargs.pop("logits_fn", None) is not None or kwargs.pop("tokenizer", None) is not None:
        raise ValueError("local judge: checkpoint brings its own tokenizer; do not pass one")
    from transformers import AutoTokenizer

    from lpe_jax import load_model

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    kwargs.setdefault("model_name", Path(checkpoint).resolve().name)
    return LocalJudge.from_model(load_model(str(checkpoint), dtype=dtype), tokenizer, **kwargs)
