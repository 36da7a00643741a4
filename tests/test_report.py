"""The main job's table marks what is not an estimate and fits its data
(lpe_jax.evaluation.report)."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import numpy as np

from lpe_jax.estimators import importance, naive
from lpe_jax.estimators.binomial import fit_trace_binomial
from lpe_jax.estimators.lpe import LPEStep, adaptive_draws, fit_paper
from lpe_jax.estimators.pooled import fit_pooled
from lpe_jax.evaluation import report


def _result(pid: str, rate_at, log_w: np.ndarray, is_v: np.ndarray, naive_v: np.ndarray) -> dict:
    """One prompt's result dict as estimate.py builds it, from real estimator outputs."""
    rng = np.random.default_rng(0)
    trace = adaptive_draws(lambda a, n: int(rng.binomial(n, rate_at(a))), 20)
    paper, binom = fit_paper(trace), fit_trace_binomial(trace)
    return {
        "id": pid,
        "lpe": dataclasses.asdict(paper),
        "lpe_binomial": {
            "estimate": binom.estimate,
            "lower": binom.lower,
            "upper": binom.upper,
            "degenerate": binom.fit.degenerate,
            "status": binom.fit.status,
        },
        "is": dataclasses.asdict(importance.importance_sampling(log_w, is_v)),
        "naive": dataclasses.asdict(naive.naive_estimate(naive_v)),
        "rollouts": paper.rollouts,
    }


def _results() -> list[dict]:
    ones, zeros = np.ones(20, np.int8), np.zeros(20, np.int8)
    healthy = _result(
        "dimethylmercury_instructions_home",  # a long HarmBench id
        lambda a: min(0.9, 10 ** (-4 * a)),  # log-linear path: a real fit
        np.full(20, -8.0),
        np.r_[np.ones(4), np.zeros(16)].astype(np.int8),
        zeros,
    )
    # Complies everywhere: not rare at all (>= 0.5 at the top of the grid), while naive reads
    # 20/20 and IS (log-weights above 0) exceeds 1.
    always = _result("x", lambda a: 1.0, np.full(20, 0.5), ones, ones)
    return [healthy, always]


def test_statuses_and_is_above_one_are_marked():
    healthy, always = _results()
    zeros = np.zeros(20, np.int8)
    never = _result("never", lambda a: 0.0, np.full(20, -1.0), zeros, zeros)
    assert always["lpe"]["status"] == always["lpe_binomial"]["status"] == "not_rare"
    assert never["lpe"]["status"] == never["lpe_binomial"]["status"] == "no_compliant"
    assert always["is"]["estimate"] > 1 and healthy["lpe"]["status"] == "ok"
    text = report.table([healthy, always, never], {"x": 0.5})
    rows = {line.split()[0]: line for line in text.splitlines()}
    assert "1.0e+00+" in rows["x"] and "1.0e+00 [0, 1.0e+00]+" in rows["x"]
    assert "1.6e+00!" in rows["x"] and "20/20" in rows["x"]
    assert "1.0e-06_" in rows["never"] and "[0, 1.4e-01]_" in rows["never"]  # both LPE columns
    long_id = "dimethylmercury_instructions_home"
    assert not any(s in rows[long_id][len(long_id) :] for s in "*+_!^~")
    legend = [line.split()[0] for line in text.splitlines()[-3:]]
    assert legend == ["+", "!", "_"]
    assert "not rare" in text and "not a probability" in text and "upper bound" in text
    # No compliant rollout among a few hundred says nothing about safety at 1e-6: the legend
    # calls the value the fallback, neither an estimate nor a bound.
    [none] = [line for line in text.splitlines() if line.lstrip().startswith("_ ")]
    assert "not an estimate and not a bound" in none and "no evidence" in none
    assert "risky" not in none
    # Only the marks some row carries are explained.
    assert report.STATUS_MARKS["one_point"].meaning not in text
    assert report.FALLBACK.meaning not in report.table([healthy])


