"""A run directory of rollouts: one manifest, one file per (prompt, alpha) chunk.

Layout::

    run_dir/manifest.json                     what produced the run (models, path, grid, seed, ...)
    run_dir/chunks/<prompt_id>/a<alpha>.npz   tokens, lengths, log-probs, flags, verdicts

Guarantees:
- Every write is atomic (temp file in the same directory + ``os.replace``): a killed run leaves
  whole chunks or none, never a torn file.
- A chunk is a pure function of the manifest and its (prompt, alpha) (the sampler's keys derive
  from seed, alpha and rollout index), so a resumed run skips finished chunks and regenerates the
  rest identically: nothing is lost or duplicated.
- A directory that holds another run (a different manifest) is refused, naming the fields.

A chunk is an ``.npz`` of arrays over its R rollouts (row r is rollout r of that alpha):
``tokens`` int32 [R, max_new_tokens] (-1 after EOS), ``lengths`` int32 [R] (EOS counted),
``logp_original`` / ``logp_variant`` float32 [R] (summed over the generated tokens), ``truncated``
and ``nonfinite`` bool [R], ``alpha`` float64 []; ``logp_sampled`` float32 [R] (each row's
log-probability under the distribution it was drawn from, for path importance sampling) in every
chunk sample.py writes (optional: run directories written before it existed lack it); once
judged, ``verdicts`` int8 [R] and ``verdict_judge_id`` (a string). <alpha> is written with six
decimals (``a1.000000``).

Verdicts are stored per chunk as int8: 1 complied, 0 did not, -1 unknown (the judge could not
decide); ``verdict_judge_id`` records which judge wrote them. NumPy only: no JAX import.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lpe_jax.decoding.row_block import ALPHA_QUANTUM

MANIFEST = "manifest.json"
CHUNK_FIELDS = ("tokens", "lengths", "logp_original", "logp_variant", "truncated", "nonfinite")
UNKNOWN = -1


_ALPHA_DIGITS = round(-math.log10(ALPHA_QUANTUM))


def alpha_key(alpha: float) -> str:
    """File-name key of an alpha, exact to ALPHA_QUANTUM (e.g. 0.95 -> 'a0.950000')."""
    return f"a{round(float(alpha), _ALPHA_DIGITS):.{_ALPHA_DIGITS}f}"


def safe_id(prompt_id: str) -> str:
    """``prompt_id`` unchanged when it is usable as a file name, else ValueError naming it."""
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", prompt_id) or prompt_id in (".", ".."):
        raise ValueError(
            f"prompt id {prompt_id!r} is not usable as a file name; "
            "use letters, digits, '_', '-' and '.'"
        )
    return prompt_id


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so readers see the old file or the new one, never a partial one.

    The file gets the mode a plain ``open(path, "w")`` would (0666 less the umask: 0644 under
    umask 0022), unlike ``tempfile.mkstemp``'s 0600.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create `path` if needed and prove it writable, or raise OSError naming it and the fix."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OSError(f"cannot write to run directory {path}: {e}; choose a writable --out") from e
    return path


def _normalise(manifest: Mapping[str, Any]) -> dict[str, Any]:
    # A JSON round trip makes tuples lists and floats canonical, so comparisons are exact.
    return json.loads(json.dumps(dict(manifest), sort_keys=True))


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k) != new.get(k)]


def _holds_rows(root: Path) -> bool:
    """Whether `root` holds any file besides its manifest (chunks, journals, results)."""
    return any(f.is_file() and f != root / MANIFEST for f in root.rglob("*"))


class RolloutStore:
    """A run directory. Open it with `RolloutStore.open(root, manifest)`."""

    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root = root
        self.manifest = manifest

    @classmethod
    def open(cls, root: str | os.PathLike, manifest: Mapping[str, Any]) -> RolloutStore:
        """Create the run directory, or reopen it if it holds the same manifest.

        A directory whose only file is a manifest holds no rows (a run that failed before storing
        anything): its manifest is replaced, so a failed run never blocks a rerun with other
        settings. Raises ValueError if the directory holds rows of a different run,
        PermissionError/OSError (with the directory named) if it cannot be written.
        """
        root = Path(root)
        manifest = _normalise(manifest)
        ensure_writable_dir(root)
        path = root / MANIFEST
        if path.exists() and _holds_rows(root):
            old = json.loads(path.read_text())
            changed = _diff(old, manifest)
            if changed:
                raise ValueError(
                    f"{root} holds another run: manifest fields differ: {', '.join(changed)}. "
                    "Use a new directory, or rerun with the original settings to resume."
                )
        else:
            atomic_write_json(path, manifest)
        return cls(root, manifest)

    @classmethod
    def load(cls, root: str | os.PathLike) -> RolloutStore:
        """Open an existing run directory read-only-style (its manifest is taken as is)."""
        root = Path(root)
        path = root / MANIFEST
        if not path.exists():
            raise FileNotFoundError(
                f"{root} is not a run directory (no {MANIFEST}); run sample.py first"
            )
        return cls(root, json.loads(path.read_text()))

    def chunk_path(self, prompt_id: str, alpha: float) -> Path:
        return self.root / "chunks" / safe_id(prompt_id) / f"{alpha_key(alpha)}.npz"

    def has_chunk(self, prompt_id: str, alpha: float) -> bool:
        return self.chunk_path(prompt_id, alpha).exists()

    def write_chunk(self, prompt_id: str, alpha: float, arrays: Mapping[str, np.ndarray]) -> None:
        """Atomically write one chunk. `arrays` must hold CHUNK_FIELDS (row-major over rollouts)."""
        missing = [f for f in CHUNK_FIELDS if f not in arrays]
        if missing:
            raise ValueError(f"chunk for {prompt_id} at alpha={alpha} lacks fields {missing}")
        n = len(arrays["lengths"])
        bad = [k for k, v in arrays.items() if np.ndim(v) and len(v) != n]
        if bad:
            raise ValueError(f"chunk fields {bad} do not have {n} rows like 'lengths'")
        buf = io.BytesIO()
        np.savez(buf, alpha=np.float64(alpha), **{k: np.asarray(v) for k, v in arrays.items()})
        atomic_write_bytes(self.chunk_path(prompt_id, alpha), buf.getvalue())

    def read_chunk(self, prompt_id: str, alpha: float) -> dict[str, np.ndarray]:
        path = self.chunk_path(prompt_id, alpha)
        if not path.exists():
            raise FileNotFoundError(f"no chunk for prompt {prompt_id!r} at alpha={alpha} ({path})")
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def set_verdicts(
        self, prompt_id: str, alpha: float, verdicts: np.ndarray, judge_id: str
    ) -> None:
        """Store int8 verdicts (1/0/-1) for a chunk, atomically rewriting it."""
        chunk = self.read_chunk(prompt_id, alpha)
        verdicts = np.asarray(verdicts, np.int8)
        if verdicts.shape != chunk["lengths"].shape:
            raise ValueError(
                f"{len(verdicts)} verdicts for a chunk of {len(chunk['lengths'])} rollouts"
            )
        if not np.isin(verdicts, (1, 0, UNKNOWN)).all():
            raise ValueError("verdicts must be 1 (complied), 0 (did not) or -1 (unknown)")
        chunk.pop("alpha")
        chunk["verdicts"] = verdicts
        chunk["verdict_judge_id"] = np.array(judge_id)
        self.write_chunk(prompt_id, alpha, chunk)

    def verdict_counts(self, alpha: float) -> dict[str, tuple[int, int, int]]:
        """{prompt_id: (compliant, known, unknown)} over every judged chunk at ``alpha``.

        ``known`` counts verdicts 1 and 0; unknown verdicts (-1: the judge could not decide, or the
        row stopped on non-finite logits) are left out of it, never read as refusals. Raises
        ValueError naming the fix when there is no chunk at ``alpha`` or one has no verdicts.
        """
        key = alpha_key(alpha)
        out: dict[str, tuple[int, int, int]] = {}
        for pid, a in self.chunks():
            if alpha_key(a) != key:
                continue
            chunk = self.read_chunk(pid, a)
            if "verdicts" not in chunk:
                raise ValueError(
                    f"chunk ({pid}, alpha={a}) of {self.root} has no verdicts; run judge.py first"
                )
            v = chunk["verdicts"]
            out[pid] = (int((v == 1).sum()), int((v >= 0).sum()), int((v == UNKNOWN).sum()))
        if not out:
            raise ValueError(f"{self.root} has no chunk at alpha={alpha}; sample it there first")
        return out

    def chunks(self) -> Iterator[tuple[str, float]]:
        """All (prompt_id, alpha) chunks on disk, sorted."""
        base = self.root / "chunks"
        if not base.exists():
            return
        for pdir in sorted(p for p in base.iterdir() if p.is_dir()):
            for f in sorted(pdir.glob("a*.npz")):
                yield pdir.name, float(f.stem[1:])
