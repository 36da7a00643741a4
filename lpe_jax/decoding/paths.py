"""Path shapes: how the sampler's next-token logits depend on alpha.

A path shape is a plain function `(l_original, l_variant, alpha) -> logits`: float32 arrays
[B, V] for the two models' logits on the same context, alpha [B, 1] (or anything broadcastable),
returning float32 logits [B, V] to sample from (they need not be normalised). alpha = 1 must give
the original model and alpha = 0 the variant where the domain includes them. Each shape declares
the alpha values it is defined for; `PairedSampler` rejects alphas outside that domain.

Shapes live in a registry by name (`get_path`, `register_path`); a caller may also pass any
callable (wrapped by `as_path` with domain (-inf, inf)) or their own `PathShape`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

PathFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class PathShape:
    """A named path `fn(l_original, l_variant, alpha) -> logits` defined for alpha in [lo, hi]."""

    name: str
    fn: PathFn
    domain: tuple[float, float] = (-math.inf, math.inf)

    def __post_init__(self) -> None:
        lo, hi = self.domain
        if not lo <= hi:
            raise ValueError(f"path {self.name!r}: domain {self.domain} needs lo <= hi.")
        if not callable(self.fn):
            raise TypeError(f"path {self.name!r}: fn must be callable; got {type(self.fn)}.")

    def __call__(self, l_original: jax.Array, l_variant: jax.Array, alpha: jax.Array) -> jax.Array:
        return self.fn(l_original, l_variant, alpha)

    def check_alphas(self, alphas: np.ndarray) -> np.ndarray:
        """Return alphas as float64 [A]; raise ValueError if any is non-finite or off-domain."""
        a = np.asarray(alphas, dtype=np.float64)
        if a.ndim != 1 or a.size == 0:
            raise ValueError(f"alphas must be a non-empty 1-D array; got shape {a.shape}.")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"alphas must be finite; got {a[~np.isfinite(a)]}.")
        lo, hi = self.domain
        bad = a[(a < lo) | (a > hi)]
        if bad.size:
            raise ValueError(
                f"path {self.name!r} is defined for alpha in [{lo}, {hi}]; got {bad.tolist()}. "
                "Pass alphas inside the domain or use a path shape defined there "
                "(e.g. 'amplify' for alpha >= 1)."
            )
        return a


def _linear(l_original: jax.Array, l_variant: jax.Array, alpha: jax.Array) -> jax.Array:
    # This form (not l_v + alpha (l_o - l_v)) returns each endpoint bit-exactly at alpha in {0, 1}.
    return alpha * l_original + (1.0 - alpha) * l_variant


def _mixture(l_original: jax.Array, l_variant: jax.Array, alpha: jax.Array) -> jax.Array:
    alpha = jnp.asarray(alpha, jnp.float32)
    lp_o = jax.nn.log_softmax(l_original, axis=-1)
    lp_v = jax.nn.log_softmax(l_variant, axis=-1)
    # log(alpha p_o + (1 - alpha) p_v); log(0) = -inf drops an endpoint exactly at alpha in {0, 1}.
    return jnp.logaddexp(jnp.log(alpha) + lp_o, jnp.log1p(-alpha) + lp_v)


linear = PathShape("linear", _linear, (0.0, 1.0))
"""alpha l_o + (1 - alpha) l_v for alpha in [0, 1]: the normalised geometric mixture."""

amplify = PathShape("amplify", _linear, (1.0, math.inf))
"""The same formula for alpha >= 1: Logit Diff Amplification (extrapolates past the original)."""

mixture = PathShape("mixture", _mixture, (0.0, 1.0))
"""Probability mixture alpha p_o + (1 - alpha) p_v, returned as log-probabilities."""

_REGISTRY: dict[str, PathShape] = {p.name: p for p in (linear, amplify, mixture)}


def register_path(path: PathShape, *, overwrite: bool = False) -> PathShape:
    """Add `path` to the registry under `path.name`; refuses to replace one unless `overwrite`."""
    if not isinstance(path, PathShape):
        raise TypeError(f"register_path takes a PathShape; got {type(path).__name__}.")
    if path.name in _REGISTRY and not overwrite:
        raise ValueError(f"path {path.name!r} is already registered; pass overwrite=True.")
    _REGISTRY[path.name] = path
    return path


def get_path(name: str) -> PathShape:
    """The registered path shape called `name`."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown path {name!r}; registered: {sorted(_REGISTRY)}.")
    return _REGISTRY[name]


def available_paths() -> list[str]:
    """Names of the registered path shapes."""
    return sorted(_REGISTRY)


def as_path(path: PathShape | PathFn | str) -> PathShape:
    """Accept a PathShape, a registered name, or a bare callable (domain (-inf, inf))."""
    if isinstance(path, PathShape):
        return path
    if isinstance(path, str):
        return get_path(path)
    if callable(path):
        return PathShape(getattr(path, "__name__", "custom"), path)
    raise TypeError(
        f"path must be a PathShape, a registered name or a callable; got {type(path).__name__}."
    )
