"""The run directory: atomic chunks, resume without loss or duplication, refusal of other runs."""

import numpy as np
import pytest

from lpe_jax.runs.store import RolloutStore, alpha_key

MANIFEST = {"seed": 0, "alphas": [0.0, 0.5, 1.0], "path": "linear", "max_new_tokens": 8}


def _chunk(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "tokens": rng.integers(0, 50, (n, 8)).astype(np.int32),
        "lengths": rng.integers(1, 9, n).astype(np.int32),
        "logp_original": rng.normal(size=n).astype(np.float32),
        "logp_variant": rng.normal(size=n).astype(np.float32),
        "truncated": np.zeros(n, bool),
        "nonfinite": np.zeros(n, bool),
    }


def test_roundtrip_and_listing(tmp_path):
    store = RolloutStore.open(tmp_path / "run", MANIFEST)
    c = _chunk(5, 0)
    store.write_chunk("p1", 0.5, c)
    store.write_chunk("p0", 1.0, _chunk(5, 1))
    got = store.read_chunk("p1", 0.5)
    for k, v in c.items():
        np.testing.assert_array_equal(got[k], v)
    assert list(store.chunks()) == [("p0", 1.0), ("p1", 0.5)]
    assert not list((tmp_path / "run").rglob("*.tmp"))


def test_reopen_same_manifest_keeps_chunks(tmp_path):
    RolloutStore.open(tmp_path, MANIFEST).write_chunk("p", 0.0, _chunk(3, 0))
    again = RolloutStore.open(tmp_path, dict(MANIFEST))
    assert again.has_chunk("p", 0.0) and not again.has_chunk("p", 0.5)


def test_other_run_is_refused_naming_the_fields(tmp_path):
    RolloutStore.open(tmp_path, MANIFEST).write_chunk("p", 0.0, _chunk(3, 0))
    with pytest.raises(ValueError, match="another run.*seed"):
        RolloutStore.open(tmp_path, {**MANIFEST, "seed": 1})


def test_a_run_that_stored_nothing_does_not_block_a_rerun_with_other_settings(tmp_path):
    """A run that failed before its first chunk (e.g. a bf16 crash) leaves only its manifest; a
    rerun with other settings replaces it. Once a row is stored, the directory is that run's."""
    RolloutStore.open(tmp_path, {**MANIFEST, "dtype": "bfloat16"})
    (tmp_path / "chunks").mkdir()  # an empty folder is no row
    store = RolloutStore.open(tmp_path, {**MANIFEST, "dtype": "float32"})
    assert RolloutStore.load(tmp_path).manifest["dtype"] == "float32"
    store.write_chunk("p", 0.5, _chunk(2, 0))
    with pytest.raises(ValueError, match="another run.*dtype"):
        RolloutStore.open(tmp_path, {**MANIFEST, "dtype": "bfloat16"})


def test_verdicts_written_atomically_and_validated(tmp_path):
    store = RolloutStore.open(tmp_path, MANIFEST)
    store.write_chunk("p", 0.5, _chunk(4, 0))
    store.set_verdicts("p", 0.5, np.array([1, 0, -1, 1]), "rule:v1")
    got = store.read_chunk("p", 0.5)
    np.testing.assert_array_equal(got["verdicts"], [1, 0, -1, 1])
    assert str(got["verdict_judge_id"]) == "rule:v1"
    with pytest.raises(ValueError, match="3 verdicts for a chunk of 4"):
        store.set_verdicts("p", 0.5, np.array([1, 0, 1]), "rule:v1")
    with pytest.raises(ValueError, match="unknown"):
        store.set_verdicts("p", 0.5, np.array([1, 0, 2, 1]), "rule:v1")


def test_bad_inputs(tmp_path):
    store = RolloutStore.open(tmp_path, MANIFEST)
    with pytest.raises(ValueError, match="not usable as a file name"):
        store.write_chunk("../evil", 0.5, _chunk(2, 0))
    with pytest.raises(ValueError, match="lacks fields"):
        store.write_chunk("p", 0.5, {"lengths": np.ones(2)})
    with pytest.raises(FileNotFoundError, match="no chunk"):
        store.read_chunk("p", 0.25)
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        RolloutStore.load(tmp_path / "nothing")
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a file where a directory should be: unwritable even for root
    with pytest.raises(OSError, match="cannot write to run directory"):
        RolloutStore.open(blocker / "run", MANIFEST)


def test_alpha_key_is_exact():
    assert alpha_key(0.1 + 0.2) == alpha_key(0.3) == "a0.300000"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_honour_the_umask(tmp_path, umask, mode):
    """manifest.json, chunks and JSON results (atomic writes) get 0666 less the umask, as a plain
    open() would, not mkstemp's 0600; no temp file is left behind."""
    import os
    import stat

    from lpe_jax.runs.store import atomic_write_json

    old = os.umask(umask)
    try:
        store = RolloutStore.open(tmp_path / "run", MANIFEST)
        store.write_chunk("p0", 0.5, _chunk(3, 0))
        atomic_write_json(tmp_path / "run" / "results.json", {"a": 1})
    finally:
        os.umask(old)
    root = tmp_path / "run"
    files = [root / "manifest.json", store.chunk_path("p0", 0.5), root / "results.json"]
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == mode, f
    assert not [p for p in root.rglob("*.tmp")]
