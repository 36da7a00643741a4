"""Write an abliterated copy of a Qwen3, Qwen3-MoE, Qwen3.5 or Qwen3.5-MoE checkpoint: a direction
removed from every weight that writes to the residual stream, one tensor at a time.

For a unit direction r [H]: embed_tokens [V, H] becomes W - (W r) r^T; every matrix whose output is
added to the stream (HF layout [H, in]) becomes W - r (r^T W): attention's o_proj (Qwen3's, and
Qwen3.5's gated attention, whose output gate acts before o_proj), Qwen3.5's Gated DeltaNet
`linear_attn.out_proj`, a dense MLP's down_proj, each MoE expert's down_proj
(`mlp.experts.{e}.`, or the fused `mlp.experts.down_proj` [E, H, F], per expert) and a shared
expert's (`mlp.shared_expert.`); an o_proj bias (attention_bias) becomes b - (b.r) r. These are
all the writes: a decoder layer adds its mixer's output and its MLP's output and nothing else;
a MoE layer's output is a weighted sum of its experts' down_proj outputs (and the shared
expert's, scaled by its sigmoid gate), so it has no component along r either; the router and the
shared-expert gate read the stream and are left alone.
The embedding and every write then have no component along r, so the residual stream never
carries one: the model equals the original with r projected out at run time after the embedding
and after each write (tests/test_abliterate_exact.py, tests/test_abliterate_hybrid.py). Computed
in float32, written in each tensor's source dtype; every other tensor is copied byte for byte.

Qwen3.5 checkpoints in the Hub's multimodal layout (`model.language_model.`) are edited the same
way; their vision tower (`model.visual.*`) and multi-token-prediction head (`mtp.*`), which text
sampling never runs, are copied unchanged (image inputs would still carry the direction at image
positions, and the MTP head drafts as the original's, which speculative decoding verifies).

Tied embeddings: the input embedding changes but the output head must not, so the result is
untied: `lm_head.weight` holds the original embedding and config.json says
`tie_word_embeddings: false` (in its `text_config` too, for a multimodal config), which
transformers and `load_model` read the same way.

Memory: tensors are read with plain file reads (no memory map, whose pages would count as
resident), the embedding is edited in blocks of rows, and other tensors one at a time, so the
process holds at most one float32 tensor beyond what it held before. The directory is written
under `<out>.partial` and renamed into place when complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lpe_jax.model.checkpoint import (
    ST_TO_NP,
    TIED_HEAD_READINGS,
    check_names,
    checkpoint_fingerprint,
    model_config,
    read_config,
    read_headers,
    weight_files,
)
from lpe_jax.model.qwen3 import Qwen3
from lpe_jax.model.qwen35 import Qwen35, Qwen35Config
from lpe_jax.model.qwen35_checkpoint import check_checkpoint as check_qwen35_checkpoint

Model = Qwen3 | Qwen35

PROVENANCE_FILE = "abliteration.json"
DIRECTION_FILE = "refusal_direction.npy"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
# Files that make the copy a usable model directory beside its weights and config.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
_EMBED = "model.embed_tokens.weight"  # the text layout's name (also `model.language_model.`)
_HEAD = "lm_head.weight"
_LAYER = r"model\.(?:language_model\.)?layers\.\d+\."
_EMBED_NAME = re.compile(r"model\.(?:language_model\.)?embed_tokens\.weight")
_OUT_PROJ = re.compile(
    _LAYER + r"(?:(?:self_attn\.o_proj|linear_attn\.out_proj"
    r"|mlp\.(?:experts\.\d+\.|shared_expert\.)?down_proj)\.weight"
    r"|mlp\.experts\.down_proj)"  # the last: fused experts [E, H, F]
)
_OUT_BIAS = re.compile(_LAYER + r"self_attn\.o_proj\.bias")
_BLOCK_BYTES = 1 << 26  # float32 bytes edited or copied at once


def unit_direction(direction: np.ndarray, hidden_size: int) -> np.ndarray:
    """float32 [H] unit vector of a finite, nonzero direction [H] (ValueError otherwise)."""
    d = np.asarray(direction, np.float64)
    if d.shape != (hidden_size,):
        raise ValueError(
            f"the direction has shape {d.shape}, but the model's hidden size is {hidden_size}; "
            "pass a direction found on this model."
        )
    norm = np.linalg.norm(d)
    if not np.all(np.isfinite(d)) or norm == 0:
        raise ValueError("the direction must be finite and nonzero.")
    return (d / norm).astype(np.float32)


def writes_residual(name: str) -> bool:
    """True for the HF tensors whose output is added to the residual stream."""
    return bool(
        _EMBED_NAME.fullmatch(name) or _OUT_PROJ.fullmatch(name) or _OUT_BIAS.fullmatch(name)
    )


def orthogonalize(
    name: str, weight: np.ndarray, unit: np.ndarray, strength: float = 1.0
) -> np.ndarray:
    """`weight` (HF layout) with `strength` (1: all) of its component along `unit` [H] removed
    from its residual-stream side, computed in float32 and returned in weight's dtype. Rows of the
    embedding ([n, H], a block of rows is fine), an output projection ([H, in], or fused experts
    [E, H, in]), an o_proj bias [H]."""
    w = np.asarray(weight, np.float32)
    if _EMBED_NAME.fullmatch(name):
        out = w - strength * np.outer(w @ unit, unit)
    elif _OUT_PROJ.fullmatch(name):  # r^T W per matrix: [in], or [E, in] for fused experts
        out = w - strength * unit[:, None] * np.matmul(unit, w)[..., None, :]
    elif _OUT_BIAS.fullmatch(name):
        out = w - strength * (w @ unit) * unit
    else:
        raise ValueError(f"{name} does not write to the residual stream.")
    return out.astype(weight.dtype)


def orthogonalize_model(model: Model, direction: np.ndarray, strength: float = 1.0) -> Model:
    """In memory: a new model of the same family (`Qwen3` or `Qwen35`) whose residual-stream
    writes keep 1 - strength of their component along the direction (strength 1: the abliteration
    `write_abliterated` writes; in between: the direction path's model at alpha = 1 - strength).
    Untied, so the head stays the original's. For models that fit in memory twice (tests, toy
    organisms)."""
    unit = unit_direction(direction, model.cfg.hidden_size)
    cfg = dataclasses.replace(model.cfg, tie_word_embeddings=False)
    family = Qwen35 if isinstance(model, Qwen35) else Qwen3
    out = nnx.eval_shape(lambda: family(cfg, dtype=model.dtype, rngs=nnx.Rngs(0)))
    nnx.update(out, nnx.state(model, nnx.Param))
    embed = np.asarray(model.embed_tokens[...])
    head = embed.T if model.cfg.tie_word_embeddings else np.asarray(model.lm_head[...])
    out.lm_head = nnx.Param(jnp.asarray(head))
    out.embed_tokens = nnx.Param(jnp.asarray(orthogonalize(_EMBED, embed, unit, strength)))
    for i, layer in enumerate(out.layers):
        # ours are [in, H]: HF's [H, in] transposed; a MoE MLP's experts stacked [E, in, H]
        for mod, attr, name in _residual_writers(layer, i):
            w = np.asarray(getattr(mod, attr)[...])
            ws = [orthogonalize(name, m.T, unit, strength).T for m in w.reshape(-1, *w.shape[-2:])]
            setattr(mod, attr, nnx.Param(jnp.asarray(np.stack(ws).reshape(w.shape))))
        if getattr(cfg, "attention_bias", False):
            b = np.asarray(layer.self_attn.o_bias[...])
            bias = orthogonalize(f"model.layers.{i}.self_attn.o_proj.bias", b, unit, strength)
            layer.self_attn.o_bias = nnx.Param(jnp.asarray(bias))
    return out


def _residual_writers(layer: Any, i: int) -> list[tuple[Any, str, str]]:
    """(module, attribute, an HF name of its kind) of each matrix of decoder layer `i` that
    writes to the residual stream: the mixer's output projection (attention's o_proj, or a Gated
    DeltaNet's out_proj), then the dense MLP's down_proj, or a MoE MLP's stacked experts' and its
    shared expert's."""
    pre, mlp = f"model.layers.{i}.", layer.mlp
    if hasattr(layer, "linear_attn"):
        out = [(layer.linear_attn, "out_proj", pre + "linear_attn.out_proj.weight")]
    else:
        out = [(layer.self_attn, "o_proj", pre + "self_attn.o_proj.weight")]
    if not hasattr(mlp, "experts"):
        return [*out, (mlp, "down_proj", pre + "mlp.down_proj.weight")]
    out.append((mlp.experts, "down_proj", pre + "mlp.experts.0.down_proj.weight"))
    if hasattr(mlp, "shared_expert"):
        out.append((mlp.shared_expert, "down_proj", pre + "mlp.shared_expert.down_proj.weight"))
    return out


