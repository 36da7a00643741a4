"""End to end on the toy organism: sample.py, judge.py and evaluate.py as a user runs them.

Covers: sample -> judge -> evaluate; a run interrupted between chunks (chunks missing, a torn
temp file left behind) resumes to exactly the uninterrupted store; a manifest mismatch is refused;
a 2-process jax.distributed run (real processes) writes the same store as one process. The
one-process runs call the scripts in this process (tests/script_main.py: the same module, flags
and exit codes, without a JAX import and retracing per run); estimate.py's tests are in
tests/test_experiments_estimate.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from script_main import run_script as run
from script_main import run_two_processes

from lpe_jax.runs.store import RolloutStore

SAMPLE_FLAGS = ["--limit=4", "--alphas=0,0.5,1", "--rollouts=24", "--max_rows=64"]


def store_arrays(root: Path) -> dict[tuple[str, float], dict[str, np.ndarray]]:
    store = RolloutStore.load(root)
    return {c: store.read_chunk(*c) for c in store.chunks()}


def assert_same_store(a: Path, b: Path) -> None:
    sa, sb = store_arrays(a), store_arrays(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].keys() == sb[key].keys(), key
        for field in sa[key]:
            np.testing.assert_array_equal(sa[key][field], sb[key][field], err_msg=f"{key} {field}")
    assert json.loads((a / "manifest.json").read_text()) == json.loads(
        (b / "manifest.json").read_text()
    )


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "ref"
    run("sample.py", f"--out={out}", *SAMPLE_FLAGS)
    return out


def test_sample_writes_every_chunk(reference_run):
    chunks = list(RolloutStore.load(reference_run).chunks())
    assert len(chunks) == 4 * 3
    c = RolloutStore.load(reference_run).read_chunk(*chunks[0])
    assert c["tokens"].shape[0] == 24 and (c["lengths"] > 0).all()
    # every row's log-probability under its own sampler, <= 0 (path IS reads it)
    assert c["logp_sampled"].dtype == np.float32 and (c["logp_sampled"] <= 0).all()


def test_interrupted_run_resumes_to_the_same_store(reference_run, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(reference_run, out)
    chunks = sorted((out / "chunks").rglob("a*.npz"))
    # A kill between chunks leaves some chunks unwritten and possibly a temp file mid-write.
    for f in chunks[::3]:
        f.unlink()
    (chunks[1].parent / ".a0.500000.npz.123.tmp").write_bytes(b"torn")
    p = run("sample.py", f"--out={out}", *SAMPLE_FLAGS)
    assert f"{len(chunks[::3])} new chunks" in p.stdout
    for tmp in out.rglob("*.tmp"):
        tmp.unlink()  # stray temp files are never read as chunks
    assert_same_store(reference_run, out)


def test_rerun_with_other_settings_is_refused(reference_run, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(reference_run, out)
    p = run("sample.py", f"--out={out}", *SAMPLE_FLAGS, "--seed=1", check=False)
    assert p.returncode != 0
    assert "holds another run" in p.stderr and "seed" in p.stderr


def test_bad_inputs_are_named(tmp_path):
    p = run("sample.py", f"--out={tmp_path / 'x'}", "--alphas=0,1.5", check=False)
    assert p.returncode != 0 and "alpha" in p.stderr and "[0" in p.stderr
    missing = tmp_path / "none.jsonl"
    p = run("sample.py", f"--out={tmp_path / 'y'}", f"--prompts={missing}", check=False)
    assert p.returncode != 0 and "none.jsonl" in p.stderr
    blocker = tmp_path / "file"
    blocker.write_text("")
    p = run("sample.py", f"--out={blocker / 'run'}", "--limit=1", check=False)
    assert p.returncode != 0 and "writable" in p.stderr


def test_a_pair_too_large_for_the_device_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """A device that reports a memory limit below the two models' weights (from their configs):
    refused naming both sizes and the limit before any weight is read or any file written."""
    from lpe_jax.decoding import memory
    from lpe_jax.model.checkpoint import model_config, read_config
    from lpe_jax.organisms.toy import TOY_DIR
    from lpe_jax.runs import pipeline

    monkeypatch.setattr(memory, "device_limit_bytes", lambda device: 3 * 2**19)
    read = []
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: read.append(a))
    p = run("sample.py", f"--out={tmp_path / 'run'}", "--limit=1", check=False)
    assert p.returncode != 0 and not read, p.stderr[-2000:]
    both = [
        memory.param_bytes_per_device(model_config(read_config(TOY_DIR / d)), "float32", (1, 1, 1))
        for d in ("original", "variant")
    ]
    assert sum(both) > 3 * 2**19 > max(both)  # each model alone would fit: the pair is refused
    sizes = " + ".join(memory.format_bytes(b) for b in both)
    assert f"weights alone take {sizes} per device on mesh (1, 1, 1)" in p.stderr, p.stderr[-2000:]
    assert "more than a device's 1.50 MiB; nothing was read" in p.stderr
    assert not list((tmp_path / "run").glob("chunks/**/*.npz"))


def test_two_process_run_matches_one_process(reference_run, tmp_path):
    out = tmp_path / "multi"
    for so in run_two_processes("sample.py", f"--out={out}", *SAMPLE_FLAGS):
        assert "sampled 2 prompts" in so  # each process took its half of the 4 prompts
    assert_same_store(reference_run, out)


def test_judge_then_evaluate(tmp_path):
    # The reference run's 4 prompts (1 positive, 3 negative on the toy), alphas and engine size
    # (its compiled programs come from the run's XLA cache), at the screen's 100 rollouts: the
    # smallest bank evaluate.py takes with both labels.
    out = tmp_path / "bank"
    flags = [f for f in SAMPLE_FLAGS if not f.startswith("--rollouts=")]
    run("sample.py", f"--out={out}", *flags, "--rollouts=100")
    p = run("judge.py", f"--run={out}")
    assert " 0 unknown verdicts" in p.stdout
    c = RolloutStore.load(out).read_chunk(*next(RolloutStore.load(out).chunks()))
    assert set(np.unique(c["verdicts"])) <= {0, 1}
    again = run("judge.py", f"--run={out}")  # everything judged: nothing to redo
    assert " 0 unknown verdicts" in again.stdout
    ev = tmp_path / "ev"
    p = run("evaluate.py", f"--run={out}", "--n_sims=20", "--n_fits=13,30", f"--out={ev}")
    assert "lpe_paper" in p.stdout and "naive" in p.stdout
    assert (ev / "fig1_auroc.png").stat().st_size > 0
    result = json.loads((ev / "evaluation.json").read_text())
    assert result["n_positive"] > 0 and result["n_negative"] > 0
