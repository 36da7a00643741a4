"""Hugging Face Qwen3.5 checkpoints (model_type qwen3_5, qwen3_5_text, qwen3_5_moe,
qwen3_5_moe_text) -> `Qwen35` modules, without torch.

The text tower only: config.json's `text_config` for a multimodal checkpoint, tensors under
`model.language_model.` (Hub layout) or `model.` (`Qwen3_5ForCausalLM.save_pretrained`). The
vision tower (`model.visual.*`) and the multi-token-prediction head (`mtp.*`) are skipped with one
log line; any other tensor the config does not use is an error (config.json and the weights
disagree). Sharded or single safetensors in bf16, f16 or f32; every name and shape is checked from
the headers before any data is read, then each tensor is converted on the host and put on the
device once, into a module built abstractly (no random copy).
"""

from __future__ import annotations

import logging
import os
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lpe_jax.model.checkpoint import ST_TO_NP, read_config, read_headers, weight_files
from lpe_jax.model.hf_keymap import HFParam, check_shapes, skipped_names
from lpe_jax.model.qwen35 import MODEL_TYPES, Qwen35, Qwen35Config, hf_weight_table

log = logging.getLogger(__name__)
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def _walk(module: nnx.Module, path: tuple[str | int, ...]) -> nnx.Variable:
    obj: Any = module
    for p in path:
        obj = obj[p] if isinstance(p, int) else getattr(obj, p)
    return obj


def _unused(table: list[HFParam], names: set[str], cfg: Qwen35Config) -> list[str]:
    used = {n for e in table for n in e.names}
    ignorable = {n for n in names if n.endswith(_IGNORED_SUFFIXES)}
    if cfg.tie_word_embeddings:
        ignorable.add("lm_head.weight")  # some exports keep a copy of the tied embedding
    return sorted(names - used - ignorable - set(skipped_names(names)))


def check_checkpoint(cfg: Qwen35Config, headers: Mapping[str, Any]) -> list[HFParam]:
    """The key map of `cfg` for a checkpoint whose safetensors headers are `headers` (name ->
    (file, offset, info), as `read_headers` gives), after checking from them alone that every
    tensor the config needs is there with its shape and a supported dtype, and that nothing else
    is (vision and MTP tensors excepted). Raises ValueError naming the problem otherwise."""
    names = set(headers)
    table = hf_weight_table(cfg, names)
    unexpected = _unused(table, names, cfg)
    if unexpected:
        raise ValueError(
            f"checkpoint has {len(unexpected)} tensor(s) this Qwen3.5 config does not use, e.g. "
            f"{unexpected[:5]}; config.json does not describe these weights."
        )
    shapes = {n: types.SimpleNamespace(shape=tuple(h[2]["shape"])) for n, h in headers.items()}
    check_shapes(table, shapes)
    for entry in table:
        for name in entry.names:
            if headers[name][2]["dtype"] not in ST_TO_NP:
                raise ValueError(
                    f"tensor {name} has dtype {headers[name][2]['dtype']}; supported: "
                    f"{sorted(ST_TO_NP)}. Convert the checkpoint to bf16, f16 or f32."
                )
    return table


def abstract_model(path: str | os.PathLike, dtype: str = "bfloat16") -> Qwen35:
    """The `Qwen35` of HF directory `path` with abstract params in `dtype` (no memory, no data
    read), after the checks of `load_qwen35` (config and headers); for a params cache to fill."""
    return _prepare(Path(path), dtype)[0]


def _prepare(path: Path, dtype: str) -> tuple[Qwen35, list[HFParam], dict[str, Any], list[Path]]:
    """(abstract model, key map, headers, weight files) of a checked Qwen3.5 directory."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}; got {dtype!r}.")
    hf = read_config(path)
    if hf.get("model_type") not in MODEL_TYPES:
        raise ValueError(
            f"{path}: model_type {hf.get('model_type')!r} is not Qwen3.5; this loader reads "
            f"{MODEL_TYPES} (use lpe_jax.model.checkpoint.load_model for Qwen3)."
        )
    cfg = Qwen35Config.from_hf(hf)
    files = weight_files(path)
    headers = read_headers(files)
    table = check_checkpoint(cfg, headers)
    jdtype = _DTYPES[dtype]
    model = nnx.eval_shape(lambda: Qwen35(cfg, dtype=jdtype, rngs=nnx.Rngs(0)))
    return model, table, headers, files


def load_qwen35(path: str | os.PathLike, dtype: str = "bfloat16") -> Qwen35:
    """Load an HF Qwen3.5 directory's text model as a `Qwen35`, params in `dtype`
    ('float32' | 'bfloat16'). Raises ValueError for another model_type, a tensor the config does
    not use (vision/MTP excepted), a missing tensor, a shape or dtype mismatch."""
    path = Path(path)
    model, table, headers, files = _prepare(path, dtype)
    skipped = skipped_names(set(headers))
    if skipped:
        log.info("%s: skipping %d vision / multi-token-prediction tensors", path, len(skipped))
    maps = {f: np.memmap(f, dtype=np.uint8, mode="r") for f in files}

    def read(name: str) -> np.ndarray:
        file, start, info = headers[name]
        lo, hi = info["data_offsets"]
        raw = maps[file][start + lo : start + hi].view(ST_TO_NP[info["dtype"]])
        return raw.reshape(info["shape"])

    for entry in table:
        var = _walk(model, entry.path)
        value = entry.convert(*(read(n) for n in entry.names))
        if tuple(value.shape) != tuple(var.shape):
            raise ValueError(
                f"{'.'.join(map(str, entry.path))}: converted shape {value.shape} != parameter "
                f"shape {var.shape}; the key map and the module disagree."
            )
        host = np.ascontiguousarray(np.asarray(value, np.float32).astype(var.dtype))
        var.set_value(jax.device_put(host))
    return model
