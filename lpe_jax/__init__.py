"""lpe_jax: estimate rare behaviours of a language model by Logit Path Extrapolation.

The package is laid out by concern (the README's "Layout" section is the map): ``model`` (the Qwen
ports and checkpoints), ``decoding`` (the rollout engine and path shapes), ``runs`` (scheduler,
journal, run directory), ``judges``, ``estimators`` and ``evaluation`` (NumPy only),
``organisms`` (the toy pairs) and ``abliteration``.

The public API (``load_model``, ``model_logits``, ``PairedSampler``, ``Rollouts``, ``paths``) is
re-exported here, and so is every module under its old flat name (``from lpe_jax import toy``
keeps working). All are loaded lazily, so that ``lpe_jax.estimators`` and ``lpe_jax.evaluation``
stay JAX-free.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_model": ("lpe_jax.model.checkpoint", "load_model"),
    "model_logits": ("lpe_jax.model.forward", "model_logits"),
    "PairedSampler": ("lpe_jax.decoding.sampler", "PairedSampler"),
    "Rollouts": ("lpe_jax.decoding.sampler", "Rollouts"),
    "paths": ("lpe_jax.decoding.paths", None),
}

# Modules by the flat names they had before the subpackages (lpe_jax.toy -> organisms.toy).
_MODULES = {
    "model": "checkpoint forward qwen3 tokenizer",
    "decoding": "engine memory row_block sampler sharding",
    "runs": "bank data journal pipeline scheduler store",
    "evaluation": "plots report synthetic",
    "organisms": "toy toy2",
    "abliteration": "abliterate direction_path orthogonalize",
}
_LAZY |= {m: (f"lpe_jax.{sub}.{m}", None) for sub, ms in _MODULES.items() for m in ms.split()}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'lpe_jax' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    return module if attr is None else getattr(module, attr)