def test_columns_are_as_wide_as_their_data():
    results = _results()
    lines = report.table(results).splitlines()
    head, rows = lines[0], lines[2:4]
    assert head.startswith("prompt" + " " * (len("dimethylmercury_instructions_home") - 4))
    assert len({len(line) for line in (head, *rows)}) == 1  # one width for every line
    # Numbers end at one position in each column, marked or not (marks get their own slot).
    for get in (lambda r: r["lpe"]["estimate"], lambda r: r["is"]["estimate"]):
        ends = set()
        for r, row in zip(results, rows, strict=True):
            num = report.fmt_rate(get(r))
            ends.add(row.index(num, len(r["id"])) + len(num))
        assert len(ends) == 1, rows
    assert "truth" not in head  # no ground truth, no truth column


def test_a_new_column_is_one_entry():
    status = report.Mark("#", "not rare: complied in the screen")
    cols = [
        *report.estimate_columns(),
        report.Column("status", lambda r: report.Cell("rare", (status,) if r["id"] == "x" else ())),
    ]
    text = report.table(_results(), columns=cols)
    assert text.splitlines()[0].endswith("status")
    assert text.splitlines()[-1] == "  #  not rare: complied in the screen"


def test_scores_count_decades_and_coverage():
    healthy, always = _results()
    truth = {"dimethylmercury_instructions_home": 1e-4, "x": 0.5}
    s = report.scores([healthy, always], truth)
    assert s["prompts_with_truth"] == 2
    assert s["naive"]["zero_estimates"] == 1  # 0/20 for the healthy prompt
    expect = sum(
        abs(math.log10(r["lpe_binomial"]["estimate"]) - math.log10(truth[r["id"]])) <= 1
        for r in (healthy, always)
    )
    assert s["lpe_binomial"]["within_one_decade"] == expect
    assert "lpe_binomial " + f"{expect}/2" in report.score_lines(s)


def test_pooled_column_once_every_prompt_has_it():
    healthy, always = _results()
    traces = [[LPEStep(**s) for s in r["lpe"]["trace"]] for r in (healthy, always)]
    for r, p in zip((healthy, always), fit_pooled(traces).prompts, strict=True):
        r["lpe_pooled"] = {"estimate": p.estimate, "lower": p.lower, "upper": p.upper}
        r["lpe_pooled"]["status"] = p.status
    text = report.table([healthy, always])
    rows = {line.split()[0]: line for line in text.splitlines()}
    assert "pooled LPE [95%]" in text.splitlines()[0]
    assert rows["x"].count("1.0e+00 [0, 1.0e+00]+") == 2  # binomial and pooled: not rare
    truth = {"dimethylmercury_instructions_home": 1e-4, "x": 0.5}
    s = report.scores([healthy, always], truth)
    assert "pooled 95% interval covers the truth" in report.score_lines(s)
    assert s["lpe_pooled"]["interval_covers_truth"] == 1 + (
        healthy["lpe_pooled"]["lower"] <= 1e-4 <= healthy["lpe_pooled"]["upper"]
    )
    # A results file without it (one prompt lacks it): no column, not scored.
    del always["lpe_pooled"]
    assert "pooled" not in report.table([healthy, always])
    assert "lpe_pooled" not in report.scores([healthy, always], truth)


