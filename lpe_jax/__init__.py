"""lpe_jax: estimate rare behaviours of a language model by Logit Path Extrapolation.

The model-side API (``load_model``, ``model_logits``, ``PairedSampler``, ``paths``) imports JAX;
it is loaded lazily so that ``lpe_jax.estimators`` and ``lpe_jax.evaluation`` stay JAX-free.
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

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'lpe_jax' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    return module if attr is None else getattr(module, attr)
