"""Judges: decide whether a response complies with a prompt. Batch in, one Verdict per item out.

``complied`` is True / False, or None when the judge could not decide (never a silent refusal).
Kinds: RubricJudge (LLM over an OpenAI-compatible endpoint, cached), StringMatchJudge (refusal
phrases), LocalJudge (a local model's yes/no logits; ``lpe_jax.judges.local``), RuleJudge (a
predicate). ``make_judge(kind, **options)`` builds any of them. Nothing here imports JAX.
"""

from lpe_jax.judges.base import Judge, JudgeStats, Verdict, judge_id, strip_thinking
from lpe_jax.judges.cache import VerdictCache
from lpe_jax.judges.factory import JUDGE_KINDS, judge_options, make_judge
from lpe_jax.judges.local import LocalJudge
from lpe_jax.judges.rubric import DEFAULT_TEMPLATE as RUBRIC_TEMPLATE
from lpe_jax.judges.rubric import RubricJudge, parse_rubric, rubric_score
from lpe_jax.judges.rule import RuleJudge
from lpe_jax.judges.string_match import REFUSAL_PHRASES, StringMatchJudge

__all__ = [
    "JUDGE_KINDS",
    "REFUSAL_PHRASES",
    "RUBRIC_TEMPLATE",
    "Judge",
    "JudgeStats",
    "LocalJudge",
    "RubricJudge",
    "RuleJudge",
    "StringMatchJudge",
    "Verdict",
    "VerdictCache",
    "judge_id",
    "judge_options",
    "make_judge",
    "parse_rubric",
    "rubric_score",
    "strip_thinking",
]
