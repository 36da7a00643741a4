"""PairedSampler: rollouts of one prompt at many alphas along a logit path, on the rollout engine.

For one prompt and alphas a_1..a_A it draws R rollouts per alpha. At every step both models see the
row's own context; the next token is sampled from softmax(path(l_original, l_variant, alpha) / T),
and each endpoint's float32 log-probability of that token (at temperature 1) is accumulated, which
is what importance sampling and LPE need.

This is a thin API over `lpe_jax.decoding.engine.RolloutEngine`, the one decoder: a `sample` call
submits one request (RowBlock) per alpha and runs the engine until they finish. Rows therefore equal
the engine's rows for the same (seed, alpha, rollout index) (keys:
`lpe_jax.decoding.rollouts.row_keys`): they do not depend on the slot count, batch-mates, call order
or `rollout_offset` splits. With `variant=None` one model is sampled from its own logits at one
forward pass per token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from lpe_jax.decoding import sharding
from lpe_jax.decoding.engine import EngineStats, RolloutEngine
from lpe_jax.decoding.paths import PathFn, PathShape, as_path
from lpe_jax.decoding.rollouts import (
    ALPHA_QUANTUM,
    PAD_ID,
    Rollouts,
    alpha_keys,
    as_int,
    check_pair,
    check_prompt,
    compilations,
    prompt_bucket,
)
from lpe_jax.decoding.row_block import RowBlock
from lpe_jax.model.qwen3 import Qwen3

__all__ = ["ALPHA_QUANTUM", "PAD_ID", "PairedSampler", "Rollouts", "prompt_bucket"]

_ROW_FIELDS = (
    "tokens",
    "lengths",
    "logp_original",
    "logp_variant",
    "logp_sampled",
    "truncated",
    "nonfinite",
)
_TOKEN_FIELDS = ("token_logp_original", "token_logp_variant", "token_logp_path")


@dataclasses.dataclass
class _Runtime:
    """The sampler's engine (built for the longest prompt bucket seen) and compile count."""

    engine: RolloutEngine | None = None
    compiles: int = 0


@dataclasses.dataclass(frozen=True)
class PairedSampler:
    """Sample rollouts along `path` between `original` (alpha = 1) and `variant` (alpha = 0).

    original, variant: Qwen3 models with the same vocabulary (params are snapshotted when the
        first prompt is sampled). variant=None: `original` alone, sampled from its own logits
        (one forward pass per token; logp_original/logp_variant are then NaN).
    path: a PathShape, a registered name, or a callable (l_o, l_v, alpha) -> logits.
    max_new_tokens: generated tokens per row at most. eos_token_ids: ids that end a row (kept).
    temperature: divides the path logits before sampling (> 0); log-probs stay at temperature 1.
    max_rows: rows decoded at once (the engine's slots, rounded down to a multiple of the device
        count); None sizes it from free device memory, memory.DEFAULT_CPU_ROWS on CPU.
    devices: devices to shard rows over (default all local devices).
    tokenizer_ids: optional (original, variant) tokenizer names/hashes; must be equal.
    """

    original: Qwen3
    variant: Qwen3 | None
    path: PathShape | PathFn | str
    max_new_tokens: int
    eos_token_ids: Sequence[int]
    temperature: float = 1.0
    max_rows: int | None = None
    devices: Sequence[jax.Device] | None = None
    tokenizer_ids: tuple[str, str] | None = None
    _rt: _Runtime = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        variant = self.original if self.variant is None else self.variant
        check_pair(
            self.original,
            variant,
            self.max_new_tokens,
            self.eos_token_ids,
            self.temperature,
            self.tokenizer_ids,
        )
        if self.max_rows is not None:
            as_int("max_rows", self.max_rows, 1)
        sharding.row_mesh(self.devices)  # an empty device list fails here, not at sample time
        object.__setattr__(self, "path", as_path(self.path))
        object.__setattr__(self, "_rt", _Runtime())

    @property
    def num_devices(self) -> int:
        return len(jax.local_devices() if self.devices is None else self.devices)

    @property
    def num_compilations(self) -> int:
        """XLA compilations during this sampler's calls. Prompts of one bucket (`prompt_bucket`)
        share one engine and its compiled steps; a longer bucket builds a new engine."""
        return self._rt.compiles

    @property
    def stats(self) -> EngineStats | None:
        """The engine's counters since it was built (a longer prompt bucket builds a new one);
        None before the first call."""
        return None if self._rt.engine is None else self._rt.engine.stats

    def _engine(self, prompt_len: int) -> RolloutEngine:
        """The engine for prompts up to `prompt_len` tokens: the current one if its prompt buffers
        are long enough, else a new one (the old one's device state is released first)."""
        rt = self._rt
        if rt.engine is None or rt.engine.max_prompt_len < prompt_len:
            rt.engine = None
            rt.engine = RolloutEngine(
                self.original,
                self.variant,
                self.path,
                self.max_new_tokens,
                self.eos_token_ids,
                temperature=self.temperature,
                slots=self.max_rows,
                max_prompts=1,
                devices=self.devices,
                tokenizer_ids=self.tokenizer_ids,
                max_prompt_len=prompt_bucket(prompt_len),
                per_token=True,
            )
        return rt.engine

    def sample(
        self,
        prompt_ids: Any,
        alphas: Any,
        rollouts_per_alpha: int,
        seed: int,
        rollout_offset: int = 0,
        per_token: bool = False,
    ) -> Rollouts:
        """Draw rollouts_per_alpha rollouts at each alpha for one prompt (int ids [P]).

        Row (a, r) uses rollout index rollout_offset + r: drawing r = 0..4 then (offset 5) 5..9
        equals drawing 0..9 at once. Returns Rollouts with arrays [A, R(, T)].
        """
        variant = self.original if self.variant is None else self.variant
        ids = check_prompt(prompt_ids, (self.original.cfg, variant.cfg), self.max_new_tokens)
        alphas_f, _ = alpha_keys(self.path, alphas)
        r_n = as_int("rollouts_per_alpha", rollouts_per_alpha, 1)
        offset = as_int("rollout_offset", rollout_offset, 0, 2**32 - r_n)
        seed = as_int("seed", seed, 0, 2**32 - 1)
        if not isinstance(per_token, bool):
            raise ValueError(f"per_token must be a bool; got {per_token!r}.")
        before = compilations()
        engine = self._engine(ids.size)
        for a, alpha in enumerate(alphas_f):
            engine.submit(RowBlock(ids.tobytes(), ids, float(alpha), seed, offset, r_n, tag=a))
        parts = sorted(engine.run(), key=lambda res: res.block.tag)
        self._rt.compiles += compilations() - before
        fields = _ROW_FIELDS + (_TOKEN_FIELDS if per_token else ())
        cat = {f: np.concatenate([getattr(p.rollouts, f) for p in parts]) for f in fields}
        return Rollouts(**cat, alphas=alphas_f, rollout_offset=offset)
