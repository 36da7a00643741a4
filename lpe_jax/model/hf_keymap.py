"""Hugging Face tensor names -> parameters of the hybrid (Qwen3.5) and MoE layers.

Each layer module has a `hf_weight_table(cfg, prefix, ...)` returning `HFParam`s: which HF
tensors (names, shapes) make one of its parameters and how (a transpose, a squeeze, a stack of
per-expert tensors). `assign_hf` checks every shape before converting anything and writes the
converted arrays into the module. Tensors are NumPy arrays on the host (a safetensors reader or
a torch state dict converted with `.numpy()`).

Qwen3.5 checkpoints on the Hub are multimodal: the text tower sits under `model.language_model.`
(vision tower `model.visual.*`, multi-token-prediction head `mtp.*`, neither needed for text
sampling), while `Qwen3_5ForCausalLM.save_pretrained` writes `model.`; `text_prefix` tells which.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

TEXT_PREFIXES = ("model.language_model.", "model.")
# Tensors of a multimodal Qwen3.5 checkpoint that text sampling never reads.
SKIPPED_PREFIXES = ("model.visual.", "mtp.")


@dataclasses.dataclass(frozen=True)
class HFParam:
    """One module parameter made from HF tensors.

    path: attribute path inside the module (names, and ints for list items).
    names: the HF tensor names read (full names, prefix included).
    shapes: the HF shape each of them must have.
    convert: HF arrays (in `names` order) -> our array.
    """

    path: tuple[str | int, ...]
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    convert: Callable[..., np.ndarray]


def transposed(path: tuple[str | int, ...], name: str, shape: tuple[int, ...]) -> HFParam:
    """An HF Linear weight [out, in] stored as ours [in, out]."""
    return HFParam(path, (name,), (shape,), lambda w: w.T)


def same(path: tuple[str | int, ...], name: str, shape: tuple[int, ...]) -> HFParam:
    """A tensor stored as HF stores it (norm weights, per-head vectors)."""
    return HFParam(path, (name,), (shape,), lambda w: w)


def text_prefix(names: Collection[str]) -> str:
    """'model.language_model.' for a multimodal-layout checkpoint, else 'model.'.

    Raises ValueError when neither holds an embedding table (not a Qwen3.5 text checkpoint).
    """
    for prefix in TEXT_PREFIXES:
        if prefix + "embed_tokens.weight" in names:
            return prefix
    raise ValueError(
        "no 'model.language_model.embed_tokens.weight' or 'model.embed_tokens.weight' in the "
        "checkpoint; pass a Qwen3.5 / Qwen3-MoE text or multimodal checkpoint."
    )


def skipped_names(names: Collection[str]) -> list[str]:
    """Names of tensors text sampling does not load (vision tower, multi-token-prediction head)."""
    return sorted(n for n in names if n.startswith(SKIPPED_PREFIXES))


def _variable(module: nnx.Module, path: Sequence[str | int]) -> nnx.Variable:
    obj: Any = module
    for p in path:
        obj = obj[p] if isinstance(p, int) else getattr(obj, p)
    return obj


def check_shapes(table: Sequence[HFParam], tensors: Mapping[str, Any]) -> None:
    """Raise ValueError naming every missing tensor and every shape mismatch in `table`."""
    problems = []
    for entry in table:
        for name, shape in zip(entry.names, entry.shapes, strict=True):
            if name not in tensors:
                problems.append(f"missing {name} (expected shape {shape})")
            elif tuple(tensors[name].shape) != shape:
                problems.append(f"{name}: shape {tuple(tensors[name].shape)}, config says {shape}")
    if problems:
        raise ValueError(
            "checkpoint does not match the config: "
            + "; ".join(problems)
            + ". Check that config.json belongs to these weights."
        )


def assign_hf(module: nnx.Module, table: Sequence[HFParam], tensors: Mapping[str, Any]) -> None:
    """Write the converted HF tensors of `table` into `module`, in each parameter's dtype.

    Every shape is checked (`check_shapes`) before any parameter changes, and each converted array
    must have the parameter's shape.
    """
    check_shapes(table, tensors)
    for entry in table:
        var = _variable(module, entry.path)
        value = entry.convert(*(np.asarray(tensors[n]) for n in entry.names))
        if value.shape != var.shape:
            raise ValueError(
                f"{'.'.join(map(str, entry.path))}: converted shape {value.shape} != parameter "
                f"shape {var.shape}; the key map and the module disagree."
            )
        var[...] = jnp.asarray(value.astype(np.float32)).astype(var.dtype)


def nested(path: tuple[str | int, ...], table: Sequence[HFParam]) -> list[HFParam]:
    """A sub-module's table with `path` (the sub-module's place in its parent) prepended."""
    return [dataclasses.replace(e, path=path + e.path) for e in table]
