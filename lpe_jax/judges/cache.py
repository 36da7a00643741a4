"""SQLite cache of successful judge outputs, keyed by (judge id, prompt, response).

Only the key's SHA-256 is stored, never the prompt or response text (rollout sets are large), and
nothing about how the judge authenticated. Failed judgements are never written, so a rerun retries
them. Each ``put`` commits at once, so an interrupted run keeps everything judged so far.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS judgements (
    key TEXT PRIMARY KEY,
    judge_id TEXT NOT NULL,
    raw TEXT NOT NULL,
    fields TEXT NOT NULL,
    created REAL NOT NULL
)
"""
_CHUNK = 500  # keys per SELECT ... IN (...), below SQLite's host-parameter limit


@dataclass(frozen=True)
class CacheEntry:
    """What the cache returns: the judge's raw output and its parsed fields."""

    raw: str
    fields: Mapping[str, Any]


def cache_key(judge_id: str, prompt: str, response: str) -> str:
    """SHA-256 hex over the three strings, length-prefixed so no two triples collide by joining."""
    h = hashlib.sha256()
    for part in (judge_id, prompt, response):
        data = part.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


class VerdictCache:
    """A SQLite file mapping cache_key(judge_id, prompt, response) to (raw output, fields).

    The file and its missing parent directories are created on first use.

    Safe to use from several threads of one process (one connection behind a lock).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:  # e.g. results/<run>/judge_cache.sqlite before the run directory exists
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(
                f"cannot create the judge cache directory {self.path.parent}: {e}; "
                "choose a writable cache_path"
            ) from e
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(str(self.path), check_same_thread=False)
            self._conn.execute(_SCHEMA)
            self._conn.commit()
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{self.path} is not a usable judge cache (SQLite said: {e})") from e

    def get_many(self, judge_id: str, items: Iterable[tuple[str, str]]) -> dict[str, CacheEntry]:
        """Entries for those (prompt, response) pairs that are cached, keyed by cache_key."""
        keys = [cache_key(judge_id, p, r) for p, r in items]
        found: dict[str, CacheEntry] = {}
        with self._lock:
            for start in range(0, len(keys), _CHUNK):
                chunk = keys[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = self._conn.execute(
                    f"SELECT key, raw, fields FROM judgements WHERE key IN ({marks})", chunk
                ).fetchall()
                for key, raw, fields in rows:
                    found[key] = CacheEntry(raw=raw, fields=json.loads(fields))
        return found

    def put(self, judge_id: str, prompt: str, response: str, raw: str, fields: Mapping) -> None:
        """Store one successful judgement (replacing any older entry with the same key)."""
        row = (
            cache_key(judge_id, prompt, response),
            judge_id,
            raw,
            json.dumps(dict(fields), sort_keys=True),
            time.time(),
        )
        with self._lock:
            self._conn.execute("INSERT OR REPLACE INTO judgements VALUES (?, ?, ?, ?, ?)", row)
            self._conn.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]

    def close(self) -> None:
        """Close the connection; the object is unusable afterwards."""
        with self._lock:
            self._conn.close()