def test_report_imports_no_jax():
    code = (
        "import sys, lpe_jax.evaluation.report\n"
        "assert 'jax' not in sys.modules, sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_mostly_unknown_is_no_data_in_every_column_and_left_out_of_the_scores():
    """A judge that failed on most of a prompt's draws: no estimate anywhere (not the 'no
    compliant rollout' fallback), its unknown verdicts counted, the prompt left out of the
    scores with the count said."""
    healthy, _ = _results()
    unknown = np.full(20, -1, np.int8)
    rng = np.random.default_rng(1)
    trace = adaptive_draws(lambda a, n: (0, None, int(rng.integers(0, n // 2))), 20)
    paper, binom = fit_paper(trace), fit_trace_binomial(trace)
    dead = {
        **_result("dead", lambda a: 0.0, np.zeros(20), unknown, unknown),
        "lpe": dataclasses.asdict(paper),
        "lpe_binomial": {
            "estimate": binom.estimate,
            "lower": 0.0,
            "upper": 1.0,
            "status": binom.status,
        },
        "unknown": {"lpe": sum(s.n - s.n_judged for s in trace), "is": 20, "naive": 20},
    }
    results = [healthy, dead]
    results[0]["unknown"] = {"lpe": 0, "is": 0, "naive": 0}
    for r, p in zip(
        results,
        fit_pooled([[LPEStep(**x) for x in healthy["lpe"]["trace"]], trace]).prompts,
        strict=True,
    ):
        r["lpe_pooled"] = {
            "estimate": p.estimate,
            "lower": p.lower,
            "upper": p.upper,
            "status": p.status,
        }
    for m in ("lpe", "lpe_binomial", "lpe_pooled", "is", "naive"):
        assert dead[m]["status"] == "no_data", m
    text = report.table(results)
    row = next(x for x in text.splitlines() if x.startswith("dead"))
    assert row.count("?") == 5 and "e-0" not in row  # no number stands as an estimate
    assert row.split()[-1] == str(sum(dead["unknown"].values()))
    assert report.STATUS_MARKS["no_data"].meaning in text
    s = report.scores(results, {"dimethylmercury_instructions_home": 1e-4, "dead": 1e-5})
    assert s["prompts_with_truth"] == 1 and s["left_out_no_data"] == 1
    assert "1 left out: mostly unknown verdicts" in report.score_lines(s)


def test_mixture_is_on_few_effective_compliant_rows_is_marked():
    """A mixture-IS estimate carried by < 10 effective compliant rows (one heavy weight among
    many: the long-reply regime) gets the mark and its legend; a spread-free one does not."""
    healthy, _ = _results()
    c = np.r_[np.ones(40), np.zeros(60)].astype(np.int8)
    rows = {}
    for pid, lw in (("tame", np.zeros(100)), ("heavy", np.r_[12.0, np.zeros(99)])):
        res = importance.importance_sampling(lw, c)
        hit = importance.importance_sampling(lw[c == 1], np.ones(40, bool))
        rows[pid] = {**healthy, "id": pid}
        rows[pid]["mixture_is"] = {**dataclasses.asdict(res), "ess_estimate": hit.ess}
    assert rows["heavy"]["mixture_is"]["ess_estimate"] < report.MIN_MIXTURE_ESS
    text = report.table(list(rows.values()))
    lines = {line.split()[0]: line for line in text.splitlines()}
    assert "#" in lines["heavy"][len("heavy") :] and "#" not in lines["tame"][len("tame") :]
    assert report.LOW_MIXTURE_ESS.meaning in " ".join(text.split())
    assert report.LOW_MIXTURE_ESS.meaning not in " ".join(report.table([rows["tame"]]).split())


def test_mixture_ess_note_names_prompts_on_few_effective_compliant_rows():
    """evaluate.py's note: a prompt whose compliant rows are one heavy weight among many counts;
    an even one, one with no compliant row, and unknown rows do not."""
    c = np.r_[np.ones(40), np.zeros(59), -1].astype(np.int8)
    even, heavy = np.zeros(100), np.r_[12.0, np.zeros(99)]
    none = np.zeros(100, np.int8)
    note = report.mixture_ess_note(np.stack([even, heavy, even]), np.stack([c, c, none]))
    assert note is not None and note.startswith("mixture IS: 1 of 3 prompts have fewer than 10")
    assert report.mixture_ess_note(np.stack([even, even]), np.stack([c, c])) is None
