"""Bad input stops a script with one line naming the flag and the fix (experiments/common.run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
