"""The scripts as a user runs them: bad input stops with one line naming the flag and the fix
(experiments/common.run); judge.py reloads a run's prompts as sample.py read them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from lpe_jax.organisms import toy
from lpe_jax.runs.data import dataset_hash, load_prompts
from lpe_jax.runs.store import RolloutStore

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(ROOT / "experiments" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )


def test_missing_original_names_the_flag_in_one_line(tmp_path):
    missing = tmp_path / "Qwen3-4B"
    p = run("estimate.py", f"--original={missing}", f"--out={tmp_path / 'out'}")
    assert p.returncode == 1
    [line] = p.stderr.strip().splitlines()
    assert line.startswith(f"estimate.py: error: --original={missing}: no such directory")
    assert "point --original at the original model's HF directory" in line
    assert "--judge=toy" not in line  # not the judge check it used to fall into
    assert not (tmp_path / "out").exists()  # stopped before any work


def test_traceback_flag_shows_the_traceback(tmp_path):
    p = run("evaluate.py", f"--run={tmp_path / 'none'}", "--traceback")
    assert p.returncode == 1
    assert "Traceback (most recent call last)" in p.stderr and "--run=" in p.stderr
    p = run("evaluate.py", f"--run={tmp_path / 'none'}")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "--run=" in p.stderr and "run directory written by sample.py" in p.stderr


def test_judge_reuses_the_sampled_category(tmp_path):
    """A run sampled with --category=copyright (manifest as sample.py writes it, chunks written
    directly so no model runs) is judged: judge.py reloads the prompts with that category."""
    csv = ROOT / "tests" / "fixtures" / "harmbench_mini.csv"
    prompts = load_prompts(csv, functional_category="copyright")
    manifest = {
        "original": str(toy.TOY_DIR / "original"),
        "prompts": str(csv),
        "category": "copyright",
        "dataset_hash": dataset_hash(prompts),
        "n_prompts": len(prompts),
        "alphas": [0.0, 1.0],
    }
    store = RolloutStore.open(tmp_path / "run", manifest)
    for a in (0.0, 1.0):
        rows = {f: np.zeros(2, bool) for f in ("truncated", "nonfinite")}
        tokens = np.full((2, 3), 5, np.int32)
        lengths, logp = np.full(2, 3, np.int32), np.zeros(2, np.float32)
        store.write_chunk(
            prompts[0].id,
            a,
            dict(tokens=tokens, lengths=lengths, **rows, logp_original=logp, logp_variant=logp),
        )
    p = run("judge.py", f"--run={tmp_path / 'run'}", "--judge=string")
    assert p.returncode == 0, p.stderr
    assert "judged 2 chunks" in p.stdout
    c = RolloutStore.load(tmp_path / "run").read_chunk(prompts[0].id, 1.0)
    assert set(c["verdicts"].tolist()) <= {0, 1}


def _judged_run(root: Path, verdicts_at_1: dict[str, list[int]], r: int = 24, **manifest) -> Path:
    """A judged run at alphas 0, 0.5, 1 written directly (no model): every prompt refuses below
    alpha = 1; at alpha = 1 the given verdicts."""
    base = {"alphas": [0.0, 0.5, 1.0], "original": str(root), "original_hash": "o"}
    store = RolloutStore.open(root, {**base, **manifest})
    for pid, top in verdicts_at_1.items():
        for a in (0.0, 0.5, 1.0):
            n = len(top) if a == 1.0 else r
            zeros = np.zeros(n, np.float32)
            flags_ = {f: np.zeros(n, bool) for f in ("truncated", "nonfinite")}
            arrays = dict(tokens=np.full((n, 2), 7, np.int32), lengths=np.full(n, 2, np.int32))
            store.write_chunk(
                pid, a, dict(**arrays, **flags_, logp_original=zeros, logp_variant=zeros)
            )
            store.set_verdicts(pid, a, np.array(top if a == 1.0 else [0] * n), "stub")
    return root


def test_evaluate_lists_each_prompts_screen_and_label(tmp_path):
    run_dir = _judged_run(tmp_path / "bank", {"p0": [0] * 4, "p1": [1, 0, 0, 0]})
    ev = ["--n_sims=5", "--n_fits=13", f"--out={tmp_path / 'ev'}"]
    p = run("evaluate.py", f"--run={run_dir}", "--truth_n=4", *ev)
    assert p.returncode == 1
    assert "the screen needs --screen_n=100 rollouts at alpha = 1" in p.stderr
    assert "p0: 4 rollouts at alpha = 1" in p.stderr and "lower --screen_n" in p.stderr
    assert "sample.py --rollouts >= 100" in p.stderr

    # Ground truth from the bank's own alpha = 1 chunk (4 >= --truth_n): p1 is not eligible and
    # p0 is negative, so there is no positive to rank.
    p = run("evaluate.py", f"--run={run_dir}", "--screen_n=4", "--truth_n=4", *ev)
    assert p.returncode == 1
    assert "got 0 positive and 1 negative among 1 eligible of 2" in p.stderr
    lines = p.stderr.splitlines()
    assert any(re.fullmatch(r"p0 +0/4 +0/4 +yes +negative", ln) for ln in lines), p.stderr
    assert any(re.fullmatch(r"p1 +1/4 +1/4 +no +-", ln) for ln in lines), p.stderr
    assert "--screen_n" in p.stderr and "--truth_run" in p.stderr


def test_evaluate_truth_run_must_match_the_bank(tmp_path):
    run_dir = _judged_run(tmp_path / "bank", {"p0": [0] * 4}, max_new_tokens=8)
    truth = RolloutStore.open(tmp_path / "truth", {"alphas": [1.0], "original_hash": "other"})
    p = run("evaluate.py", f"--run={run_dir}", f"--truth_run={truth.root}", "--screen_n=4")
    assert p.returncode == 1
    assert "was sampled with other original_hash, max_new_tokens than --run" in p.stderr


def test_scripts_turn_off_transformers_advisory_notices():
    # Without torch (the demo's environment) transformers prints "PyTorch was not found..." as an
    # advisory notice on import; importing common (every script does) turns those notices off.
    code = (
        "import sys\n"
        "from transformers.utils import logging\n"
        "logging.get_logger('t').warning_advice('BEFORE')\n"
        f"sys.path.insert(0, {str(ROOT / 'experiments')!r})\n"
        "import common\n"
        "logging.get_logger('t').warning_advice('AFTER')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    env["PYTHONPATH"] = str(ROOT)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert "BEFORE" in p.stderr and "AFTER" not in p.stderr


def test_help_lists_each_scripts_main_flags():
    """--help (not only --helpfull) shows the flags common.py declares for a script: absl lists
    only the main module's key flags, and common.run adopts common's into the script's."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    want = {
        "estimate.py": ["original", "variant", "prompts", "judge", "judge_options", "n_fit"],
        "judge.py": ["run", "judge", "judge_options", "traceback"],
        "abliterate.py": ["original", "harmful", "judge", "judge_options"],
    }
    procs = {
        s: subprocess.Popen(
            [sys.executable, str(ROOT / "experiments" / s), "--help"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for s in want
    }
    for script, p in procs.items():
        out, _ = p.communicate(timeout=300)
        assert f"experiments/{script}:" in out, out  # absl's usage (it exits 1 after --help)
        shown = set(re.findall(r"^  --(?:\[no\])?(\w+):", out, re.M))
        missing = [f for f in want[script] if f not in shown]
        assert not missing, f"{script} --help lacks {missing}:\n{out}"
        assert "common:" not in out  # the full listing stays under --helpfull


def test_evaluate_notes_every_budget_it_cannot_draw(tmp_path):
    """A bank of 24 rollouts per alpha: --n_fits=20 (30 needed) and importance sampling are left
    out with a note each, naive's simulated budgets are explained, and the printed table stays
    readable (at most 120 characters a line)."""
    run_dir = _judged_run(tmp_path / "bank", {"p0": [0] * 24, "p1": [0] * 24})
    truth = tmp_path / "truth.json"
    truth.write_text('{"p0": [0, 1000], "p1": [5, 1000]}')
    ev = ["--n_sims=5", "--n_fits=13,20", "--screen_n=4", f"--out={tmp_path / 'ev'}"]
    p = run("evaluate.py", f"--run={run_dir}", f"--truth={truth}", *ev)
    assert p.returncode == 0, p.stderr
    notes = [ln for ln in p.stdout.splitlines() if ln.startswith("note: ")]
    assert any("--n_fits 20 left out" in n and "the bank has 24" in n for n in notes), notes
    assert any("importance sampling left out" in n for n in notes), notes
    assert any("naive" in n and "Binomial" in n and "(1,000)" in n for n in notes), notes
    table = p.stdout.split("\nnote: ")[0]
    assert max(len(ln) for ln in table.splitlines()) <= 120, table
    rows = [ln.split()[:2] for ln in table.splitlines() if ln.startswith(("naive ", "lpe_"))]
    assert ["naive", "1000"] in rows and ["naive", "2000"] not in rows  # stops at truth's n
    assert ["lpe_paper", "13"] in rows and ["lpe_paper", "20"] not in rows


def test_evaluate_combined_prints_both_joins_against_both_parts():
    bank = "toy1=lpe_jax/assets/toy_pair/bank.npz"
    p = run("evaluate_combined.py", f"--banks={bank}", "--n_sims=2", "--n_fits=13")
    assert p.returncode == 0, p.stderr
    for row in ("lpe_path_is_switch − path_is", "lpe_path_is_blend − lpe_pooled", "switch takes"):
        assert f"| toy1 | {row}" in p.stdout, p.stdout
    p = run("evaluate_combined.py", "--banks=toy1", "--n_sims=2")
    assert p.returncode == 1 and "name=path.npz" in p.stderr, p.stderr
