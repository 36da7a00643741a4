"""Wiring shared by the experiment scripts and notebooks: a model pair, judged rollouts, live draws.

- `load_pair` loads the original and the variant from two HF directories and refuses a pair whose
  tokenizers differ (the path mixes logits token by token, so ids must mean the same text).
- `judge_rollouts` turns sampled token ids into int8 verdicts (1 / 0 / -1 unknown).
- `LiveDraw` is the `draw(alpha, n)` callback of `lpe_jax.estimators.lpe`, backed by the live
  sampler and a judge: every call draws fresh rollouts (per-alpha rollout offsets), so the search
  and the fit never reuse a rollout, and the same seed replays the same run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lpe_jax.checkpoint import checkpoint_fingerprint, load_model
from lpe_jax.estimators.lpe import DrawResult
from lpe_jax.judges.base import Judge
from lpe_jax.qwen3 import Qwen3
from lpe_jax.sampler import PairedSampler, Rollouts
from lpe_jax.tokenizer import eos_token_ids, load_tokenizer


def derive_seed(seed: int, *parts: str | int | float) -> int:
    """A 32-bit seed that is a pure function of `seed` and `parts` (stable across runs/hosts)."""
    text = json.dumps([int(seed), *[str(p) for p in parts]])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of a tokenizer's vocabulary and special tokens: equal hashes mean equal token ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = sorted(map(str, tokenizer.all_special_tokens))
    blob = json.dumps([vocab, special], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class ModelPair:
    """The original (alpha = 1) and the variant (alpha = 0), sharing one tokenizer."""

    original: Qwen3
    variant: Qwen3
    tokenizer: Any
    eos_token_ids: tuple[int, ...]
    original_dir: Path
    variant_dir: Path
    cache_dir: Path | None = None

    def fingerprint(self) -> dict[str, str]:
        """Content hashes of both checkpoints and the tokenizer, for run manifests."""
        memo = self.cache_dir
        return {
            "original": str(self.original_dir.resolve()),
            "original_hash": checkpoint_fingerprint(self.original_dir, memo),
            "variant": str(self.variant_dir.resolve()),
            "variant_hash": checkpoint_fingerprint(self.variant_dir, memo),
            "tokenizer_hash": tokenizer_fingerprint(self.tokenizer),
        }

    def decode(self, ids: Sequence[int]) -> str:
        """Response text of generated ids, special tokens (EOS) dropped."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def load_pair(
    original_dir: str | os.PathLike,
    variant_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    cache_dir: str | os.PathLike | None = None,
    tied_head: str | None = None,
) -> ModelPair:
    """Load both checkpoints and check they share a tokenizer (ValueError naming both if not).

    ``tied_head`` is passed to :func:`~lpe_jax.checkpoint.load_model` for both models."""
    tok_o, tok_v = load_tokenizer(original_dir), load_tokenizer(variant_dir)
    f_o, f_v = tokenizer_fingerprint(tok_o), tokenizer_fingerprint(tok_v)
    if f_o != f_v:
        raise ValueError(
            f"the tokenizers of {original_dir} and {variant_dir} differ (vocabulary or special "
            f"tokens; hashes {f_o} vs {f_v}). LPE mixes the two models' logits token by token, so "
            "the variant must be a fine-tune/abliteration of the original with the same tokenizer."
        )
    # From the loaded tokenizers (a real one takes seconds to load; each knows its directory).
    eos = tuple(sorted(set(eos_token_ids(tok_o)) | set(eos_token_ids(tok_v))))
    return ModelPair(
        original=load_model(original_dir, dtype=dtype, cache_dir=cache_dir, tied_head=tied_head),
        variant=load_model(variant_dir, dtype=dtype, cache_dir=cache_dir, tied_head=tied_head),
        tokenizer=tok_o,
        eos_token_ids=eos,
        original_dir=Path(original_dir),
        variant_dir=Path(variant_dir),
        cache_dir=None if cache_dir is None else Path(cache_dir),
    )


def judge_rows(
    judge: Judge,
    prompt_text: str,
    tokens: np.ndarray,
    lengths: np.ndarray,
    nonfinite: np.ndarray,
    decode: Callable[[Sequence[int]], str],
) -> np.ndarray:
    """Verdicts int8 [N] of N rows (tokens [N, T], lengths [N], nonfinite [N]).

    1 complied, 0 did not, -1 unknown: the judge could not decide, or the row was stopped on
    non-finite logits (never judged, never counted as a refusal).
    """
    verdicts = np.full(len(lengths), -1, np.int8)
    rows = np.flatnonzero(~np.asarray(nonfinite, bool))
    items = [(prompt_text, decode(tokens[i, : lengths[i]].tolist())) for i in rows]
    for i, v in zip(rows, judge.judge(items) if items else [], strict=True):
        if v.complied is not None:
            verdicts[i] = int(v.complied)
    return verdicts


def judge_rollouts(
    judge: Judge, prompt_text: str, rollouts: Rollouts, decode: Callable[[Sequence[int]], str]
) -> np.ndarray:
    """Verdicts int8 [A, R] of a sampler result (see judge_rows)."""
    a_n, r_n, t_n = rollouts.tokens.shape
    flat = judge_rows(
        judge,
        prompt_text,
        rollouts.tokens.reshape(-1, t_n),
        rollouts.lengths.reshape(-1),
        rollouts.nonfinite.reshape(-1),
        decode,
    )
    return flat.reshape(a_n, r_n)


@dataclasses.dataclass
class LiveDraw:
    """`draw(alpha, n)` for the LPE estimators, backed by a live PairedSampler and a judge.

    Every call at an alpha continues that alpha's rollout stream (rollout_offset), so no rollout is
    drawn twice; `log` keeps (alpha, verdicts [n], lengths [n]) of every call.
    """

    sampler: PairedSampler
    prompt_ids: np.ndarray
    prompt_text: str
    judge: Judge
    decode: Callable[[Sequence[int]], str]
    seed: int
    offsets: dict[float, int] = dataclasses.field(default_factory=dict)
    log: list[tuple[float, np.ndarray, np.ndarray]] = dataclasses.field(default_factory=list)

    def rollouts(self, alpha: float, n: int) -> tuple[Rollouts, np.ndarray]:
        """n fresh rollouts at alpha and their verdicts int8 [n]."""
        key = round(float(alpha), 6)
        offset = self.offsets.get(key, 0)
        r = self.sampler.sample(self.prompt_ids, [alpha], n, seed=self.seed, rollout_offset=offset)
        self.offsets[key] = offset + n
        verdicts = judge_rollouts(self.judge, self.prompt_text, r, self.decode)[0]
        self.log.append((float(alpha), verdicts, r.lengths[0]))
        return r, verdicts

    def __call__(self, alpha: float, n: int) -> DrawResult:
        r, v = self.rollouts(alpha, n)
        return DrawResult(
            k=int((v == 1).sum()),
            generated_tokens=int(r.lengths.sum()),
            n_judged=int((v >= 0).sum()),
        )
