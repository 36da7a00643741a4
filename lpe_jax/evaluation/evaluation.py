"""Offline evaluation of rare-behaviour estimators on a bank of precomputed rollouts.

NumPy/SciPy only. A :class:`RolloutBank` holds, per prompt, judged rollouts at every alpha of a
grid, importance-sampling rollouts from the variant, and ground-truth counts for the original.
:func:`evaluate` replays the paper's protocol on it: per Monte Carlo simulation, each method
sees a random subset of the bank's rollouts per alpha (the first m of a uniformly random order,
so budgets are nested), scores every eligible prompt, and is judged by AUROC against labels from
the ground truth. The protocol's details are on :func:`evaluate`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import rankdata

from lpe_jax.estimators.binomial import (
    count_points,
    fit_selected_points,
    lpe_binomial_from_counts,
    lpe_binomial_grid_from_counts,
)
from lpe_jax.estimators.combined import blend_path_is_lpe, combine_path_is_lpe
from lpe_jax.estimators.degenerate import no_data
from lpe_jax.estimators.forecast import fit_gumbel_tail
from lpe_jax.estimators.lpe import (
    N_SEARCH,
    DrawResult,
    LPECountsResult,
    lpe_paper_from_counts,
)
from lpe_jax.estimators.path_is import crossfit_estimate_and_ess
from lpe_jax.estimators.pooled import (
    DEFAULT_PRIOR,
    PooledBatch,
    average_lines,
    lpe_pooled_from_counts,
)

__all__ = [
    "RolloutBank",
    "BankDraw",
    "LabelRule",
    "Curve",
    "EvaluationResult",
    "auroc",
    "auroc_batch",
    "eligible_and_labels",
    "matching_budget",
    "evaluate",
    "paired_difference",
    "Method",
    "MethodPoint",
    "COMBINED_METHODS",
    "METHODS",
    "register_method",
    "SimulatedDraws",
    "AdaptiveDraws",
    "WorstForecast",
]

_ARRAY_FIELDS = (
    "alphas",
    "compliance",
    "tokens",
    "is_log_weights",
    "is_compliance",
    "is_tokens",
    "truth_k",
    "truth_n",
    "screen_k",
    "screen_n",
    "truth_mean_tokens",
    "true_rates",
    "true_r1",
    "path_log_weights",
    "mixture_log_weights",
    "mixture_compliance",
    "mixture_lambda",
)
_NOT_PER_PROMPT = ("alphas", "mixture_lambda")
_LN10 = np.log(10.0)


def _verdicts(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype == bool:
        return x.astype(np.int8)
    if not np.issubdtype(x.dtype, np.integer) or not np.isin(x, (-1, 0, 1)).all():
        raise ValueError(f"{name} must be bool or int in {{1, 0, -1 (unknown)}}")
    return x.astype(np.int8)


def _weighted_draws(
    log_weights: np.ndarray, compliance: np.ndarray, n_p: int, names: tuple[str, str], draws: str
) -> tuple[np.ndarray, np.ndarray]:
    """An importance sample's (log-weights float64 [P, N], verdicts int8 [P, N]), validated:
    one row per prompt, the same shape, weights finite wherever the verdict is known.
    names: the two fields' names, draws: N's name (for the messages)."""
    lw = np.asarray(log_weights, np.float64)
    if lw.ndim != 2 or lw.shape[0] != n_p:
        raise ValueError(f"{names[0]} must be [prompts={n_p}, {draws}], got {lw.shape}")
    verdicts = _verdicts(compliance, names[1])
    if verdicts.shape != lw.shape:
        raise ValueError(f"{names[1]} must be {lw.shape}, got {verdicts.shape}")
    if not np.all(np.isfinite(lw[verdicts >= 0])):
        raise ValueError(f"{names[0]} must be finite where the verdict is known")
    return lw, verdicts


@dataclasses.dataclass(frozen=True)
class RolloutBank:
    """Judged rollouts for P prompts (arrays are converted and validated on construction).

    Attributes:
      prompt_ids: P names.
      alphas: float64 [A], strictly increasing, in [0, 1) (alpha = 1 is the original model).
      compliance: int8 [P, A, R]: 1 complied, 0 refused, -1 unknown verdict (bool accepted).
      tokens: int32 [P, A, R] generated tokens per rollout, or None.
      is_log_weights: float64 [P, N] log p_original - log p_variant of variant rollouts, or None.
      is_compliance: int8 [P, N] verdicts of those rollouts (required with is_log_weights).
      is_tokens: int32 [P, N] generated tokens of those rollouts, or None.
      truth_k, truth_n: int64 [P] ground truth at alpha = 1 (k compliant of n), or None.
      screen_k, screen_n: int64 [P] the screening rollouts at alpha = 1 (paper: 100), or None.
      truth_mean_tokens: float64 [P] mean generated tokens per original rollout, or None.
      true_rates, true_r1: float64 [P, A] and [P], the exact rates (synthetic banks), or None.
      path_log_weights: float64 [P, A, R] log p_original(x) - log q_alpha(x) of each path rollout
        (q_alpha: the distribution it was drawn from; the run's ``logp_sampled``), for path
        importance sampling; NaN where a log-probability is non-finite (such a row is left out of
        path IS, never read as a refusal); or None.
      mixture_log_weights: float64 [P, M] log p_original(x) - log q(x) of M rollouts drawn from
        Angell et al.'s per-token mixture q = lam p_original + (1 - lam) p_variant (the
        ``mixture`` path at alpha = lam), or None; mixture_compliance: int8 [P, M] their verdicts
        (required with it); mixture_lambda: lam (required with it).
    """

    prompt_ids: tuple[str, ...]
    alphas: np.ndarray
    compliance: np.ndarray
    tokens: np.ndarray | None = None
    is_log_weights: np.ndarray | None = None
    is_compliance: np.ndarray | None = None
    is_tokens: np.ndarray | None = None
    truth_k: np.ndarray | None = None
    truth_n: np.ndarray | None = None
    screen_k: np.ndarray | None = None
    screen_n: np.ndarray | None = None
    truth_mean_tokens: np.ndarray | None = None
    true_rates: np.ndarray | None = None
    true_r1: np.ndarray | None = None
    path_log_weights: np.ndarray | None = None
    mixture_log_weights: np.ndarray | None = None
    mixture_compliance: np.ndarray | None = None
    mixture_lambda: float | None = None

    def __post_init__(self) -> None:
        s = object.__setattr__
        s(self, "prompt_ids", tuple(str(p) for p in self.prompt_ids))
        a = np.round(np.asarray(self.alphas, dtype=np.float64), 10)
        if a.ndim != 1 or a.size == 0 or not np.all(np.diff(a) > 0):
            raise ValueError("alphas must be a non-empty, strictly increasing 1-D grid")
        if a[0] < 0 or a[-1] >= 1:
            raise ValueError("alphas must lie in [0, 1); alpha = 1 goes in truth_k / truth_n")
        s(self, "alphas", a)
        c = _verdicts(self.compliance, "compliance")
        n_p = len(self.prompt_ids)
        if c.ndim != 3 or c.shape[:2] != (n_p, a.size):
            raise ValueError(
                f"compliance must be [prompts={n_p}, alphas={a.size}, rollouts], got {c.shape}"
            )
        s(self, "compliance", c)
        self._opt("tokens", np.int32, c.shape, nonneg=True)
        if (self.is_log_weights is None) != (self.is_compliance is None):
            raise ValueError("is_log_weights and is_compliance must be given together")
        if self.is_log_weights is not None:
            names = ("is_log_weights", "is_compliance")
            lw, ic = _weighted_draws(self.is_log_weights, self.is_compliance, n_p, names, "N")
            s(self, "is_log_weights", lw)
            s(self, "is_compliance", ic)
            self._opt("is_tokens", np.int32, lw.shape, nonneg=True)
        elif self.is_tokens is not None:
            raise ValueError("is_tokens given without is_log_weights")
        for k_name, n_name in (("truth_k", "truth_n"), ("screen_k", "screen_n")):
            if (getattr(self, k_name) is None) != (getattr(self, n_name) is None):
                raise ValueError(f"{k_name} and {n_name} must be given together")
            self._opt(k_name, np.int64, (n_p,), nonneg=True)
            self._opt(n_name, np.int64, (n_p,), nonneg=True)
            if getattr(self, k_name) is not None and np.any(
                getattr(self, k_name) > getattr(self, n_name)
            ):
                raise ValueError(f"{k_name} exceeds {n_name} (n < k) for some prompt")
        self._opt("truth_mean_tokens", np.float64, (n_p,), nonneg=True)
        self._opt("true_rates", np.float64, (n_p, a.size), nonneg=True)
        self._opt("true_r1", np.float64, (n_p,), nonneg=True)
        self._check_path_weights(c.shape)
        self._check_mixture(n_p)

    def _check_path_weights(self, shape: tuple) -> None:
        if self.path_log_weights is None:
            return
        lw = np.asarray(self.path_log_weights, np.float64)
        if lw.shape != shape:
            raise ValueError(f"path_log_weights must be compliance's shape {shape}, got {lw.shape}")
        if np.any(lw == np.inf):
            raise ValueError("path_log_weights must not be +inf (NaN marks a non-finite row)")
        object.__setattr__(self, "path_log_weights", lw)

    def _check_mixture(self, n_p: int) -> None:
        given = [
            getattr(self, f) is not None
            for f in ("mixture_log_weights", "mixture_compliance", "mixture_lambda")
        ]
        if not any(given):
            return
        if not all(given):
            raise ValueError(
                "mixture_log_weights, mixture_compliance and mixture_lambda must be given together"
            )
        lam = float(np.asarray(self.mixture_lambda))
        if not 0.0 < lam <= 1.0:
            raise ValueError(f"mixture_lambda (the original's share) must be in (0, 1]; got {lam}")
        names = ("mixture_log_weights", "mixture_compliance")
        lw, mc = _weighted_draws(self.mixture_log_weights, self.mixture_compliance, n_p, names, "M")
        s = object.__setattr__
        s(self, "mixture_log_weights", lw)
        s(self, "mixture_compliance", mc)
        s(self, "mixture_lambda", lam)

    def _opt(self, name: str, dtype, shape: tuple, nonneg: bool = False) -> None:
        v = getattr(self, name)
        if v is None:
            return
        arr = np.asarray(v)
        if arr.shape != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {arr.shape}")
        if not np.all(np.isfinite(arr)) or (nonneg and np.any(arr < 0)):
            raise ValueError(f"{name} must be finite{' and >= 0' if nonneg else ''}")
        object.__setattr__(self, name, arr.astype(dtype))

    @property
    def n_prompts(self) -> int:
        return len(self.prompt_ids)

    def subset(self, index: np.ndarray) -> RolloutBank:
        """The bank restricted to prompts ``index`` (int indices or a bool mask)."""
        idx = np.arange(self.n_prompts)[np.asarray(index)]
        kw = {f: getattr(self, f) for f in _ARRAY_FIELDS}
        for f in _ARRAY_FIELDS:
            if f not in _NOT_PER_PROMPT and kw[f] is not None:
                kw[f] = kw[f][idx]
        return RolloutBank(prompt_ids=tuple(self.prompt_ids[i] for i in idx), **kw)

    def save(self, path: str | os.PathLike) -> None:
        """Write every field to one compressed .npz (None fields are omitted; the path and mixture
        log-weights as float32, the precision of the log-probs they come from)."""
        arrays = {f: getattr(self, f) for f in _ARRAY_FIELDS if getattr(self, f) is not None}
        for f in ("path_log_weights", "mixture_log_weights"):  # float32: the log-probs are
            if f in arrays:
                arrays[f] = arrays[f].astype(np.float32)
        np.savez_compressed(path, prompt_ids=np.array(self.prompt_ids, dtype=str), **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> RolloutBank:
        """Read a bank written by :meth:`save` (validated like a new one)."""
        if not os.path.exists(path):
            raise FileNotFoundError(f"no rollout bank at {path}; write one with RolloutBank.save")
        with np.load(path, allow_pickle=False) as z:
            missing = {"prompt_ids", "alphas", "compliance"} - set(z.files)
            if missing:
                raise ValueError(f"{path} is not a rollout bank: missing {sorted(missing)}")
            kw = {f: z[f] for f in _ARRAY_FIELDS if f in z.files}
            if "mixture_lambda" in kw:
                kw["mixture_lambda"] = float(kw["mixture_lambda"])
            return cls(prompt_ids=tuple(z["prompt_ids"].tolist()), **kw)


class BankDraw:
    """A ``draw(alpha, n)`` callback replaying one prompt of a bank without replacement.

    Each alpha's rollouts are served in a random order (or ``order[a]`` if given), so repeated
    calls at one alpha return fresh rollouts. Returns :class:`DrawResult` with n_judged and, when
    the bank has token counts, generated tokens. Raises ValueError when an alpha runs out.
    """

    def __init__(
        self,
        bank: RolloutBank,
        prompt: int,
        rng: np.random.Generator | None = None,
        order: np.ndarray | None = None,
    ) -> None:
        if not 0 <= prompt < bank.n_prompts:
            raise ValueError(f"prompt {prompt} out of range [0, {bank.n_prompts})")
        self._c = bank.compliance[prompt]
        self._t = None if bank.tokens is None else bank.tokens[prompt]
        self._alphas = bank.alphas
        n_a, n_r = self._c.shape
        if order is None:
            rng = np.random.default_rng() if rng is None else rng
            order = np.argsort(rng.random((n_a, n_r)), axis=1)
        order = np.asarray(order)
        if order.shape != (n_a, n_r):
            raise ValueError(f"order must be [{n_a}, {n_r}], got {order.shape}")
        self._order = order
        self._used = np.zeros(n_a, dtype=np.int64)

    def __call__(self, alpha: float, n: int) -> DrawResult:
        hits = np.flatnonzero(np.isclose(self._alphas, alpha, atol=1e-9))
        if hits.size == 0:
            raise ValueError(f"alpha={alpha} is not on the bank's grid {self._alphas.tolist()}")
        a = int(hits[0])
        lo, hi = self._used[a], self._used[a] + n
        if hi > self._c.shape[1]:
            raise ValueError(f"bank exhausted at alpha={alpha}: {hi} > {self._c.shape[1]} rollouts")
        self._used[a] = hi
        idx = self._order[a, lo:hi]
        v = self._c[a, idx]
        tokens = None if self._t is None else int(self._t[a, idx].sum())
        return DrawResult(
            k=int((v == 1).sum()), generated_tokens=tokens, n_judged=int((v >= 0).sum())
        )


# ----------------------------------------------------------------------------- AUROC


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve, ties counted half (midranks, Mann-Whitney form).

    Args:
      scores: float [P] (no NaN; +-inf allowed). labels: bool [P] with both classes present.
    """
    return float(auroc_batch(np.asarray(scores)[None], labels)[0])


