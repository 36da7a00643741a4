"""RowBlock: the request the rollout engine takes (lpe_jax.decoding.engine.RolloutEngine.submit).

Kept apart from the engine's module, which imports JAX, so that code that only builds requests
(lpe_jax.runs.scheduler, NumPy test fakes) does not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from typing import Any

import numpy as np

ALPHA_QUANTUM = 1e-6
"""The one alpha resolution: alphas are keyed by round(alpha / ALPHA_QUANTUM), so values closer
than this share rollouts (sampler row keys), streams (scheduler), chunk files (store) and offsets
(pipeline.LiveDraw)."""


@dataclasses.dataclass(frozen=True)
class RowBlock:
    """Rollouts rollout_start .. rollout_start + count - 1 of one (prompt, alpha, seed) stream.

    prompt_key: identifies the prompt's K/V prefix (computed once while the key is resident); the
        same key must always come with the same prompt_ids.
    prompt_ids: int [P], the chat-templated prompt. alpha: a point of the engine's path domain.
    seed: uint32. tag: the caller's; returned untouched in the BlockResult.
    """

    prompt_key: Hashable
    prompt_ids: np.ndarray
    alpha: float
    seed: int
    rollout_start: int
    count: int
    tag: Any = None
