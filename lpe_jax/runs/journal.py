"""A job's finished draws on disk, so a killed run resumes without drawing them again.

One file per job, ``<dir>/<key>.npz``, rewritten atomically after every completed yield of the job
(a Draw or a list of Draws): a kill leaves the previous version or the new one, never a torn file.
It holds each Drawn's draw, rollout start and per-row arrays except the tokens (lengths, log-probs
including ``logp_sampled``, flags, verdicts): what the estimators read, at a few bytes per row.
`Scheduler.add(..., replay=journal.load(key))` sends these outcomes back to the restarted job
without the engine; since a job's requests depend only on what it was sent, it then asks for
exactly the draws the killed run had not finished. A run stopped by a failing judge also leaves
``<dir>/<key>.rows.npz``: the rows it drew and never sent to the job, tokens included
(:meth:`Journal.save_rows`); the rerun judges them instead of drawing them again. NumPy only.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lpe_jax.runs.scheduler import Draw, Drawn, SavedRows
from lpe_jax.runs.store import atomic_write_bytes, safe_id

FIELDS = (
    "lengths",
    "logp_original",
    "logp_variant",
    "logp_sampled",
    "truncated",
    "nonfinite",
    "verdicts",
)
ROW_FIELDS = ("tokens", *FIELDS[:-1])


class Journal:
    """Per-job journals in one directory; keys must be usable as file names (prompt ids are)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self._records: dict[Hashable, list[list[Drawn]]] = {}

    def path(self, key: str) -> Path:
        return self.root / f"{safe_id(str(key))}.npz"

    def load(self, key: str) -> list[list[Drawn]]:
        """The job's completed yields in order (each a list of Drawn with tokens None); [] if
        none."""
        read = _read(self.path(key), FIELDS)
        if read is None:
            return []
        meta, arrays = read
        records, at = [], 0
        for group in meta:
            out = []
            for m in group:
                rows = {f: arrays[f][at : at + m["n"]] for f in FIELDS}
                at += m["n"]
                verdicts = rows.pop("verdicts") if m["judged"] else None
                draw = Draw(float(m["alpha"]), int(m["n"]), int(m["seed"]))
                out.append(Drawn(draw, int(m["start"]), tokens=None, verdicts=verdicts, **rows))
            records.append(out)
        self._records[key] = records
        return [list(r) for r in records]

    def append(self, key: str, drawn: Sequence[Drawn]) -> None:
        """Add one completed yield and rewrite the job's file atomically (after what it holds)."""
        if key not in self._records:
            self.load(key)
        records = self._records.setdefault(key, [])
        records.append(list(drawn))
        flat = [d for group in records for d in group]
        meta = [
            [
                dict(
                    alpha=d.draw.alpha,
                    n=d.draw.n,
                    seed=d.draw.seed,
                    start=d.rollout_start,
                    judged=d.verdicts is not None,
                )
                for d in group
            ]
            for group in records
        ]
        arrays = {f: np.concatenate([_field(d, f) for d in flat]) for f in FIELDS}
        buf = io.BytesIO()
        np.savez(buf, meta=np.array(json.dumps(meta)), **arrays)
        atomic_write_bytes(self.path(key), buf.getvalue())

    def remove(self, key: str) -> None:
        """Forget a finished job (its result is stored elsewhere)."""
        self._records.pop(key, None)
        self.path(key).unlink(missing_ok=True)
        self.rows_path(key).unlink(missing_ok=True)

    def rows_path(self, key: str) -> Path:
        return self.root / f"{safe_id(str(key))}.rows.npz"

    def save_rows(self, key: str, blocks: Sequence[SavedRows]) -> None:
        """Replace the job's drawn-but-unsent rows (``Scheduler.unjudged()``) atomically; [] removes
        them."""
        if not blocks:
            self.rows_path(key).unlink(missing_ok=True)
            return
        meta = [dict(seed=b.seed, alpha=b.alpha, start=b.rollout_start) for b in blocks]
        meta = [{**m, "n": len(b.rows["lengths"])} for m, b in zip(meta, blocks, strict=True)]
        arrays = {f: np.concatenate([np.asarray(b.rows[f]) for b in blocks]) for f in ROW_FIELDS}
        buf = io.BytesIO()
        np.savez(buf, meta=np.array(json.dumps(meta)), **arrays)
        atomic_write_bytes(self.rows_path(key), buf.getvalue())

    def load_rows(self, key: str) -> list[SavedRows]:
        """The rows :meth:`save_rows` kept for the job ([] if none), for ``Scheduler.add``."""
        read = _read(self.rows_path(key), ROW_FIELDS)
        if read is None:
            return []
        meta, arrays = read
        out, at = [], 0
        for m in meta:
            rows = {f: arrays[f][at : at + m["n"]] for f in ROW_FIELDS}
            at += m["n"]
            out.append(SavedRows(int(m["seed"]), float(m["alpha"]), int(m["start"]), rows))
        return out


def _read(path: Path, fields: Sequence[str]) -> tuple[Any, dict[str, np.ndarray]] | None:
    """(meta, {field: array}) of a journal file written with `fields`, or None if there is none."""
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as z:
        _check_fields(path, z.files, fields)
        return json.loads(str(z["meta"])), {f: z[f] for f in fields}


def _check_fields(path: Path, present: Sequence[str], wanted: Sequence[str]) -> None:
    """Refuse a journal written before a field existed (e.g. ``logp_sampled``): replaying it
    would give the resumed run other results than an uninterrupted one."""
    missing = [f for f in wanted if f not in present]
    if missing:
        raise ValueError(
            f"journal {path} lacks {missing}: it was written by an older lpe_jax; delete it "
            "(its draws are drawn again, identically) and rerun"
        )


def _field(d: Drawn, name: str) -> np.ndarray:
    if name == "verdicts" and d.verdicts is None:
        return np.full(d.draw.n, -1, np.int8)
    return np.asarray(getattr(d, name))