# ----------------------------------------------------------------------------------------------
# reading source tensors without a memory map


class _Source:
    """One source tensor: file, absolute byte offset, dtype, shape."""

    def __init__(self, file: Path, start: int, info: dict[str, Any]):
        self.file, self.dtype_code = file, info["dtype"]
        self.shape = tuple(info["shape"])
        lo, hi = info["data_offsets"]
        self.offset, self.nbytes = start + lo, hi - lo
        if self.dtype_code not in ST_TO_NP:
            raise ValueError(f"{file.name}: unsupported dtype {self.dtype_code}.")
        self.dtype = ST_TO_NP[self.dtype_code]

    @property
    def n_rows(self) -> int:
        return self.shape[0] if self.shape else 1

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """Rows lo..hi-1 of the tensor (elements of a 1-D tensor), read from disk."""
        row_bytes = self.nbytes // self.n_rows
        raw = np.fromfile(
            self.file, np.uint8, count=(hi - lo) * row_bytes, offset=self.offset + lo * row_bytes
        )
        return raw.view(self.dtype).reshape((hi - lo, *self.shape[1:]) if self.shape else ())

    def row_blocks(self) -> list[tuple[int, int]]:
        """(lo, hi) row ranges of at most _BLOCK_BYTES as float32."""
        f32_row = max(self.nbytes // self.n_rows * 4 // self.dtype.itemsize, 1)
        step = max(1, _BLOCK_BYTES // f32_row)
        return [(i, min(i + step, self.n_rows)) for i in range(0, self.n_rows, step)]


def _plan(
    source: Path, tied_head: str | None = None
) -> tuple[dict[str, Any], dict[str, _Source], bool]:
    """(HF config, output tensor name -> source tensor, untie?) after checking the checkpoint
    (every family `load_model` reads; names and shapes from the headers, before any data).

    tied_head: for a tied config that also stores a different lm_head.weight, the head to keep
    ('embedding' or 'lm_head', as `load_model`); None refuses such a checkpoint.
    """
    if tied_head not in (None, *TIED_HEAD_READINGS):
        raise ValueError(
            f"tied_head must be one of {TIED_HEAD_READINGS} or None; got {tied_head!r}."
        )
    hf = read_config(source)
    headers = read_headers(weight_files(source))
    cfg = model_config(hf)
    if isinstance(cfg, Qwen35Config):
        check_qwen35_checkpoint(cfg, headers)
    else:
        check_names(cfg, set(headers))
    tensors = {name: _Source(*entry) for name, entry in headers.items()}
    if not cfg.tie_word_embeddings:
        return hf, tensors, False
    embed = _embed_name(tensors)
    stored = tensors.pop(_HEAD, None)
    if stored is not None and tied_head == "lm_head":
        tensors[_HEAD] = stored
        return hf, tensors, True
    if stored is not None and tied_head is None and not _same_tensor(stored, tensors[embed]):
        raise ValueError(
            f"{source}: config.json ties the embeddings, but the stored {_HEAD} differs from "
            f"{embed}, so readers disagree on the output head; pick one with "
            "tied_head='embedding' or 'lm_head' (script: --tied_head)."
        )
    tensors[_HEAD] = tensors[embed]  # the original embedding becomes the output head
    return hf, tensors, True


def _embed_name(names: Collection[str]) -> str:
    """The input embedding's name: `model.embed_tokens.weight` or, in the multimodal layout,
    `model.language_model.embed_tokens.weight` (the checks of `_plan` found exactly one)."""
    return next(n for n in sorted(names) if _EMBED_NAME.fullmatch(n))


def _untied(hf: dict[str, Any]) -> dict[str, Any]:
    """config.json with tie_word_embeddings false, in its text_config too when it has one
    (a multimodal Qwen3.5 config: transformers reads the top level, `load_model` the text
    config)."""
    out = {**hf, "tie_word_embeddings": False}
    if isinstance(hf.get("text_config"), dict):
        out["text_config"] = {**hf["text_config"], "tie_word_embeddings": False}
    return out


def _same_tensor(a: _Source, b: _Source) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return all(np.array_equal(a.rows(lo, hi), b.rows(lo, hi)) for lo, hi in a.row_blocks())


# ----------------------------------------------------------------------------------------------
# writing


def _shards(tensors: Mapping[str, _Source], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(tensors):
        n = tensors[name].nbytes
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _header(names: list[str], tensors: Mapping[str, _Source]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        t = tensors[name]
        header[name] = {
            "dtype": t.dtype_code,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return len(blob).to_bytes(8, "little") + blob


def _write_tensor(fh: Any, name: str, t: _Source, unit: np.ndarray) -> None:
    edit = writes_residual(name)
    if edit and not _EMBED_NAME.fullmatch(name):  # [H, in], [E, H, in] or [H]: all rows at once
        fh.write(orthogonalize(name, t.rows(0, t.n_rows), unit).tobytes())
        return
    for lo, hi in t.row_blocks():
        block = t.rows(lo, hi)
        fh.write((orthogonalize(name, block, unit) if edit else block).tobytes())


def _write_weights(
    folder: Path,
    tensors: Mapping[str, _Source],
    unit: np.ndarray,
    max_shard_bytes: int,
    progress: Callable[[int], None] | None,
) -> None:
    shards = _shards(tensors, max_shard_bytes)
    n = len(shards)
    files = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    for file, names in zip(files, shards, strict=True):
        with open(folder / file, "wb") as fh:
            fh.write(_header(names, tensors))
            for name in names:
                _write_tensor(fh, name, tensors[name], unit)
                if progress is not None:
                    progress(tensors[name].nbytes)
    if n > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
            "weight_map": {
                name: f for f, names in zip(files, shards, strict=True) for name in names
            },
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _copy_side_files(source: Path, folder: Path) -> None:
    copied = [f for f in TOKENIZER_FILES if (source / f).is_file()]
    if not {"tokenizer.json", "tokenizer_config.json"} & set(copied):
        raise FileNotFoundError(
            f"{source} has no tokenizer files; the abliterated model must ship the original's "
            "tokenizer, so pass a model directory that has them."
        )
    for f in copied:
        shutil.copy2(source / f, folder / f)
    gen = source / "generation_config.json"
    if gen.is_file():
        shutil.copy2(gen, folder / gen.name)
    else:  # the stop tokens the project would use for the original
        from lpe_jax.model.tokenizer import eos_token_ids

        (folder / gen.name).write_text(json.dumps({"eos_token_id": eos_token_ids(source)}))


def output_bytes(source: str | Path, tied_head: str | None = None) -> int:
    """Tensor bytes `write_abliterated(source, ...)` writes (an untied head included)."""
    return sum(t.nbytes for t in _plan(Path(source), tied_head)[1].values())


def check_output_dir(source: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """`out` as a Path after checking it may be written: not the source or inside it, absent
    unless overwrite, and with overwrite only empty or an earlier abliteration (it is deleted)."""
    src, dst = Path(source).resolve(), Path(out).resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise ValueError(f"the output {out} overlaps the source checkpoint {source}; pick another.")
    if dst.exists():
        if not overwrite:
            raise FileExistsError(
                f"output directory {out} already exists; pass --overwrite (overwrite=True) to "
                "replace it, or pick another --out."
            )
        if not dst.is_dir() or (any(dst.iterdir()) and not (dst / PROVENANCE_FILE).exists()):
            raise FileExistsError(
                f"refusing to replace {out}: it is not empty and holds no {PROVENANCE_FILE}, so "
                "it was not written by this tool; pick another --out."
            )
    return Path(out)


def write_abliterated(
    source: str | Path,
    out: str | Path,
    direction: np.ndarray,
    *,
    provenance: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tied_head: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write the abliterated copy of HF directory `source` to `out` and return `out`.

    out holds config.json (untied if the source was tied), safetensors (sharded with an index
    above max_shard_bytes), the tokenizer files, generation_config.json, the unit direction as
    refusal_direction.npy and abliteration.json: the source's path and content hash, the
    direction's sha256, whether the head was untied, and `provenance` (layer, position, data
    hashes, ...). tied_head: see `_plan`. progress is called with the bytes of each tensor
    written.
    """
    source = Path(source)
    out = check_output_dir(source, out, overwrite=overwrite)
    hf, tensors, untie = _plan(source, tied_head)
    unit = unit_direction(direction, tensors[_embed_name(tensors)].shape[1])
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1; got {max_shard_bytes}.")
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # an interrupted earlier write of this output
    partial.mkdir(parents=True)
    _write_weights(partial, tensors, unit, max_shard_bytes, progress)
    if untie:
        hf = _untied(hf)
    (partial / "config.json").write_text(json.dumps(hf, indent=2))
    _copy_side_files(source, partial)
    np.save(partial / DIRECTION_FILE, unit)
    record = {
        "source": str(source.resolve()),
        "source_hash": checkpoint_fingerprint(source),
        "direction_sha256": hashlib.sha256(unit.tobytes()).hexdigest(),
        "untied_embeddings": untie,
        "edited": sorted(n for n in tensors if writes_residual(n) and n != _HEAD),
        **(provenance or {}),
    }
    (partial / PROVENANCE_FILE).write_text(json.dumps(record, indent=2))
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return out