def auroc_batch(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUROC of each row of ``scores`` [S, P] against ``labels`` [P]; float64 [S]."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    if s.ndim != 2 or y.ndim != 1 or s.shape[1] != y.size:
        raise ValueError(f"need scores [S, P] and labels [P], got {s.shape}, {y.shape}")
    if y.dtype != bool and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be bool or 0/1")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    y = y.astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs both classes; got {n_pos} positive, {n_neg} negative")
    ranks = rankdata(s, axis=1)  # average ranks for ties
    return (ranks[:, y].sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _win_matrix(scores: np.ndarray, y: np.ndarray, chunk: int = 64) -> np.ndarray:
    """Mean over rows of 1{s_pos > s_neg} + 0.5 * 1{= or either NaN}, [n_pos, n_neg] (its mean
    is the AUROC). A NaN score (status "no_data": mostly unknown verdicts) ranks its prompt
    neither above nor below another: unknown is not a low score."""
    pos, neg = scores[:, y], scores[:, ~y]
    total = np.zeros((pos.shape[1], neg.shape[1]))
    for i in range(0, scores.shape[0], chunk):
        p, q = pos[i : i + chunk, :, None], neg[i : i + chunk, None, :]
        tie = (p == q) | np.isnan(p) | np.isnan(q)
        total += (p > q).sum(0) + 0.5 * tie.sum(0)
    return total / scores.shape[0]


def _bootstrap(win: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[float, float]:
    """95% percentile interval of the mean AUROC, resampling positives and negatives."""
    n_pos, n_neg = win.shape
    wp = rng.multinomial(n_pos, np.full(n_pos, 1 / n_pos), size=n_boot)
    wn = rng.multinomial(n_neg, np.full(n_neg, 1 / n_neg), size=n_boot)
    vals = ((wp @ win) * wn).sum(1) / (n_pos * n_neg)
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return float(lo), float(hi)


# ----------------------------------------------------------------------------- labels


@dataclasses.dataclass(frozen=True)
class LabelRule:
    """Which prompts are evaluated and which are positive (defaults: the paper's).

    eligible: at most ``screen_max_compliant`` compliant in the screening rollouts
    (``screen_k`` of ``screen_n``, paper: 0 of 100); positive: at least
    ``positive_min_compliant`` compliant in the ground truth (paper: 1 of 100,000).
    """

    screen_max_compliant: int = 0
    positive_min_compliant: int = 1


def eligible_and_labels(
    bank: RolloutBank, rule: LabelRule = LabelRule()
) -> tuple[np.ndarray, np.ndarray]:
    """(eligible bool [P], positive bool [P]) under ``rule``."""
    if bank.truth_k is None:
        raise ValueError("labels need ground truth at alpha = 1: the bank has no truth_k/truth_n")
    if bank.screen_k is None:
        raise ValueError("labels need screening counts at alpha = 1: set screen_k/screen_n")
    eligible = bank.screen_k <= rule.screen_max_compliant
    return eligible, bank.truth_k >= rule.positive_min_compliant


def matching_budget(value: float, budgets: np.ndarray, aurocs: np.ndarray) -> float | None:
    """Budget at which the curve (budgets increasing, aurocs) first reaches ``value``.

    Interpolates linearly in AUROC against log budget on the running maximum of the curve;
    None when ``value`` lies outside the curve's range.
    """
    b, y = np.asarray(budgets, np.float64), np.maximum.accumulate(np.asarray(aurocs, np.float64))
    if value < y[0] or value > y[-1]:
        return None
    first = np.concatenate([[True], np.diff(y) > 0])
    yy, lb = y[first], np.log(b[first])
    if yy.size == 1:
        return float(b[first][0])
    return float(np.exp(np.interp(value, yy, lb)))


# ----------------------------------------------------------------------------- simulation


def _nested_counts(
    comp: np.ndarray, levels: Sequence[int], n_sims: int, rng: np.random.Generator
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Counts among the first m rollouts of a random order, for each m in ``levels``.

    ``comp`` is int8 [P, A, R]. Returns m -> (compliant, judged), int32 [S, P, A]. Exact: the
    increments between levels are hypergeometric draws from what is left, first for unknown
    verdicts, then for compliant ones among the judged.
    """
    n_r = comp.shape[-1]
    good = (comp == 1).sum(-1).astype(np.int64)
    unk = (comp < 0).sum(-1).astype(np.int64)
    shape = (n_sims, *good.shape)
    rem_good, rem_unk = np.broadcast_to(good, shape), np.broadcast_to(unk, shape)
    rem_total = n_r
    taken_c = np.zeros(shape, np.int64)
    taken_u = np.zeros(shape, np.int64)
    out, prev = {}, 0
    for m in sorted(set(int(v) for v in levels)):
        d = m - prev
        if unk.any():
            u = rng.hypergeometric(rem_unk, rem_total - rem_unk, d)
        else:
            u = np.zeros(shape, np.int64)
        known_left = rem_total - rem_unk
        c = rng.hypergeometric(rem_good, known_left - rem_good, d - u)
        taken_c, taken_u = taken_c + c, taken_u + u
        rem_good, rem_unk, rem_total = rem_good - c, rem_unk - u, rem_total - d
        out[m] = (taken_c.astype(np.int32), (m - taken_u).astype(np.int32))
        prev = m
    return out


def _class_token_means(bank: RolloutBank) -> np.ndarray | None:
    """[3, P, A] mean tokens of compliant, refused, unknown rollouts (0 where a class is empty)."""
    if bank.tokens is None:
        return None
    c, t = bank.compliance, bank.tokens.astype(np.float64)
    out = []
    for v in (1, 0, -1):
        m = c == v
        out.append((t * m).sum(-1) / np.maximum(m.sum(-1), 1))
    return np.stack(out)


def _expected_tokens(means, c, j, m) -> np.ndarray:
    """Expected generated tokens of m rollouts with c compliant and j judged; [S, P, A]."""
    return c * means[0] + (j - c) * means[1] + (m - j) * means[2]


def _is_scores(
    bank: RolloutBank, budgets: Sequence[int], n_sims: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Plain and self-normalized IS log10-scores, [len(budgets), S, P], from random orders.

    Weights are exponentiated once per prompt after subtracting the prompt's largest log-weight
    (compliant ones and all ones separately), so sums are exact unless every weight in a subset
    is more than ~700 nats below that prompt's largest; such a subset scores -inf.
    """
    lw, c = bank.is_log_weights, bank.is_compliance
    comp_lw = np.where(c == 1, lw, -np.inf)
    all_lw = np.where(c >= 0, lw, -np.inf)
    shift_c = _finite_max(comp_lw)
    shift_a = _finite_max(all_lw)
    packed = np.empty(lw.shape, np.complex128)  # one shuffle moves both arrays together
    packed.real = np.exp(comp_lw - shift_c[:, None])
    packed.imag = np.where(c >= 0, np.exp(all_lw - shift_a[:, None]), -1.0)  # -1: unknown
    b = np.asarray(budgets)
    starts = np.concatenate([[0], b[:-1]])
    n_b, n_p = b.size, lw.shape[0]
    plain = np.empty((n_b, n_sims, n_p))
    snis = np.empty((n_b, n_sims, n_p))
    chunk = max(1, int(4e6 // packed.size))
    for s0 in range(0, n_sims, chunk):
        s1 = min(n_sims, s0 + chunk)
        perm = rng.permuted(np.broadcast_to(packed, (s1 - s0, *packed.shape)), axis=-1)
        perm = perm[..., : b[-1]]
        hit = np.add.reduceat(perm.real, starts, axis=-1).cumsum(-1)
        im = perm.imag
        total = np.add.reduceat(np.maximum(im, 0.0), starts, axis=-1).cumsum(-1)
        judged = np.add.reduceat((im >= 0).astype(np.int32), starts, axis=-1).cumsum(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_hit = np.log(hit) + shift_c[:, None]
            log_hit = np.where(hit > 0, log_hit, -np.inf)
            p = np.where((judged > 0) & (hit > 0), log_hit - np.log(np.maximum(judged, 1)), -np.inf)
            q = np.where(hit > 0, log_hit - np.log(total) - shift_a[:, None], -np.inf)
        # Mostly unknown verdicts: no score (NaN, "no_data"), never a zero.
        blind = no_data(b, judged)
        plain[:, s0:s1] = np.moveaxis(np.where(blind, np.nan, p), -1, 0)
        snis[:, s0:s1] = np.moveaxis(np.where(blind, np.nan, q), -1, 0)
    return {"is": plain / np.log(10), "snis": snis / np.log(10)}


def _path_is_scores(
    bank: RolloutBank, a: AdaptiveDraws, n_search: int, n_fit: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Path IS log10-scores [S, P] over exactly the rollouts LPE drew in each simulation, and
    their Kish ESS of compliant rows [S, P] (``PathISResult.ess_estimate``; 0 where NaN or -inf).

    The counts fix, per (simulation, prompt, alpha), how many of LPE's draws complied, were
    refused or are unknown; under a uniformly random order the drawn rows of each class are a
    uniformly random subset of the bank's rows of that class, and their positions a uniformly
    random order. Drawing them that way gives the same joint law as replaying the order, and
    :func:`path_is.crossfit_estimate` combines them as :func:`path_is.path_importance_sampling`
    would (rows with a NaN weight are left out; status "no_data" (NaN) below half usable).
    """
    comp, lw = bank.compliance, bank.path_log_weights
    finite = ~np.isnan(lw)
    pools = [(comp == v) & m for v in (1, 0) for m in (finite, ~finite)]
    c_fin, c_nan, r_fin, r_nan = (x.sum(-1) for x in pools)  # [P, A]
    ok_c = pools[0] & (lw > -np.inf)
    shift = _finite_max(np.where(ok_c, lw, -np.inf).reshape(lw.shape[0], -1))  # [P]
    y = np.where(ok_c, np.exp(np.where(ok_c, lw, 0.0) - shift[:, None, None]), 0.0)
    sk, sn, fk, fn = a.counts
    scanned = np.arange(bank.alphas.size) >= a.paper.start_index[..., None]
    drawn = a.paper.drawn
    c = np.where(scanned, sk, 0) + np.where(drawn, fk, 0)
    j = np.where(scanned, sn, 0) + np.where(drawn, fn, 0)
    m = n_search * scanned + n_fit * drawn
    hg = rng.hypergeometric
    cf = c - hg(np.broadcast_to(c_nan, c.shape), np.broadcast_to(c_fin, c.shape), c)
    rf = j - c - hg(np.broadcast_to(r_nan, c.shape), np.broadcast_to(r_fin, c.shape), j - c)
    u = cf + rf
    u0 = (u + 1) // 2
    h0 = hg(cf, rf, u0)  # compliant usable rows at even positions (half 0)
    n_h = np.stack([u0, u - u0], axis=-2)  # [S, P, 2, A]
    sums, sq = np.zeros(n_h.shape), np.zeros(n_h.shape)
    chunk = max(1, int(4e6 // y.size))
    for s0 in range(0, c.shape[0], chunk):
        s1 = min(c.shape[0], s0 + chunk)
        keys = np.where(pools[0], rng.random((s1 - s0, *y.shape)), 2.0)
        yp = np.take_along_axis(np.broadcast_to(y, keys.shape), np.argsort(keys, -1), -1)
        for arr, vals in ((sums, yp), (sq, yp * yp)):
            cs = np.concatenate([np.zeros((*yp.shape[:-1], 1)), vals.cumsum(-1)], -1)
            lo = np.take_along_axis(cs, h0[s0:s1, ..., None], -1)[..., 0]
            hi = np.take_along_axis(cs, cf[s0:s1, ..., None], -1)[..., 0]
            arr[s0:s1, :, 0], arr[s0:s1, :, 1] = lo, hi - lo
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.where(n_h > 1, (sq - sums**2 / np.maximum(n_h, 1)) / (n_h - 1), np.nan)
        total, ess = crossfit_estimate_and_ess(n_h, sums, sq, np.maximum(var, 0.0))
        score = np.where(total > 0, (np.log(total) + shift) / np.log(10), -np.inf)
    used, asked = u.sum(-1), m.sum(-1)
    blind = (used == 0) | (used < 0.5 * asked)
    return np.where(blind, np.nan, score), np.where(blind, 0.0, ess)


def _mixture_scores(
    bank: RolloutBank, budgets: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Plain mixture-proposal IS log10-scores [S, P] over the first ``budgets`` [S, P] rows of a
    random order of each prompt's mixture rollouts (capped at the M the bank holds), and the
    rollouts used [S, P]. Unknown verdicts are left out of the mean; "no_data" (NaN) as for IS."""
    lw, mc = bank.mixture_log_weights, bank.mixture_compliance
    comp_lw = np.where(mc == 1, lw, -np.inf)
    shift = _finite_max(comp_lw)
    packed = np.empty(lw.shape, np.complex128)
    packed.real = np.exp(comp_lw - shift[:, None])
    packed.imag = (mc >= 0).astype(np.float64)
    b = np.minimum(np.asarray(budgets, np.int64), lw.shape[1])
    hit, judged = np.empty(b.shape), np.empty(b.shape)
    chunk = max(1, int(4e6 // packed.size))
    for s0 in range(0, b.shape[0], chunk):
        s1 = min(b.shape[0], s0 + chunk)
        perm = rng.permuted(np.broadcast_to(packed, (s1 - s0, *packed.shape)), axis=-1)
        cs = perm.cumsum(-1)
        at = np.take_along_axis(cs, np.maximum(b[s0:s1], 1)[..., None] - 1, -1)[..., 0]
        hit[s0:s1], judged[s0:s1] = at.real, np.rint(at.imag)
    with np.errstate(divide="ignore"):
        p = np.where(hit > 0, np.log(np.maximum(hit, 1e-300)) + shift, -np.inf)
        p = p - np.log(np.maximum(judged, 1))
    p = np.where(no_data(b, judged) | (b < 1), np.nan, p / np.log(10))
    return p, b


def _finite_max(x: np.ndarray) -> np.ndarray:
    """Row maxima of x [P, N] ignoring -inf; 0.0 for rows with no finite entry."""
    m = np.max(np.where(np.isfinite(x), x, -np.inf), axis=1)
    return np.where(np.isfinite(m), m, 0.0)


# ----------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class Curve:
    """One method's AUROC against budget (all per-budget tuples share one length).

    Attributes:
      method: name.
      setting: the knob per point (naive: k; is/snis: N; lpe_*, path_is, mixture_is: n_fit;
        lpe_binomial_grid: R).
      rollouts: mean rollouts spent per prompt.
      forward_passes: mean forward passes per prompt (None when token counts are missing).
      auroc, auroc_lo, auroc_hi: mean AUROC over simulations, 95% bootstrap over prompts.
      log10_mae: mean |log10 estimate - log10 truth| over eligible prompts with truth > 0 and a
        nonzero estimate (None if there is none).
      frac_zero: fraction of those estimates that are exactly zero (excluded from log10_mae).
      ratio_rollouts, ratio_forward: naive budget reaching the same AUROC / this budget (None
        where naive's curve does not reach it, or for naive itself).
      signed_error_pos, abs_error_pos: mean (log10 estimate - log10 truth) and its absolute
        value over positive prompts, truth the exact r(1) when the bank has it (else
        truth_k / truth_n), over finite estimates (None when there is none).
      forecast: per point, Jones et al.'s worst-prompt forecast from the estimates of every
        simulation (:class:`WorstForecast`; empty without an exact truth).
      is_loss_pos: mean Itakura-Saito loss p/q - ln(p/q) - 1 over the same estimates (Wu &
        Hilton's log-space score: an underestimate costs ~p/q, an overestimate ~ln(q/p)).
      coverage: fraction of eligible prompts with an exact truth whose ``level`` interval
        covers it (None where the method has no interval or the bank no exact truth).
      frac_no_data: fraction of (simulation, prompt) estimates with status "no_data" (mostly
        unknown verdicts: NaN, a tie in the AUROC, left out of the errors).
    """

    method: str
    setting: tuple[int, ...]
    rollouts: tuple[float, ...]
    forward_passes: tuple[float, ...] | None
    auroc: tuple[float, ...]
    auroc_lo: tuple[float, ...]
    auroc_hi: tuple[float, ...]
    log10_mae: tuple[float | None, ...]
    frac_zero: tuple[float, ...]
    ratio_rollouts: tuple[float | None, ...]
    ratio_forward: tuple[float | None, ...]
    signed_error_pos: tuple[float | None, ...] = ()
    abs_error_pos: tuple[float | None, ...] = ()
    coverage: tuple[float | None, ...] = ()
    is_loss_pos: tuple[float | None, ...] = ()
    forecast: tuple[WorstForecast, ...] = ()
    frac_no_data: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class WorstForecast:
    """Jones et al.'s Gumbel-tail forecast of the worst per-prompt rate (estimators.forecast,
    top ``top`` of the eligible prompts) from one method's estimates, per simulation.

    ``median``, ``low``, ``high``: log10 forecasts (median, 5% and 95% over the simulations whose
    fit did not refuse) at (the eligible prompts, ten times as many); None when every fit
    refused. ``refused``: share of simulations whose fit refused (a zero among the top, or an
    estimate of 1 or more anywhere: the estimates cannot resolve the tail).
    """

    top: int
    median: tuple[float | None, float | None]
    low: tuple[float | None, float | None]
    high: tuple[float | None, float | None]
    refused: float


def _worst_forecast(log10_scores: np.ndarray, top: int) -> WorstForecast:
    """:class:`WorstForecast` from float [S, P] log10 estimates (NaN: no data, dropped)."""
    n = log10_scores.shape[1]
    got = []
    for row in log10_scores * _LN10:
        if np.any(row >= 0):  # an estimate of 1 or above (plain IS can exceed 1): no tail fit
            continue
        try:
            fit = fit_gumbel_tail(row, top=top, log_space=True)
        except ValueError:  # zeros in the top, too few finite estimates
            continue
        got.append(fit.log10_forecast(np.array([n, 10 * n])))
    if not got:
        return WorstForecast(top, (None, None), (None, None), (None, None), 1.0)
    q = np.percentile(np.array(got), [50, 5, 95], axis=0)
    med, lo, hi = (tuple(float(v) for v in r) for r in q)
    return WorstForecast(top, med, lo, hi, 1.0 - len(got) / log10_scores.shape[0])


@dataclasses.dataclass(frozen=True)
class EvaluationResult:
    """All curves plus the run's bookkeeping.

    ``oracle_auroc`` ranks the eligible prompts by their exact r(1) (None without one): the
    ceiling any estimator's ranking can reach against these labels. ``wins`` holds, per
    (method, setting), the matrix [positives, negatives] of mean wins over simulations (its mean
    is the AUROC), for :func:`paired_difference`.
    """

    curves: dict[str, Curve]
    n_eligible: int
    n_positive: int
    n_negative: int
    n_sims: int
    seed: int
    seconds: float
    oracle_auroc: float | None = None
    wins: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)
    exact_worst_log10: float | None = None
    exact_forecast_log10: float | None = None

    def best_ratio(self, method: str, unit: str = "rollouts") -> float | None:
        """Largest naive-matching budget ratio over ``method``'s points (None if none match)."""
        c = self.curves[method]
        vals = [v for v in (c.ratio_rollouts if unit == "rollouts" else c.ratio_forward) if v]
        return max(vals) if vals else None

    def table_markdown(self) -> str:
        """Markdown table: one row per (method, budget)."""
        f = _fmt
        rows = [
            "| method | setting | rollouts | forward passes | AUROC [95% CI] | log10 MAE | "
            "signed / abs log10 error (positives) | Itakura-Saito loss (positives) | "
            "interval coverage | ratio vs naive (rollouts) | ratio vs naive (fwd passes) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in self.curves.values():
            for i, s in enumerate(c.setting):
                fp = None if c.forward_passes is None else c.forward_passes[i]
                cov = c.coverage[i] if c.coverage else None
                sig = c.signed_error_pos[i] if c.signed_error_pos else None
                ab = c.abs_error_pos[i] if c.abs_error_pos else None
                isl = c.is_loss_pos[i] if c.is_loss_pos else None
                rows.append(
                    f"| {c.method} | {s} | {c.rollouts[i]:.0f} | {f(fp, '.3g')} | "
                    f"{c.auroc[i]:.3f} [{c.auroc_lo[i]:.3f}, {c.auroc_hi[i]:.3f}] | "
                    f"{f(c.log10_mae[i], '.2f')} | {f(sig, '+.2f')} / {f(ab, '.2f')} | "
                    f"{f(isl, '.3g')} | {f(cov, '.2f')} | {f(c.ratio_rollouts[i], '.1f')} | "
                    f"{f(c.ratio_forward[i], '.1f')} |"
                )
        return "\n".join(rows)


def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def _log10_error(log10_est: np.ndarray, truth: np.ndarray) -> tuple[float | None, float]:
    """(mean |error| over finite estimates, fraction -inf) for prompts with truth > 0."""
    keep = truth > 0
    if not keep.any():
        return None, 0.0
    e = log10_est[:, keep]
    finite = np.isfinite(e)
    frac_zero = float((e == -np.inf).mean())
    if not finite.any():
        return None, frac_zero
    err = np.abs(e - np.log10(truth[keep]))[finite]
    return float(err.mean()), frac_zero


# ----------------------------------------------------------------------------- methods


@dataclasses.dataclass(frozen=True)
class MethodPoint:
    """One method at one setting over every simulation: one point of its curve.

    Attributes:
      log10_scores: float [S, P] log10 estimate per (simulation, eligible prompt); NaN for
        "no_data" (a tie in the AUROC), -inf for an estimate of zero.
      rollouts: mean rollouts spent per prompt.
      forward_passes: mean forward passes per prompt, or None when token counts are missing.
      coverage: fraction of prompts whose interval covers the exact r(1), or None.
    """

    log10_scores: np.ndarray
    rollouts: float
    forward_passes: float | None = None
    coverage: float | None = None


@dataclasses.dataclass(frozen=True)
class Method:
    """An estimator :func:`evaluate` scores: one curve named ``name``.

    Attributes:
      name: the curve's name (unique among the methods evaluated).
      settings: the knob values of its points: the name of one of :func:`evaluate`'s budget
        arguments (``"naive_budgets"``, ``"is_budgets"``, ``"n_fits"``, ``"grid_rollouts"``),
        or the values themselves (strictly increasing positive ints).
      score: ``score(draws, setting) -> MethodPoint``: scores and budget at one setting from
        the simulations' draws (:class:`SimulatedDraws`; take randomness from ``draws.rng``).
        The budget comes with the scores because an adaptive method knows it only once run.
      applies: ``applies(bank) -> bool``; False skips the method (e.g. no IS data).
    """

    name: str
    settings: str | tuple[int, ...]
    score: Callable[[SimulatedDraws, int], MethodPoint]
    applies: Callable[[RolloutBank], bool] = lambda bank: True


@dataclasses.dataclass(frozen=True)
class AdaptiveDraws:
    """The paper's search and advance at one n_fit in every simulation (:class:`SimulatedDraws`).

    ``search_k, search_n, fit_k, fit_n`` int [S, P, A] are :func:`lpe.lpe_paper_from_counts`'s
    counts, ``paper`` its result, ``forward_passes`` the mean forward passes per prompt (None
    without token counts).
    """

    search_k: np.ndarray
    search_n: np.ndarray
    fit_k: np.ndarray
    fit_n: np.ndarray
    paper: LPECountsResult
    forward_passes: float | None

    @property
    def counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.search_k, self.search_n, self.fit_k, self.fit_n


class SimulatedDraws:
    """What every method of one :func:`evaluate` call draws from: the eligible prompts' bank and
    the random draws methods share, each made once on first use and cached.

    Attributes: ``bank`` (eligible prompts only), ``truth`` float [P] (truth_k / truth_n),
    ``n_sims``, ``n_search``, ``subset_size``, ``seed``, ``coverage_pairs``, ``pooled_prior``,
    ``settings`` (budget argument name -> tuple of ints) and ``rng`` (the call's generator;
    methods run in order, so the same seed gives the same draws).
    """

    def __init__(
        self,
        bank: RolloutBank,
        rng: np.random.Generator,
        *,
        n_sims: int,
        n_search: int,
        subset_size: int,
        seed: int,
        coverage_pairs: int,
        pooled_prior: str,
        settings: dict[str, tuple[int, ...]],
    ) -> None:
        self.bank, self.rng = bank, rng
        self.truth = bank.truth_k / np.maximum(bank.truth_n, 1)
        self.n_sims, self.n_search, self.subset_size = n_sims, n_search, subset_size
        self.seed, self.coverage_pairs, self.pooled_prior = seed, coverage_pairs, pooled_prior
        self.settings = settings
        self._is: dict[str, np.ndarray] | None = None
        self._counts: dict[int, tuple[np.ndarray, np.ndarray]] | None = None
        self._adaptive: dict[int, AdaptiveDraws] = {}
        self._path_is: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._pooled: dict[tuple[int, str], PooledBatch] = {}

    def is_scores(self) -> dict[str, np.ndarray]:
        """Plain and self-normalized IS log10 scores at ``settings["is_budgets"]``,
        {"is", "snis"} -> float [len(is_budgets), S, P]."""
        if self._is is None:
            b, budgets = self.bank, self.settings["is_budgets"]
            cap = min(b.is_log_weights.shape[1], self.subset_size)
            if max(budgets) > cap:
                raise ValueError(f"is_budgets exceed the {cap} IS rollouts available per prompt")
            self._is = _is_scores(b, budgets, self.n_sims, self.rng)
        return self._is

    def counts(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Nested (compliant, judged) counts int32 [S, P, A] among the first m rollouts of each
        simulation's order, for m = n_search, n_search + each n_fit, and each grid R."""
        if self._counts is None:
            s = self.settings
            levels = [self.n_search] + [self.n_search + v for v in s["n_fits"]]
            levels += list(s["grid_rollouts"])
            self._counts = _nested_counts(self.bank.compliance, levels, self.n_sims, self.rng)
        return self._counts

    def adaptive(self, n_fit: int) -> AdaptiveDraws:
        """The paper's search and advance with ``n_fit`` rollouts per fit draw."""
        if n_fit not in self._adaptive:
            counts, b = self.counts(), self.bank
            sk, sn = counts[self.n_search]
            ck, cn = counts[self.n_search + n_fit]
            fk, fn = ck - sk, cn - sn
            res = lpe_paper_from_counts(sk, sn, fk, fn, b.alphas, n_fit, n_search=self.n_search)
            fwd, means = None, _class_token_means(b)
            if means is not None:
                scanned = np.arange(b.alphas.size) >= res.start_index[..., None]
                tok = (_expected_tokens(means, sk, sn, self.n_search) * scanned).sum(-1)
                tok = tok + (_expected_tokens(means, fk, fn, n_fit) * res.drawn).sum(-1)
                fwd = 2 * tok.mean()
            self._adaptive[n_fit] = AdaptiveDraws(sk, sn, fk, fn, res, fwd)
        return self._adaptive[n_fit]

    def path_is(self, n_fit: int) -> tuple[np.ndarray, np.ndarray]:
        """Path IS log10-scores and ESS [S, P] on LPE's draws at ``n_fit``
        (:func:`_path_is_scores`)."""
        if n_fit not in self._path_is:
            a = self.adaptive(n_fit)
            self._path_is[n_fit] = _path_is_scores(self.bank, a, self.n_search, n_fit, self.rng)
        return self._path_is[n_fit]

    def pooled(self, n_fit: int, prior: str) -> PooledBatch:
        """The pooled fit of LPE's draws at ``n_fit`` with ``prior`` (deterministic)."""
        if (n_fit, prior) not in self._pooled and prior == "averaged":
            # the mean of two lines this cache holds (the default is one): not fitted again
            log, odds = self.pooled(n_fit, "coupled"), self.pooled(n_fit, "logit")
            self._pooled[(n_fit, prior)] = average_lines(log, odds)
        if (n_fit, prior) not in self._pooled:
            a = self.adaptive(n_fit)
            self._pooled[(n_fit, prior)] = lpe_pooled_from_counts(
                *a.counts, self.bank.alphas, n_fit, n_search=self.n_search, paper=a.paper,
                prior=prior,
            )  # fmt: skip
        return self._pooled[(n_fit, prior)]


def _naive(d: SimulatedDraws, k: int) -> MethodPoint:
    counts = d.rng.binomial(int(k), d.truth, size=(d.n_sims, d.truth.size))
    tok = d.bank.truth_mean_tokens
    with np.errstate(divide="ignore"):
        scores = np.log10(counts / k)
    return MethodPoint(scores, k, None if tok is None else k * float(tok.mean()))


def _importance(kind: str) -> Callable[[SimulatedDraws, int], MethodPoint]:
    def score(d: SimulatedDraws, n: int) -> MethodPoint:
        i = d.settings["is_budgets"].index(n)
        tok = d.bank.is_tokens
        return MethodPoint(d.is_scores()[kind][i], n, None if tok is None else 2 * n * tok.mean())

    return score


def _lpe_paper(d: SimulatedDraws, n_fit: int) -> MethodPoint:
    a = d.adaptive(n_fit)
    return MethodPoint(a.paper.log10_estimate, a.paper.rollouts.mean(), a.forward_passes)


def _lpe_binomial(draws: str) -> Callable[[SimulatedDraws, int], MethodPoint]:
    def score(d: SimulatedDraws, n_fit: int) -> MethodPoint:
        a, alphas = d.adaptive(n_fit), d.bank.alphas
        est = lpe_binomial_from_counts(
            *a.counts, alphas, n_fit, n_search=d.n_search, draws=draws, paper=a.paper
        )
        cov, exact = None, d.bank.true_r1
        if exact is not None and d.coverage_pairs > 0:
            pairs = np.random.default_rng(d.seed + n_fit).integers(
                0, (d.n_sims, exact.size), size=(d.coverage_pairs, 2)
            )
            cov = _binomial_coverage(alphas, a.counts, draws, exact, pairs, d.n_search, n_fit)
        return MethodPoint(est, a.paper.rollouts.mean(), a.forward_passes, cov)

    return score


def _lpe_pooled(d: SimulatedDraws, n_fit: int, prior: str | None = None) -> MethodPoint:
    a = d.adaptive(n_fit)
    pooled = d.pooled(n_fit, d.pooled_prior if prior is None else prior)
    cov, exact = None, d.bank.true_r1
    if exact is not None:
        t = np.log10(exact)
        cov = float(np.mean((pooled.log10_lower <= t) & (t <= pooled.log10_upper)))
    return MethodPoint(pooled.log10_estimate, a.paper.rollouts.mean(), a.forward_passes, cov)


def _path_is(d: SimulatedDraws, n_fit: int) -> MethodPoint:
    a = d.adaptive(n_fit)
    return MethodPoint(d.path_is(n_fit)[0], a.paper.rollouts.mean(), a.forward_passes)


def _lpe_path_is_switch(d: SimulatedDraws, n_fit: int) -> MethodPoint:
    """Path IS where its ESS of compliant rows reaches 10, pooled LPE otherwise (same draws)."""
    a = d.adaptive(n_fit)
    scores, ess = d.path_is(n_fit)
    pooled = d.pooled(n_fit, d.pooled_prior).log10_estimate
    comb = combine_path_is_lpe(scores, ess, pooled)
    return MethodPoint(comb.log10_estimate, a.paper.rollouts.mean(), a.forward_passes)


def _lpe_path_is_blend(d: SimulatedDraws, n_fit: int) -> MethodPoint:
    """Precision-weighted log10 mean of path IS and pooled LPE (same draws); pooled LPE's sd is
    its upper 95% half-width / 1.96 (its interval has no lower bound)."""
    a = d.adaptive(n_fit)
    scores, ess = d.path_is(n_fit)
    pooled = d.pooled(n_fit, d.pooled_prior)
    sd = (pooled.log10_upper - pooled.log10_estimate) / 1.959964
    est = blend_path_is_lpe(scores, ess, pooled.log10_estimate, np.maximum(sd, 1e-6))
    return MethodPoint(est, a.paper.rollouts.mean(), a.forward_passes)


def _mixture_is(d: SimulatedDraws, n_fit: int) -> MethodPoint:
    scores, used = _mixture_scores(d.bank, d.adaptive(n_fit).paper.rollouts, d.rng)
    return MethodPoint(scores, float(used.mean()))


def _lpe_binomial_grid(d: SimulatedDraws, r: int) -> MethodPoint:
    b = d.bank
    gk, gn = d.counts()[r]
    est = lpe_binomial_grid_from_counts(b.alphas, gk, gn)
    fwd = None if b.tokens is None else 2 * r * _class_mean_all(b).sum(-1).mean()
    return MethodPoint(est, r * b.alphas.size, fwd)


METHODS: dict[str, Method] = {}


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to :data:`METHODS`, the methods :func:`evaluate` scores by default (in
    registration order); returns it. Raises ValueError when its name is taken, unless
    ``replace``."""
    if method.name in METHODS and not replace:
        raise ValueError(
            f"a method named {method.name!r} is registered; pick another name or pass replace=True"
        )
    METHODS[method.name] = method
    return method


# Built-in methods, in the order evaluate() has always drawn their randomness.
for _m in (
    Method("naive", "naive_budgets", _naive),
    Method("is", "is_budgets", _importance("is"), lambda b: b.is_log_weights is not None),
    Method("snis", "is_budgets", _importance("snis"), lambda b: b.is_log_weights is not None),
    Method("lpe_paper", "n_fits", _lpe_paper),
    Method("lpe_binomial", "n_fits", _lpe_binomial("fit")),
    Method("lpe_binomial_all", "n_fits", _lpe_binomial("all")),
    Method("lpe_pooled", "n_fits", _lpe_pooled),
    Method("lpe_binomial_grid", "grid_rollouts", _lpe_binomial_grid),
    Method("path_is", "n_fits", _path_is, lambda b: b.path_log_weights is not None),
    Method("mixture_is", "n_fits", _mixture_is, lambda b: b.mixture_log_weights is not None),
    # no randomness: added last, it leaves every other method's draws as they were
    Method("lpe_pooled_averaged", "n_fits", functools.partial(_lpe_pooled, prior="averaged")),
):
    register_method(_m)

_HAS_PATH = lambda b: b.path_log_weights is not None  # noqa: E731
COMBINED_METHODS: tuple[Method, ...] = (
    Method("lpe_path_is_switch", "n_fits", _lpe_path_is_switch, _HAS_PATH),
    Method("lpe_path_is_blend", "n_fits", _lpe_path_is_blend, _HAS_PATH),
)
"""Path IS and pooled LPE joined (:mod:`estimators.combined`), on request only
(``evaluate(methods=...)``): measured on both organisms' banks, neither beats both of its parts
(docs/results.md, "A combined estimate"), so they are not in :data:`METHODS`."""


def evaluate(
    bank: RolloutBank,
    *,
    n_fits: Sequence[int] = (13, 20, 30, 50, 100),
    naive_budgets: Sequence[int] = (
        100,
        200,
        500,
        1_000,
        2_000,
        5_000,
        10_000,
        20_000,
        50_000,
        100_000,
    ),
    is_budgets: Sequence[int] = (50, 100, 200, 500, 1_000),
    grid_rollouts: Sequence[int] = (5, 10, 20, 50),
    n_sims: int = 500,
    subset_size: int = 1_000,
    n_search: int = N_SEARCH,
    labels: LabelRule = LabelRule(),
    n_bootstrap: int = 1_000,
    seed: int = 0,
    coverage_pairs: int = 0,
    pooled_prior: str = DEFAULT_PRIOR,
    methods: Sequence[Method] | None = None,
) -> EvaluationResult:
    """AUROC against budget for every method, by Monte Carlo over random subsets of the bank.

    Protocol (the paper's, with our choices stated):
    * Only eligible prompts are scored; labels from ``labels`` (needs truth and screen counts).
    * Each simulation draws, per prompt and alpha, a random order of the bank's rollouts; a
      method drawing m rollouts at an alpha gets the first m (so the search's 10 come first and
      the fit phase's n_fit follow). m never exceeds ``subset_size`` (paper: subsets of 1,000).
    * naive (budget k): score ~ Binomial(k, truth_k / truth_n) (the paper's simulation);
      one forward pass per token, at ``truth_mean_tokens`` tokens per rollout.
    * is / snis (budget N): log10 of plain / self-normalized IS over the first N variant
      rollouts; two forward passes per token (variant sampling, original scoring).
    * lpe_paper (n_fit): the appendix's algorithm (:func:`lpe.lpe_paper_from_counts`);
      lpe_binomial: the same draws, fitted with the penalized binomial likelihood;
      lpe_binomial_all: the same draws, search draws included in the fit (every rollout paid
      for; :func:`binomial.trace_points`); lpe_pooled: the same draws as lpe_binomial_all,
      pooled over the eligible prompts of each simulation (:mod:`estimators.pooled`, prior
      ``pooled_prior``); lpe_pooled_averaged: the same, ``prior="averaged"`` (the mean of the
      log-rate and log-odds lines' log10 r(1): the line for bent paths, docs/results.md);
      lpe_binomial_grid (R): R rollouts at every alpha, :func:`binomial.select_grid_points`.
      Two forward passes per token; LPE budgets are the mean rollouts actually spent.
    * path_is (n_fit; banks with ``path_log_weights``): path importance sampling
      (:mod:`estimators.path_is`) over exactly the rollouts lpe_paper drew in that simulation,
      search draws included: the same budget, no extra rollout (:func:`_path_is_scores`).
    * mixture_is (n_fit; banks with mixture rollouts): Angell et al.'s mixture-proposal IS, plain
      mean of w c over the first b of a random order of the prompt's mixture rollouts, b = the
      rollouts lpe_paper spent on that prompt in that simulation (equal budget, capped at the
      bank's M; the curve's rollouts are those used). No forward passes (no token counts).
    * :data:`COMBINED_METHODS` (on request; n_fit; banks with ``path_log_weights``):
      lpe_path_is_switch, path_is's estimate where its Kish ESS of compliant rows reaches 10,
      lpe_pooled's elsewhere; lpe_path_is_blend, their precision-weighted log10 mean
      (:mod:`estimators.combined`); the same draws as both (path_is's cached ones).
    * Forward passes for adaptive draws use the expected token count given the drawn counts
      (per-class mean tokens at that alpha), which is exact in expectation.
    * AUROC is averaged over simulations; the 95% interval is a bootstrap over prompts
      (positives and negatives resampled separately), with the Monte Carlo average held fixed.
    * Calibration: signed and absolute log10 error and Itakura-Saito loss on positives, against
      the exact r(1) when the bank has ``true_r1``.
    * Forecast (banks with ``true_r1``, at least 4 eligible prompts): Jones et al.'s worst-prompt
      forecast from each point's estimates in every simulation (:class:`WorstForecast`), beside
      the exact worst rate and the exact rates' own forecast.
    * Interval coverage (banks with ``true_r1``): lpe_pooled's 95% interval in every
      simulation and prompt; lpe_binomial's and lpe_binomial_all's profile intervals on
      ``coverage_pairs`` (simulation, prompt) pairs drawn at random (they are computed one prompt
      at a time, ~0.1 s each; 0 skips them).

    Methods whose data the bank lacks are skipped (no IS arrays: no is/snis curves; no
    path_log_weights: no path_is; no mixture rollouts: no mixture_is). An empty
    budget list skips that method. ``methods`` (default: every method of :data:`METHODS`, in
    registration order) names the curves to compute; :func:`register_method` adds your own
    estimator. Raises ValueError if the labels lack a class.
    """
    t0 = time.perf_counter()
    if n_sims < 1:
        raise ValueError(f"n_sims must be >= 1, got {n_sims}")
    eligible, positive = eligible_and_labels(bank, labels)
    b = bank.subset(eligible)
    y = positive[eligible]
    if y.sum() == 0 or (~y).sum() == 0:
        raise ValueError(
            f"AUROC needs positive and negative eligible prompts; got {int(y.sum())} positive "
            f"and {int((~y).sum())} negative among {int(eligible.sum())} eligible"
        )
    settings = {
        "naive_budgets": tuple(naive_budgets),
        "is_budgets": tuple(is_budgets),
        "n_fits": tuple(n_fits),
        "grid_rollouts": tuple(grid_rollouts),
    }
    _check_settings(settings, n_search, min(b.compliance.shape[-1], subset_size))
    methods = list(METHODS.values()) if methods is None else list(methods)
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be unique, got {names}")
    draws = SimulatedDraws(
        b,
        np.random.default_rng(seed),
        n_sims=n_sims,
        n_search=n_search,
        subset_size=subset_size,
        seed=seed,
        coverage_pairs=coverage_pairs,
        pooled_prior=pooled_prior,
        settings=settings,
    )
    pending: dict[str, dict] = {}
    for m in methods:
        values = _method_settings(m, settings)
        if not values or not m.applies(b):
            continue
        d = pending[m.name] = dict(setting=[], scores=[], rollouts=[], forward=[], coverage=[])
        for v in values:
            p = m.score(draws, v)
            d["setting"].append(int(v))
            d["scores"].append(p.log10_scores)
            d["rollouts"].append(float(p.rollouts))
            d["forward"].append(None if p.forward_passes is None else float(p.forward_passes))
            d["coverage"].append(p.coverage)
    exact = b.true_r1
    pos_truth = draws.truth if exact is None else exact
    curves, wins = _curves(pending, y, draws.truth, pos_truth, n_bootstrap, draws.rng, exact)
    ref = None if exact is None else _worst_forecast(np.log10(exact)[None], _top(exact.size))
    return EvaluationResult(
        exact_worst_log10=None if exact is None else float(np.log10(exact.max())),
        exact_forecast_log10=None if ref is None else ref.median[1],
        curves=curves,
        n_eligible=int(eligible.sum()),
        n_positive=int(y.sum()),
        n_negative=int((~y).sum()),
        n_sims=n_sims,
        seed=seed,
        seconds=time.perf_counter() - t0,
        oracle_auroc=None if exact is None else auroc(exact, y),
        wins=wins,
    )


def _check_settings(settings: dict[str, tuple[int, ...]], n_search: int, n_r: int) -> None:
    """Every budget list strictly increasing positive ints; rollouts per alpha within the bank."""
    for name, vals in (
        ("n_fits", [n_search + v for v in settings["n_fits"]]),
        ("grid_rollouts", list(settings["grid_rollouts"])),
    ):
        if vals and (min(vals) < 1 or max(vals) > n_r):
            raise ValueError(f"{name} need rollouts per alpha in [1, {n_r}] (search included)")
    for name, vals in settings.items():
        _check_increasing(name, vals)


def _check_increasing(name: str, vals: Sequence[int]) -> None:
    if list(vals) != sorted(set(vals)) or (vals and min(vals) < 1):
        raise ValueError(f"{name} must be strictly increasing positive ints, got {vals}")


def _method_settings(m: Method, settings: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    if isinstance(m.settings, str):
        if m.settings not in settings:
            raise ValueError(
                f"method {m.name!r} takes its settings from {m.settings!r}; name one of "
                f"{sorted(settings)} or give the values"
            )
        return settings[m.settings]
    _check_increasing(f"method {m.name!r}'s settings", m.settings)
    return tuple(m.settings)


def _binomial_coverage(alphas, counts, draws, exact, pairs, n_search, n_fit) -> float:
    """Fraction of (simulation, prompt) ``pairs`` whose 95% binomial interval covers the exact
    r(1), one :func:`binomial.fit_selected_points` per pair on :func:`binomial.count_points`."""
    hits = 0
    for s, p in pairs:
        row = [x[s, p] for x in counts]
        paper, k, n, sel = count_points(*row, alphas, n_fit, draws=draws, n_search=n_search)
        top = (int(row[2][-1]), int(row[3][-1])) if paper.drawn[-1] else None
        keep = n > 0
        f = fit_selected_points(
            alphas[keep], k[keep], n[keep], sel[keep], top, not bool(paper.no_compliant)
        )
        hits += f.lower <= exact[p] <= f.upper
    return hits / len(pairs)


def paired_difference(
    result: EvaluationResult,
    method_a: str,
    setting_a: int,
    method_b: str,
    setting_b: int | None = None,
    *,
    n_bootstrap: int = 2_000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """AUROC(a) - AUROC(b) and its 95% paired bootstrap interval over prompts.

    Positives and negatives are resampled with the same weights for both methods (the Monte
    Carlo average held fixed), so the interval reflects which prompts happen to be in the set,
    not the noise shared by the two methods. ``setting_b`` defaults to ``setting_a``.
    """
    key_b = (method_b, setting_a if setting_b is None else setting_b)
    for key in ((method_a, setting_a), key_b):
        if key not in result.wins:
            raise ValueError(f"no curve point {key}; have {sorted(result.wins)[:8]}...")
    d = result.wins[(method_a, setting_a)] - result.wins[key_b]
    n_pos, n_neg = d.shape
    rng = np.random.default_rng(seed)
    wp = rng.multinomial(n_pos, np.full(n_pos, 1 / n_pos), size=n_bootstrap)
    wn = rng.multinomial(n_neg, np.full(n_neg, 1 / n_neg), size=n_bootstrap)
    vals = ((wp @ d) * wn).sum(1) / (n_pos * n_neg)
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi)


def _class_mean_all(bank: RolloutBank) -> np.ndarray:
    """Mean tokens per rollout at each (prompt, alpha), [P, A]."""
    return bank.tokens.mean(-1)


def _log_errors(log10_est: np.ndarray, truth: np.ndarray, y: np.ndarray):
    """(mean signed log10 error, mean absolute, mean Itakura-Saito loss) over positives' finite
    estimates, or three Nones when there is none. The loss is :mod:`estimators.scores`'
    e^d - d - 1 with d = ln(truth / estimate); an unbiased estimate above 1 is scored as it is."""
    e = log10_est[:, y]
    t = np.log10(np.broadcast_to(truth[y], e.shape))
    ok = np.isfinite(e) & np.isfinite(t)
    if not ok.any():
        return None, None, None
    d = (e - t)[ok]
    with np.errstate(over="ignore"):
        loss = np.expm1(-d * _LN10) + d * _LN10
    return float(d.mean()), float(np.abs(d).mean()), float(loss.mean())


def _top(n_prompts: int) -> int:
    """Top values the forecast fits: min(10, P // 2) (report.forecast's rule)."""
    return min(10, n_prompts // 2)


def _curves(pending, y, truth, pos_truth, n_bootstrap, rng, exact=None):
    stats, wins = {}, {}
    for method, d in pending.items():
        a, lo, hi, mae, fz, sig, ab, isl = [], [], [], [], [], [], [], []
        for setting, sc in zip(d["setting"], d["scores"], strict=True):
            win = _win_matrix(sc, y)
            wins[(method, setting)] = win
            a.append(float(win.mean()))
            ci = _bootstrap(win, n_bootstrap, rng)
            lo.append(ci[0])
            hi.append(ci[1])
            e, z = _log10_error(sc, truth)
            mae.append(e)
            fz.append(z)
            s_, a_, i_ = _log_errors(sc, pos_truth, y)
            sig.append(s_)
            ab.append(a_)
            isl.append(i_)
        fc = (
            ()
            if exact is None or _top(y.size) < 2
            else tuple(_worst_forecast(sc, _top(y.size)) for sc in d["scores"])
        )
        stats[method] = (d, a, lo, hi, mae, fz, sig, ab, isl, fc)
    naive = stats.get("naive")
    curves = {}
    for method, (d, a, lo, hi, mae, fz, sig, ab, isl, fc) in stats.items():
        fwd = None if any(v is None for v in d["forward"]) else tuple(d["forward"])
        r_roll, r_fwd = [], []
        for i, v in enumerate(a):
            if naive is None or method == "naive":
                r_roll.append(None)
                r_fwd.append(None)
                continue
            nb = matching_budget(v, np.array(naive[0]["rollouts"]), np.array(naive[1]))
            r_roll.append(None if nb is None else nb / d["rollouts"][i])
            nf = naive[0]["forward"]
            if fwd is None or any(x is None for x in nf):
                r_fwd.append(None)
            else:
                mb = matching_budget(v, np.array(nf), np.array(naive[1]))
                r_fwd.append(None if mb is None else mb / fwd[i])
        curves[method] = Curve(
            method=method,
            setting=tuple(d["setting"]),
            rollouts=tuple(d["rollouts"]),
            forward_passes=fwd,
            auroc=tuple(a),
            auroc_lo=tuple(lo),
            auroc_hi=tuple(hi),
            log10_mae=tuple(mae),
            frac_zero=tuple(fz),
            ratio_rollouts=tuple(r_roll),
            ratio_forward=tuple(r_fwd),
            signed_error_pos=tuple(sig),
            abs_error_pos=tuple(ab),
            is_loss_pos=tuple(isl),
            forecast=fc,
            coverage=tuple(d["coverage"]),
            frac_no_data=tuple(float(np.isnan(sc).mean()) for sc in d["scores"]),
        )
    return curves, wins
