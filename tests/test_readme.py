"""The README's toy blocks, run as written from a fresh copy of the checkout (one slow e2e test).

Every ```bash and ```python block of README.md is preceded by a marker line:

    <!-- readme-test: run -->              run as written
    <!-- readme-test: reduced: <why> -->   run with this file's REDUCED substitutions (each must
                                           find its text), for a block too long for CI
    <!-- readme-test: skip: <why> -->      not run here, for the reason the README gives

A block without a marker fails the test, so a new block is either run or excused where a reader
sees it. The blocks run in README order in one scratch copy of the tracked files (`git ls-files`:
what a fresh clone has), bash blocks with `bash -e`, python blocks as `python -` from the copy's
root, with `python` on PATH being this interpreter (the activated .venv the README asks for) and
the copy's lpe_jax imported (as from `pip install -e .` in it), JAX_PLATFORMS unset as in a
user's shell, and umask 022.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARK = re.compile(r"<!-- readme-test: (run|reduced|skip)(?:: (.+?))? -->\n```(bash|python)\n")
BLOCK = re.compile(r"```(bash|python)\n(.*?)\n```", re.S)
FULL_GRID = ",".join(f"{0.05 * i:.2f}".rstrip("0").rstrip(".") for i in range(21))
# Substitutions for the `reduced` blocks (each must be found in some reduced block, and each
# reduced block must use one). The toy bank's remake samples 32 prompts x 21 alphas x 120
# rollouts (minutes on 2 cores): the test keeps its commands and flags but samples 4 prompts at 3
# alphas (enough for both labels), 100 rollouts each (the screen's 100; n_fit 100 is then left
# out, with a note). The second organism's main job estimates 6 of its 24 prompts: every prompt
# runs the same code, and drawing 24 is most of the block's CPU time. The toy bank's evaluation
# runs 100 of its 500 simulations (the pooled fits of every simulation are its CPU time).
REDUCED = {
    f"--alphas={FULL_GRID}": "--alphas=0,0.5,1",
    "--rollouts=120 --out=runs/toy_bank": "--rollouts=100 --limit=4 --out=runs/toy_bank",
    "--rollouts=1000 --out=runs/toy_mixture": "--rollouts=100 --limit=4 --out=runs/toy_mixture",
    "--limit=24 --n_fit=30 --max_new_tokens=24": "--limit=6 --n_fit=30 --max_new_tokens=24",
    "--out=results/toy_evaluation": "--n_sims=100 --out=results/toy_evaluation",
}


def readme_blocks() -> list[tuple[str, str | None, str, str]]:
    """(mode, reason, language, code) of every bash/python block, in README order."""
    text = (ROOT / "README.md").read_text()
    marked = {m.end(): m for m in MARK.finditer(text)}
    blocks = []
    for b in BLOCK.finditer(text):
        m = marked.get(b.start() + len(f"```{b.group(1)}\n"))
        line = text.count("\n", 0, b.start()) + 1
        assert m is not None, f"README.md line {line}: a ```{b.group(1)} block without a marker"
        blocks.append((m.group(1), m.group(2), b.group(1), b.group(2)))
    return blocks


def fresh_copy(dest: Path) -> Path:
    """The checkout's tracked files under dest (what `git clone` gives)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to copy its tracked files")
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def test_readme_blocks_are_marked():
    blocks = readme_blocks()
    modes = [mode for mode, *_ in blocks]
    assert modes.count("run") + modes.count("reduced") >= 5 and modes.count("run") >= 2
    assert all(reason for mode, reason, *_ in blocks if mode != "run")


def test_readme_toy_blocks_run_as_written(tmp_path):
    repo = fresh_copy(tmp_path / "lpe_jax")
    # `python` is this interpreter: its bin directory first on PATH, as `source activate` does
    # (a symlink elsewhere would lose the virtual environment, found beside the invoked path).
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "python").exists():
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "python").symlink_to(sys.executable)
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    # The copy is the checkout a user installed (`pip install -e .`): its lpe_jax is imported,
    # not the one this environment's editable install points at.
    env["PYTHONPATH"] = str(repo)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    outputs, substituted = [], set()
    for mode, _, lang, code in readme_blocks():
        if mode == "skip":
            continue
        if mode == "reduced":
            found = [old for old in REDUCED if old in code]
            assert found, f"a reduced README block uses none of REDUCED:\n{code}"
            for old in found:
                code = code.replace(old, REDUCED[old])
            substituted.update(found)
        argv = ["bash", "-e", "-c", code] if lang == "bash" else ["python", "-"]
        start, cpu = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
        p = subprocess.run(
            argv,
            input=code if lang == "python" else None,
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            umask=0o022,
        )
        used = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_s = used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime
        print(f"{time.monotonic() - start:6.1f}s wall {cpu_s:6.1f}s cpu  {code[:60]!r}")
        assert p.returncode == 0, f"{code}\n{p.stdout[-3000:]}\n{p.stderr[-4000:]}"
        assert "Unable to initialize backend" not in p.stderr, p.stderr[-2000:]
        outputs.append(p.stdout)

    missing = set(REDUCED) - substituted
    assert not missing, f"the README no longer says {missing}; update REDUCED"
    # The second organism's recipe: the twin, its direction, the main job's files, umask kept.
    lpe = repo / "results/toy2_lpe_abliterated"
    assert (repo / "results/toy2_abliterated/refusal_direction.npy").is_file()
    assert json.loads((lpe / "results.json").read_text())["prompts"]
    assert sorted(p.name for p in (lpe / "figures").glob("h00*.png"))[:2] == [
        "h000.png",
        "h001.png",
    ]
    for f in (lpe / "results.json", lpe / "manifest.json", repo / "runs/toy_bank/manifest.json"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    # The shipped toy bank, evaluated (100 simulations): a readable table, notes, the figure.
    evaluation = repo / "results/toy_evaluation"
    assert stat.S_IMODE((evaluation / "evaluation.json").stat().st_mode) == 0o644
    assert (evaluation / "fig1_auroc.png").is_file()
    [shipped] = [out for out in outputs if "toy organism's bank" in out]
    table = shipped[shipped.index("\nmethod ") : shipped.index("\nnote: ")]
    assert "lpe_pooled" in table and max(len(ln) for ln in table.splitlines()) <= 120
    assert "note: naive at k rollouts is simulated" in shipped
    # Its remake, reduced: 100 rollouts per alpha leave out n_fit 100, and say so.
    remade = outputs[-1]
    assert "note: --n_fits 100 left out" in remade, remade
    assert (repo / "lpe_jax/assets/toy_pair/bank.npz").stat().st_size > 0
