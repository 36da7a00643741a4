"""Prompt sets: the HarmBench behaviours CSV, generic JSONL/CSV prompt files, chat encoding.

No JAX here. Prompt text is kept byte for byte as read (no stripping), so a prompt's hash is
the same on every machine.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HARMBENCH_COLUMNS = (
    "Behavior",
    "FunctionalCategory",
    "SemanticCategory",
    "Tags",
    "ContextString",
    "BehaviorID",
)
CONTEXT_SEPARATOR = "\n\n---\n\n"  # HarmBench's join of ContextString and Behavior


@dataclass(frozen=True)
class Prompt:
    """One prompt: a unique id, the user-message text, and free-form metadata."""

    id: str
    text: str
    metadata: Mapping[str, Any] = field(default_factory=dict)


def _check_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist (or is not a file)")
    if path.stat().st_size == 0:
        raise ValueError(f"{what} {path} is empty")
    return path


def _check_unique(prompts: Sequence[Prompt], path: Path) -> list[Prompt]:
    seen: set[str] = set()
    dups = sorted({p.id for p in prompts if p.id in seen or seen.add(p.id)})
    if dups:
        raise ValueError(f"{path}: duplicate prompt ids {dups[:10]}; ids must be unique")
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return list(prompts)


def _read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    # utf-8-sig drops a byte-order mark that would otherwise corrupt the first column name.
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        missing = [c for c in required if c not in columns]
        if missing:
            raise ValueError(
                f"{path} lacks required column(s) {missing}; it has {columns}. "
                f"Expected columns: {list(required)}"
            )
        rows = list(reader)
    for i, row in enumerate(rows, start=1):
        if None in row or any(row[c] is None for c in required):
            raise ValueError(
                f"{path}: data record {i} does not have the header's {len(columns)} fields; "
                "quote cells that contain commas or newlines"
            )
    return rows


def load_harmbench(
    path: str | Path, functional_category: str | Sequence[str] | None = "standard"
) -> list[Prompt]:
    """HarmBench behaviours from its CSV, in file order.

    functional_category: keep rows whose FunctionalCategory is this value (or one of these);
        None keeps every row. A category absent from the file is an error.
    Contextual rows become ``ContextString + "\\n\\n---\\n\\n" + Behavior``; other rows are the
    Behavior as is. Prompt.id is the BehaviorID; metadata keeps the other columns (empty cells
    stay empty strings).
    """
    path = _check_file(path, "HarmBench CSV")
    rows = _read_csv(path, HARMBENCH_COLUMNS)
    if functional_category is not None:
        wanted = (
            {functional_category}
            if isinstance(functional_category, str)
            else set(functional_category)
        )
        present = {row["FunctionalCategory"] for row in rows}
        unknown = sorted(wanted - present)
        if unknown:
            raise ValueError(
                f"{path}: FunctionalCategory {unknown} not found; present: {sorted(present)}"
            )
        rows = [row for row in rows if row["FunctionalCategory"] in wanted]
    prompts = []
    for row in rows:
        behavior, context, bid = row["Behavior"], row["ContextString"], row["BehaviorID"]
        if not bid.strip():
            raise ValueError(f"{path}: a row has an empty BehaviorID (Behavior {behavior[:60]!r})")
        if not behavior.strip():
            raise ValueError(f"{path}: behaviour {bid} has an empty Behavior")
        text = context + CONTEXT_SEPARATOR + behavior if context else behavior
        metadata = {k: row[k] for k in HARMBENCH_COLUMNS if k not in ("BehaviorID",)}
        prompts.append(Prompt(bid, text, {"source": "harmbench", **metadata}))
    return _check_unique(prompts, path)


def _prompt_from_record(record: Mapping[str, Any], where: str) -> Prompt:
    missing = [k for k in ("id", "prompt") if k not in record]
    if missing:
        raise ValueError(
            f"{where}: missing field(s) {missing}; each record needs 'id' and 'prompt'"
        )
    pid, text = record["id"], record["prompt"]
    if isinstance(pid, bool) or not isinstance(pid, (str, int)) or not str(pid).strip():
        raise ValueError(f"{where}: 'id' must be a non-empty string or integer, got {pid!r}")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: prompt {pid!r} is empty or not a string")
    metadata = {k: v for k, v in record.items() if k not in ("id", "prompt")}
    return Prompt(str(pid), text, metadata)


def _load_jsonl(path: Path) -> list[Prompt]:
    prompts = []
    with path.open(encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no} is not valid JSON ({e.msg})") from e
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_no} must be a JSON object with 'id' and 'prompt'")
            prompts.append(_prompt_from_record(record, f"{path}:{line_no}"))
    return prompts


def _load_instruction_list(path: Path) -> list[Prompt]:
    """A JSON list of ``{"instruction": str, ...}`` (the refusal_direction splits of Arditi et
    al. 2024); ids are ``<file stem>-<index>``, other keys go to metadata."""
    try:
        records = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(records, list):
        raise ValueError(
            f"{path} must hold a JSON list of objects with an 'instruction' key "
            '(e.g. [{"instruction": "..."}]); got a JSON ' + type(records).__name__
        )
    prompts = []
    for i, record in enumerate(records):
        text = record.get("instruction") if isinstance(record, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise ValueError(
                f"{path}: item {i} must be an object with a non-empty string 'instruction' "
                f"(the refusal_direction format); got {str(record)[:80]!r}"
            )
        metadata = {k: v for k, v in record.items() if k != "instruction"}
        prompts.append(Prompt(f"{path.stem}-{i}", text, metadata))
    return prompts


def load_prompts(
    path: str | Path, functional_category: str | Sequence[str] | None = "standard"
) -> list[Prompt]:
    """Prompts from a ``.jsonl`` file (one object per line with ``id`` and ``prompt``; other keys
    go to metadata), a ``.csv`` file with ``id`` and ``prompt`` columns, or a ``.json`` list of
    ``{"instruction": ...}`` objects (the refusal_direction splits; ids ``<stem>-<index>``). A CSV
    with HarmBench's columns is read by ``load_harmbench(path, functional_category)``. Ids must be
    unique and prompts non-empty; text is kept as written."""
    path = _check_file(path, "prompts file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _check_unique(_load_jsonl(path), path)
    if suffix == ".json":
        return _check_unique(_load_instruction_list(path), path)
    if suffix != ".csv":
        raise ValueError(
            f"prompts file {path} must end in .jsonl or .csv (or .json for an instruction list), "
            f"not {suffix or '(none)'}"
        )
    with path.open(newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), [])
    if set(HARMBENCH_COLUMNS) <= set(header):
        return load_harmbench(path, functional_category)
    rows = _read_csv(path, ("id", "prompt"))
    prompts = [_prompt_from_record(row, f"{path}: record {i}") for i, row in enumerate(rows, 1)]
    return _check_unique(prompts, path)


def dataset_hash(prompts: Iterable[Prompt]) -> str:
    """SHA-256 hex over the prompts' ids and texts, in order (metadata excluded), for manifests.

    Each string is length-prefixed, so different splits of the same characters differ.
    """
    h = hashlib.sha256()
    for p in prompts:
        for part in (p.id, p.text):
            data = part.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()
