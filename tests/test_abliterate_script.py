"""experiments/abliterate.py as a user runs it, and the bad inputs it must name.

One end-to-end run on a tiny tied checkpoint with a Qwen3-style template (~30 s on 2 cores,
most of it compiling), as a process; the failing runs stop before any model is loaded, and run in
this process (tests/script_main.py: the same module, flags, exit status and log lines, without a
process's ~4 s of imports each).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hf_fixtures import make_tokenizer
from script_main import run_main

from lpe_jax.abliteration import abliterate as ab
from lpe_jax.abliteration.orthogonalize import (
    DIRECTION_FILE,
    PROVENANCE_FILE,
    check_output_dir,
    write_abliterated,
)
from lpe_jax.model.checkpoint import checkpoint_fingerprint, load_model
from lpe_jax.runs import data

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "abliterate.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )


@pytest.fixture(scope="module")
def setup(hf_checkpoint, tmp_path_factory):
    """An untied 3-layer checkpoint with tokenizer files, and prompt files in two formats.
    (Untied, so the abliterated model reuses the original's compiled passes; tied sources are
    covered in test_abliterate_exact.py.)"""
    root = tmp_path_factory.mktemp("abl_script")
    src = root / "src"
    shutil.copytree(hf_checkpoint(num_layers=3), src)
    make_tokenizer(src, words=80, generation_eos=[2, 0])
    rng = np.random.default_rng(0)

    def text(lo: int, hi: int) -> str:
        return " ".join(f"w{i}" for i in rng.integers(lo, hi, rng.integers(2, 6)))

    harmful = root / "harmful.jsonl"
    harmful.write_text(
        "".join(json.dumps({"id": f"h{i}", "prompt": text(0, 40)}) + "\n" for i in range(20))
    )
    harmless = root / "harmless.json"  # the refusal_direction format
    harmless.write_text(json.dumps([{"instruction": text(40, 80)} for _ in range(20)]))
    return root, src, harmful, harmless


def flags(setup, out: Path, *extra: str) -> list[str]:
    root, src, harmful, harmless = setup
    return [
        f"--original={src}", f"--out={out}", f"--harmful={harmful}", f"--harmless={harmless}",
        "--harmful_split=6,3,3", "--harmless_split=6,3,3", "--refusal_tokens=w0,w1",
        "--nofilter_train", "--prune_layer_fraction=0", "--noinduce_filter",
        "--kl_threshold=0", "--n_rollouts=2", "--max_new_tokens=4", *extra,
    ]  # fmt: skip


def test_script_writes_a_loadable_abliteration_with_provenance_and_report(setup):
    root, src, _, _ = setup
    out = root / "out"
    p = run(*flags(setup, out))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "before" in p.stdout and "refusal score (3 held-out harmful)" in p.stdout
    record = json.loads((out / PROVENANCE_FILE).read_text())
    report = json.loads((out / "abliteration_report.json").read_text())
    assert record["source_hash"] == checkpoint_fingerprint(src)
    assert record["untied_embeddings"] is False and record["direction_from"] == "search"
    assert 1 <= record["layer"] <= 2 and -11 <= record["position"] <= -1  # layer 0 is zero
    assert set(record["data"]) == {
        f"{a}_{b}" for a in ("harmful", "harmless") for b in ("extract", "select", "eval")
    }
    assert report["layer"] == record["layer"] and report["selection"]["layer"] == record["layer"]
    direction = np.load(out / DIRECTION_FILE)
    assert np.linalg.norm(direction) == pytest.approx(1, abs=1e-6)
    for side in ("before", "after"):
        assert report[side]["compliance"]["prompts_judged"] == 3
    assert report["before"]["harmless_kl"] == 0 and report["after"]["harmless_kl"] > 0
    abliterated = load_model(out)
    original = load_model(src)
    assert not np.array_equal(abliterated.embed_tokens[...], original.embed_tokens[...])
    # an existing --out is refused before any work; the message names the fix
    again = run_main("abliterate.py", *flags(setup, out))
    assert again.returncode != 0 and "--overwrite" in again.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--layer=3", "--position=-1"], "layer 3 is out of range: the model has 3 layers"),
        (["--harmful_split=30,3,3"], "--harmful holds 20 prompts but --harmful_split needs 36"),
    ],
)
def test_script_names_bad_flags_before_loading_the_model(setup, extra, message):
    root = setup[0]
    p = run_main("abliterate.py", *flags(setup, root / "never", *extra))
    assert p.returncode != 0 and message in p.stderr, p.stderr[-2000:]
    assert "loaded" not in p.stderr and not (root / "never").exists()


def test_prompt_file_errors(tmp_path):
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "dict.json").write_text('{"instruction": "x"}')
    (tmp_path / "noinst.json").write_text('[{"prompt": "x"}]')
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_prompts(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="is empty"):
        data.load_prompts(tmp_path / "empty.json")
    with pytest.raises(ValueError, match="must hold a JSON list"):
        data.load_prompts(tmp_path / "dict.json")
    with pytest.raises(ValueError, match="item 0 must be an object with a non-empty string"):
        data.load_prompts(tmp_path / "noinst.json")
    with pytest.raises(ValueError, match="layer 2 is out of range"):
        ab.check_candidate(2, None, 2, 9)
    with pytest.raises(ValueError, match="position -10 is out of range"):
        ab.check_candidate(1, -10, 2, 9)


def test_output_directory_rules(setup, tmp_path):
    _, src, _, _ = setup
    with pytest.raises(ValueError, match="overlaps the source"):
        check_output_dir(src, src / "abl")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        check_output_dir(src, tmp_path / "mine")
    with pytest.raises(FileExistsError, match="not written by this tool"):
        check_output_dir(src, tmp_path / "mine", overwrite=True)
    d = np.ones(64)
    out = write_abliterated(src, tmp_path / "abl", d)
    first = (out / "model.safetensors").read_bytes()
    write_abliterated(src, tmp_path / "abl", d, overwrite=True)  # replaces an earlier one
    assert (out / "model.safetensors").read_bytes() == first
    assert not (tmp_path / "abl.partial").exists()
    with pytest.raises(ValueError, match="hidden size is 64"):
        write_abliterated(src, tmp_path / "x", np.ones(63))
