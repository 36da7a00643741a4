"""Turn a judged run directory (sample.py + judge.py) into a RolloutBank for the evaluation.

NumPy only. Mapping (the paper's protocol):
- alphas < 1 of the run -> `compliance [P, A, R]` and `tokens` (generated lengths);
- alpha = 0 rollouts -> importance-sampling log-weights log p_o - log p_v and their verdicts;
- alpha = 1 rollouts -> the screen (the first `screen_n`, paper: 100) and, when there are at
  least `truth_n` of them, the ground truth counts;
- `logp_sampled` of the path rollouts (runs written since it exists) -> `path_log_weights`
  log p_o - log q_alpha for path importance sampling (NaN where a row is non-finite);
- optionally a second judged run drawn along the `mixture` path at one alpha = lam ->
  Angell et al.'s mixture-proposal rollouts (`mixture_log_weights` = log p_o - logp_sampled);
- otherwise ground truth given per prompt, either as counts (k, n) from a separate run of the
  original, or as exact rates (e.g. the toy organism's): counts drawn as Binomial(truth_n, rate)
  with a fixed seed, which is what sampling truth_n rollouts of the original gives in
  distribution.

:func:`bank_from_curves` builds a bank without sampling from exact curves r(alpha) (the toy
organisms' ground_truth.json): verdicts only, for LPE and naive (importance sampling needs sampled
answers and their log-weights).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from lpe_jax.evaluation.evaluation import RolloutBank
from lpe_jax.runs.store import RolloutStore


def read_truth_file(
    path: str | os.PathLike,
) -> tuple[dict[str, float] | None, dict[str, tuple[int, int]] | None]:
    """Parse a ground-truth JSON: {id: [k, n]} (counts) or {id: rate} (exact rates).

    Returns (rates, counts), exactly one of them not None; ValueError names a mixed or malformed
    file.
    """
    given = json.loads(Path(path).read_text())
    if not isinstance(given, dict) or not given:
        raise ValueError(f"{path}: expected a non-empty JSON object {{prompt_id: [k, n] or rate}}")
    if all(isinstance(v, list) and len(v) == 2 for v in given.values()):
        return None, {str(k): (int(v[0]), int(v[1])) for k, v in given.items()}
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in given.values()):
        return {str(k): float(v) for k, v in given.items()}, None
    raise ValueError(f"{path}: values must all be [k, n] or all be rates")


def bank_from_curves(
    prompt_ids: Sequence[str],
    alphas: np.ndarray,
    curves: np.ndarray,
    r1: np.ndarray,
    *,
    rollouts: int = 1_000,
    truth_n: int = 100_000,
    screen_n: int = 100,
    seed: int = 0,
) -> RolloutBank:
    """A verdicts-only RolloutBank drawn from exact compliance curves.

    Args:
      prompt_ids: P names.
      alphas: float [A] in [0, 1), increasing: the path's grid (alpha = 1 goes in ``r1``).
      curves: float [P, A] exact r(alpha); r1: float [P] exact r(1).

    Each rollout at (prompt, alpha) complies with probability r(alpha), independently: what
    sampling the pair and judging with an exact rule gives in distribution. Screen and truth as in
    the synthetic banks: screen_k ~ Binomial(screen_n, r1), truth_k = screen_k +
    Binomial(truth_n - screen_n, r1). No token counts and no importance-sampling rollouts.
    Deterministic in ``seed``.
    """
    r = np.asarray(curves, np.float64)
    r1 = np.asarray(r1, np.float64)
    if r.ndim != 2 or r.shape != (len(prompt_ids), np.size(alphas)) or r1.shape != (r.shape[0],):
        raise ValueError(
            f"curves must be [prompts={len(prompt_ids)}, alphas={np.size(alphas)}] and r1 "
            f"[prompts], got {r.shape} and {r1.shape}"
        )
    if not (np.all((r >= 0) & (r <= 1)) and np.all((r1 >= 0) & (r1 <= 1))):
        raise ValueError("exact rates must lie in [0, 1]")
    rng = np.random.default_rng(seed)
    comp = (rng.random((*r.shape, rollouts)) < r[..., None]).astype(np.int8)
    screen_k = rng.binomial(screen_n, r1)
    return RolloutBank(
        prompt_ids=tuple(prompt_ids),
        alphas=np.asarray(alphas, np.float64),
        compliance=comp,
        truth_k=screen_k + rng.binomial(truth_n - screen_n, r1),
        truth_n=np.full(r1.size, truth_n),
        screen_k=screen_k,
        screen_n=np.full(r1.size, screen_n),
        true_rates=r,
        true_r1=r1,
    )


def _verdicts(store: RolloutStore, pid: str, alpha: float) -> dict[str, np.ndarray]:
    c = store.read_chunk(pid, alpha)
    if "verdicts" not in c:
        raise ValueError(
            f"chunk ({pid}, alpha={alpha}) of {store.root} has no verdicts; run judge.py first"
        )
    return c


def bank_from_store(
    store: RolloutStore,
    *,
    truth_rates: Mapping[str, float] | None = None,
    truth_counts: Mapping[str, tuple[int, int]] | None = None,
    truth_n: int = 100_000,
    screen_n: int = 100,
    seed: int = 0,
    mixture: RolloutStore | None = None,
) -> RolloutBank:
    """A RolloutBank of every prompt with all alphas sampled and judged.

    ``path_log_weights`` is filled when every path chunk has ``logp_sampled`` (else None).
    ``mixture``: a judged run of the same models along the ``mixture`` path at one alpha (= lam),
    with every prompt of this run; its rows become the mixture-proposal rollouts.

    Needs alpha = 0 (IS and the bottom of the path) and alpha = 1 (the screen) in the run's grid.
    Ground truth: `truth_counts` {id: (k, n)} or exact `truth_rates` {id: rate} if given, else
    the alpha = 1 chunk when it holds >= truth_n rollouts, else none (labels then cannot be
    formed; evaluate() names the fix).
    """
    if truth_rates is not None and truth_counts is not None:
        raise ValueError("pass truth_rates or truth_counts, not both")
    grid = sorted(store.manifest["alphas"])
    if 0.0 not in grid or 1.0 not in grid:
        raise ValueError(f"the run's alphas {grid} must include 0 (IS) and 1 (screen, truth)")
    path_alphas = [a for a in grid if a < 1.0]
    chunks = set(store.chunks())
    ids = sorted({p for p, _ in chunks if all((p, a) in chunks for a in grid)})
    if not ids:
        raise ValueError(f"{store.root} has no prompt with every alpha of {grid} sampled")
    comp, toks, lw, is_c, is_t, sk, sn, tk, tn, tm, plw = ([] for _ in range(11))
    rng = np.random.default_rng(seed)
    for pid in ids:
        rows = [_verdicts(store, pid, a) for a in path_alphas]
        comp.append(np.stack([r["verdicts"] for r in rows]))
        toks.append(np.stack([r["lengths"] for r in rows]))
        plw.append(_path_log_weights(rows))
        zero = rows[0]
        known = ~zero["nonfinite"]
        lw.append(np.where(known, zero["logp_original"] - zero["logp_variant"], 0.0))
        is_c.append(np.where(known, zero["verdicts"], -1))
        is_t.append(zero["lengths"])
        top_chunk = _verdicts(store, pid, 1.0)
        top = top_chunk["verdicts"]
        tm.append(float(top_chunk["lengths"].mean()))
        if top.size < screen_n:
            raise ValueError(f"{pid}: {top.size} rollouts at alpha=1, the screen needs {screen_n}")
        sk.append(int((top[:screen_n] == 1).sum()))
        sn.append(screen_n)
        if truth_counts is not None:
            if pid not in truth_counts:
                raise ValueError(f"no ground-truth counts for prompt {pid!r}")
            k, n = (int(x) for x in truth_counts[pid])
            tk.append(k)
            tn.append(n)
        elif truth_rates is not None:
            if pid not in truth_rates:
                raise ValueError(f"no ground-truth rate for prompt {pid!r}")
            tk.append(int(rng.binomial(truth_n, truth_rates[pid])))
            tn.append(truth_n)
        elif top.size >= truth_n:
            tk.append(int((top[:truth_n] == 1).sum()))
            tn.append(truth_n)
    have_truth = len(tk) == len(ids)
    have_path = all(x is not None for x in plw)
    return RolloutBank(
        path_log_weights=np.stack(plw) if have_path else None,
        **(_mixture_fields(mixture, store, ids) if mixture is not None else {}),
        prompt_ids=tuple(ids),
        alphas=np.array(path_alphas),
        compliance=np.stack(comp),
        tokens=np.stack(toks),
        is_log_weights=np.stack(lw),
        is_compliance=np.stack(is_c),
        is_tokens=np.stack(is_t),
        truth_k=np.array(tk) if have_truth else None,
        truth_n=np.array(tn) if have_truth else None,
        screen_k=np.array(sk),
        screen_n=np.array(sn),
        truth_mean_tokens=np.array(tm),
        true_r1=np.array([truth_rates[p] for p in ids]) if truth_rates is not None else None,
    )


def _path_log_weights(rows: list[dict[str, np.ndarray]]) -> np.ndarray | None:
    """[A, R] log p_o - logp_sampled of one prompt's path chunks (NaN where non-finite), or None
    when a chunk predates ``logp_sampled``."""
    if any("logp_sampled" not in r for r in rows):
        return None
    out = []
    for r in rows:
        lw = r["logp_original"].astype(np.float64) - r["logp_sampled"].astype(np.float64)
        out.append(np.where(r["nonfinite"] | ~np.isfinite(r["logp_sampled"]), np.nan, lw))
    return np.stack(out)


def _mixture_fields(mix: RolloutStore, store: RolloutStore, ids: list[str]) -> dict:
    """mixture_log_weights / mixture_compliance / mixture_lambda from a judged mixture run."""
    m = mix.manifest
    differ = [f for f in ("original_hash", "variant_hash", "tokenizer_hash", "max_new_tokens",
                          "temperature") if m.get(f) != store.manifest.get(f)]  # fmt: skip
    if m.get("path") != "mixture" or len(m.get("alphas", [])) != 1 or differ:
        raise ValueError(
            f"{mix.root} must be one run along --path=mixture at one alpha (lam) of the same "
            f"models and decoding as {store.root}; it has path {m.get('path')!r}, alphas "
            f"{m.get('alphas')}, and differs in {differ or 'nothing else'}"
        )
    lam = float(m["alphas"][0])
    lw, mc = [], []
    for pid in ids:
        c = _verdicts(mix, pid, lam)
        if "logp_sampled" not in c:
            raise ValueError(f"{mix.root} predates logp_sampled; sample it again with sample.py")
        known = ~c["nonfinite"] & np.isfinite(c["logp_sampled"])
        lw.append(np.where(known, c["logp_original"] - c["logp_sampled"].astype(np.float64), 0.0))
        mc.append(np.where(known, c["verdicts"], -1).astype(np.int8))
    return {
        "mixture_log_weights": np.stack(lw),
        "mixture_compliance": np.stack(mc),
        "mixture_lambda": lam,
    }
