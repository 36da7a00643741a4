"""Wiring shared by the experiment scripts and notebooks: a model pair, judged rollouts, jobs.

- `load_pair` loads the original and the variant from two HF directories and refuses a pair whose
  tokenizers differ (the path mixes logits token by token, so ids must mean the same text).
- `judge_rollouts` turns sampled token ids into int8 verdicts (1 / 0 / -1 unknown).
- `main_job` is the main job of one prompt as a scheduler job (lpe_jax.runs.scheduler): adaptive
  LPE, with importance sampling and naive sampling at LPE's budget drawn alongside it (Ahead
  draws). The scripts run every prompt's job at once on the rollout engine.
- `LiveDraw` is the blocking `draw(alpha, n)` callback of `lpe_jax.estimators.lpe` for one prompt
  in a notebook, backed by a PairedSampler and a judge: every call draws fresh rollouts
  (per-alpha rollout offsets), so the search and the fit never reuse a rollout, and the same seed
  replays the same run (the same rows the scheduler draws for that seed).
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

from lpe_jax.decoding.row_block import ALPHA_QUANTUM
from lpe_jax.decoding.sampler import PairedSampler, Rollouts
from lpe_jax.estimators.lpe import N_SEARCH, DrawResult, LPEStep, adaptive_search
from lpe_jax.judges.base import Judge
from lpe_jax.model.checkpoint import checkpoint_fingerprint, load_model
from lpe_jax.model.qwen3 import Qwen3
from lpe_jax.model.tokenizer import eos_token_ids, load_tokenizer
from lpe_jax.runs.scheduler import Ahead, Collect, Draw, Drawn, Job, judge_rows, search_job


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
    """The original (alpha = 1) and the variant (alpha = 0), sharing one tokenizer.

    variant None: a one-model path (the direction path: ``original`` is a DirectionalQwen3 and
    variant_dir is not read).
    """

    original: Qwen3
    variant: Qwen3 | None
    tokenizer: Any
    eos_token_ids: tuple[int, ...]
    original_dir: Path
    variant_dir: Path
    cache_dir: Path | None = None

    def fingerprint(self) -> dict[str, str]:
        """Content hashes of both checkpoints and the tokenizer, for run manifests."""
        memo = self.cache_dir
        out = {
            "original": str(self.original_dir.resolve()),
            "original_hash": checkpoint_fingerprint(self.original_dir, memo),
            "tokenizer_hash": tokenizer_fingerprint(self.tokenizer),
        }
        if self.variant is not None:
            out["variant"] = str(self.variant_dir.resolve())
            out["variant_hash"] = checkpoint_fingerprint(self.variant_dir, memo)
        return out

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
    variant_loader: Callable[[Qwen3], Qwen3] | None = None,
    mesh: Any = None,
) -> ModelPair:
    """Load both checkpoints and check they share a tokenizer (ValueError naming both if not).

    ``tied_head`` is passed to :func:`~lpe_jax.model.checkpoint.load_model` for both models.
    ``variant_loader``: builds the variant from the loaded original instead of `load_model`
    (e.g. `lpe_jax.model.low_rank.load_low_rank_variant`, which never holds it whole).
    ``mesh``: a `jax.sharding.Mesh` both models are loaded onto by the sharding rules
    (`load_model(mesh=)`: no device holds a whole model on a weight-splitting mesh); not with a
    ``variant_loader``. None: one device."""
    if mesh is not None and variant_loader is not None:
        raise ValueError("load_pair: a variant_loader reads the original whole; pass mesh=None.")
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
    on = {} if mesh is None else {"mesh": mesh}
    original = load_model(original_dir, dtype=dtype, cache_dir=cache_dir, tied_head=tied_head, **on)
    if variant_loader is None:
        variant = load_model(
            variant_dir, dtype=dtype, cache_dir=cache_dir, tied_head=tied_head, **on
        )
    else:
        variant = variant_loader(original)
    return ModelPair(
        original=original,
        variant=variant,
        tokenizer=tok_o,
        eos_token_ids=eos,
        original_dir=Path(original_dir),
        variant_dir=Path(variant_dir),
        cache_dir=None if cache_dir is None else Path(cache_dir),
    )


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


@dataclasses.dataclass(frozen=True)
class MainDraws:
    """What the main job drew for one prompt.

    trace: adaptive LPE's draws (lpe.adaptive_search); is_verdicts int8 [n] and is_log_weights
    float64 [n] (log p_original - log p_variant) of n rollouts of the variant (alpha = 0);
    naive_verdicts int8 [n] of n rollouts of the original (alpha = 1); n = LPE's rollouts.
    path: the same n LPE rollouts row by row, in draw order, for path importance sampling
    (lpe_jax.estimators.path_is): alphas float64 [n], verdicts int8 [n], logp_sampled and
    logp_original float32 [n] (NaN where a row stopped on non-finite logits, or where the engine
    has no endpoint log-probs, as on the direction path).
    """

    trace: tuple[LPEStep, ...]
    is_verdicts: np.ndarray
    is_log_weights: np.ndarray
    naive_verdicts: np.ndarray
    path: PathDraws


@dataclasses.dataclass(frozen=True)
class PathDraws:
    """Rows drawn along the path: alphas float64 [n], verdicts int8 [n] (-1 unknown),
    logp_sampled and logp_original float32 [n] (nats; see MainDraws)."""

    alphas: np.ndarray
    verdicts: np.ndarray
    logp_sampled: np.ndarray
    logp_original: np.ndarray

    @classmethod
    def of(cls, drawn: Sequence[Drawn]) -> PathDraws:
        """The rows of judged Drawn records, concatenated in order."""
        if not drawn:
            raise ValueError("no draws")
        if any(d.verdicts is None for d in drawn):
            raise ValueError("path draws need verdicts: build the Scheduler with a judge")
        return cls(
            alphas=np.concatenate([np.full(d.draw.n, float(d.draw.alpha)) for d in drawn]),
            verdicts=np.concatenate([d.verdicts for d in drawn]),
            logp_sampled=np.concatenate([d.logp_sampled for d in drawn]),
            logp_original=np.concatenate([d.logp_original for d in drawn]),
        )


def method_seed(seed: int, prompt_id: str, method: str) -> int:
    """The random stream of one method ('lpe', 'is', 'naive') of one prompt in a run."""
    return derive_seed(seed, prompt_id, method)


def main_job(
    prompt_id: str, seed: int, n_fit: int, *, n_search: int = N_SEARCH, importance: bool = True
) -> Job:
    """The main job of one prompt, as a scheduler job returning MainDraws.

    Adaptive LPE (n_search rollouts per scanned alpha, n_fit per fit alpha), then IS at alpha 0
    and naive sampling at alpha 1 with as many rollouts as LPE spent. IS and naive rows do not
    depend on LPE's verdicts, only their number does: each LPE draw of m rows starts m more of
    each as Ahead draws (the engine and judge work on them while LPE waits for its verdicts),
    collected when LPE ends. Each method has its own stream (method_seed) and its rows continue
    it, so every row equals the serial order's (LPE, then n IS rows, then n naive rows) whatever
    the judge's speed. ``importance=False`` (a path without endpoint log-probs, e.g. the
    direction path) draws no IS rollouts: is_verdicts and is_log_weights are then empty.
    """
    s_is, s_naive = method_seed(seed, prompt_id, "is"), method_seed(seed, prompt_id, "naive")

    def companions(m: int) -> Ahead:
        naive = Draw(1.0, m, s_naive)
        return Ahead([Draw(0.0, m, s_is), naive] if importance else [naive])

    search = adaptive_search(n_fit, n_search=n_search)
    lpe_rows: list[Drawn] = []
    seed_lpe = method_seed(seed, prompt_id, "lpe")
    trace = yield from search_job(search, seed_lpe, lpe_rows, ahead=companions)
    drawn = yield Collect()
    per_draw = 2 if importance else 1
    naive_rows = drawn[per_draw - 1 :: per_draw]
    n = sum(s.n for s in trace)
    if sum(d.draw.n for d in naive_rows) != n:
        raise RuntimeError(f"naive drew {sum(d.draw.n for d in naive_rows)} rows, LPE {n} (a bug)")
    naive_verdicts = np.concatenate([d.verdicts for d in naive_rows])
    if not importance:
        none = np.zeros(0, np.int8), np.zeros(0, np.float64)
        return MainDraws(trace, *none, naive_verdicts, PathDraws.of(lpe_rows))
    is_rows = drawn[0::2]
    return MainDraws(
        trace,
        np.concatenate([d.verdicts for d in is_rows]),
        np.concatenate([d.log_weights for d in is_rows]),
        naive_verdicts,
        PathDraws.of(lpe_rows),
    )


@dataclasses.dataclass
class LiveDraw:
    """Blocking `draw(alpha, n)` for the LPE estimators on one prompt: a PairedSampler and a judge.

    Every call at an alpha continues that alpha's rollout stream (rollout_offset), so no rollout is
    drawn twice; `log` keeps (alpha, verdicts [n], lengths [n]) of every call.
    """

    sampler: PairedSampler
    prompt_ids: np.ndarray
    prompt_text: str
    judge: Judge
    decode: Callable[[Sequence[int]], str]
    seed: int
    offsets: dict[int, int] = dataclasses.field(default_factory=dict)  # alpha in quanta -> next
    log: list[tuple[float, np.ndarray, np.ndarray]] = dataclasses.field(default_factory=list)

    def rollouts(self, alpha: float, n: int) -> tuple[Rollouts, np.ndarray]:
        """n fresh rollouts at alpha and their verdicts int8 [n]."""
        key = round(float(alpha) / ALPHA_QUANTUM)
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
