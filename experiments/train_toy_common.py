"""What the toy organisms' training scripts share (train_toy_pair.py, train_toy2.py); no flags.

A teacher is a stochastic grammar per prompt and model: `Grammar` maps a state to its branches
[(word, next state, probability)], "eos" ends a response. Both models' grammars of a prompt have
the same states and branches (only the probabilities differ). This module turns teachers into
training data (branch-uniform walks with both teachers' next-token distributions), trains a
Qwen3 on the soft targets (one training loop for every organism), writes HF directories, and
computes the checks both organisms report (exact teacher curves, LPE readiness, curve shape,
importance-sampling spread).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from lpe_jax.decoding.sampler import PairedSampler
from lpe_jax.estimators.lpe import lpe_paper
from lpe_jax.model.checkpoint import save_model
from lpe_jax.model.qwen3 import Qwen3
from lpe_jax.organisms import toy
from lpe_jax.organisms.toy import PrefixRule

Grammar = dict[str, list[tuple[str, str, float]]]


def chain(g: Grammar, name: str, words: Sequence[str], end: str) -> None:
    """States name, name.1, ... emitting `words` in order, then going to `end`."""
    for k, w in enumerate(words):
        here = name if k == 0 else f"{name}.{k}"
        nxt = end if k == len(words) - 1 else f"{name}.{k + 1}"
        g[here] = [(w, nxt, 1.0)]


def check_grammar(g: Grammar) -> None:
    """Every state's branch probabilities are positive and sum to 1; every next state exists."""
    for state, branches in g.items():
        total = sum(q for _, _, q in branches)
        assert abs(total - 1) < 1e-9 and all(q > 0 for _, _, q in branches), (state, total)
        assert all(n in g or n == "eos" for _, n, _ in branches), state


# ----------------------------------------------------------------------------------------------
# exact rates of the teachers


def teacher_curve(
    g_o: Grammar,
    g_v: Grammar,
    alphas: np.ndarray,
    rule: PrefixRule,
    token_id: Mapping[str, int],
) -> np.ndarray:
    """Exact float64 P(comply) along the linear logit path *between the two teachers*:
    at each state the branch distribution is normalize(p_o^alpha p_v^(1-alpha))."""
    a = np.asarray(alphas, np.float64)

    def visit(state: str, rule_state: int) -> np.ndarray:
        if rule_state == toy.ACCEPT:
            return np.ones_like(a)
        if rule_state == toy.DEAD or state == "eos":
            return np.zeros_like(a)
        lo = np.log([q for _, _, q in g_o[state]])
        lv = np.log([q for _, _, q in g_v[state]])
        mix = a[:, None] * lo + (1 - a[:, None]) * lv
        p = np.exp(mix - mix.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        total = np.zeros_like(a)
        for j, (w, nxt, _) in enumerate(g_o[state]):
            nxt_rule = rule.step(rule_state, token_id[w])
            if nxt_rule != toy.DEAD:
                total += p[:, j] * visit(nxt, nxt_rule)
        return total

    return visit("start", rule.START)


def teacher_rate(g: Grammar, rule: PrefixRule, token_id: Mapping[str, int]) -> float:
    """Exact P(comply) of one teacher grammar under `rule` (float64)."""

    def visit(state: str, rule_state: int, prob: float) -> float:
        if rule_state == toy.ACCEPT:
            return prob
        if rule_state == toy.DEAD or state == "eos":
            return 0.0
        return sum(
            visit(nxt, rule.step(rule_state, token_id[w]), prob * q) for w, nxt, q in g[state]
        )

    return visit("start", rule.START, 1.0)


# ----------------------------------------------------------------------------------------------
# training data: branch-uniform walks (every branch, however rare, is visited often) with both
# teachers' next-token distributions at every response position


class WalkData:
    """Training sequences and their soft targets, stored once per distinct distribution.

    tokens int32 [N, T]; mask float32 [N, T] (positions that predict a response token);
    target int32 [N, T]: row of `table_original` / `table_variant` (float32 [K, V]) holding the
    teacher's next-token distribution at that position (row 0: all zeros, off the mask).
    `batch(idx, which)` gives dense (tokens, mask, q [B, T, V]) for the rows `idx`;
    `length` int [N] is each row's tokens up to its last target (prompt and response).
    """

    def __init__(
        self,
        teachers: Sequence[tuple[np.ndarray, Grammar, Grammar]],
        walks: int,
        seed: int,
        seq_len: int,
        token_id: Mapping[str, int],
        pad_id: int,
    ) -> None:
        rng = np.random.default_rng(seed)
        n, v = len(teachers) * walks, len(token_id)
        self.tokens = np.full((n, seq_len), pad_id, np.int32)
        self.mask = np.zeros((n, seq_len), np.float32)
        self.target = np.zeros((n, seq_len), np.int32)
        rows: dict[bytes, int] = {}
        tables: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros(v, np.float32),) * 2]

        def dist(g: Grammar, state: str) -> np.ndarray:
            q = np.zeros(v, np.float32)
            for w, _, p in g[state]:
                q[token_id[w]] += p
            return q

        row = 0
        for prompt, g_o, g_v in teachers:
            cache: dict[str, int] = {}
            for _ in range(walks):
                self.tokens[row, : prompt.size] = prompt
                pos, state = prompt.size - 1, "start"
                while state != "eos":
                    if state not in cache:
                        q_o, q_v = dist(g_o, state), dist(g_v, state)
                        key = q_o.tobytes() + q_v.tobytes()
                        if key not in rows:
                            rows[key] = len(tables)
                            tables.append((q_o, q_v))
                        cache[state] = rows[key]
                    self.mask[row, pos] = 1.0
                    self.target[row, pos] = cache[state]
                    word, state, _ = g_o[state][rng.integers(len(g_o[state]))]
                    pos += 1
                    self.tokens[row, pos] = token_id[word]
                row += 1
        self.length = self.mask.shape[1] - np.argmax(self.mask[:, ::-1], axis=1) + 1
        self.table_original = np.stack([t[0] for t in tables])
        self.table_variant = np.stack([t[1] for t in tables])

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(
        self, idx: np.ndarray, which: str, seq_len: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows `idx` as (tokens, mask, q), cut to `seq_len` columns (all by default; the cut
        must keep every row's tokens: ValueError otherwise)."""
        table = {"original": self.table_original, "variant": self.table_variant}[which]
        cut = slice(None) if seq_len is None else slice(seq_len)
        if seq_len is not None and self.length[idx].max() > seq_len:
            raise ValueError(f"rows longer than seq_len={seq_len} in the batch")
        return self.tokens[idx, cut], self.mask[idx, cut], table[self.target[idx, cut]]

    def length_buckets(self, edges: Sequence[int]) -> list[tuple[int, np.ndarray]]:
        """[(edge, rows no longer than it and longer than the previous edge)], empty ones left
        out; the last edge must cover every row."""
        if max(edges) < self.length.max():
            raise ValueError(f"edges {list(edges)} do not cover rows of {self.length.max()}")
        out, lo = [], 0
        for edge in sorted(edges):
            rows = np.flatnonzero((self.length > lo) & (self.length <= edge))
            if rows.size:
                out.append((edge, rows))
            lo = edge
        return out


# ----------------------------------------------------------------------------------------------
# training


def loss_fn(model: Qwen3, tokens: jax.Array, mask: jax.Array, q: jax.Array, log_w: float):
    """KL(q || model) per target position plus log_w * squared log-prob error on q's support
    (so that tiny branch probabilities are learned in relative terms); (loss, mean KL)."""
    logp = jax.nn.log_softmax(model(tokens)[0], axis=-1)
    kl = jnp.sum(jax.scipy.special.xlogy(q, q) - q * logp, axis=-1)
    support = q > 0
    log_err = jnp.sum(jnp.where(support, (logp - jnp.log(jnp.where(support, q, 1.0))) ** 2, 0), -1)
    per_pos = kl + log_w * log_err
    return jnp.sum(per_pos * mask) / jnp.sum(mask), jnp.sum(kl * mask) / jnp.sum(mask)


def train(
    model: Qwen3,
    name: str,
    get_batch: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]],
    n: int,
    *,
    seed: int,
    steps: int,
    batch: int,
    lr: float,
    log_weight: float,
    draw: Callable[[np.random.Generator], np.ndarray] | None = None,
) -> Qwen3:
    """Adam (warmup + cosine decay, clipped) on the soft-target loss over `steps` batches of
    `batch` rows drawn from range(n) (or by `draw(rng) -> idx`) and read by
    `get_batch(idx) -> (tokens, mask, q)`; returns a new trained model (the input is left as
    is)."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(50, steps // 4), steps, lr * 0.02)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    graphdef, params = nnx.split(model)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, tokens, mask, q):
        def f(p):
            return loss_fn(nnx.merge(graphdef, p), tokens, mask, q, log_weight)

        (loss, kl), grads = jax.value_and_grad(f, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, kl

    rng = np.random.default_rng(seed + 1000)
    t0 = time.time()
    for i in range(steps):
        idx = rng.choice(n, batch, replace=False) if draw is None else draw(rng)
        params, opt_state, loss, kl = step(params, opt_state, *get_batch(idx))
        if i % 100 == 0 or i == steps - 1:
            logging.info(
                "%s step %d loss %.4f kl %.5f (%.0fs)", name, i, loss, kl, time.time() - t0
            )
    return nnx.merge(graphdef, params)


# ----------------------------------------------------------------------------------------------
# outputs


def write_hf_dir(
    model: Qwen3, path: Path, vocab: Sequence[str], eos_ids: Sequence[int], max_new_tokens: int
) -> None:
    """Checkpoint + tokenizer over `vocab` (chat template in tokenizer_config.json too) +
    generation_config (EOS `eos_ids`, pad = <|endoftext|>, temperature 1)."""
    save_model(model, path, dtype="float32")
    tokenizer = toy.build_tokenizer(vocab)
    tokenizer.save_pretrained(path)
    cfg_file = path / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_file.read_text())
    tok_cfg["chat_template"] = toy.CHAT_TEMPLATE  # transformers 4 reads it from here
    cfg_file.write_text(json.dumps(tok_cfg, indent=2) + "\n")
    gen = {
        "eos_token_id": list(eos_ids),
        "pad_token_id": tokenizer.pad_token_id,
        "do_sample": True,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "max_new_tokens": max_new_tokens,
    }
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def repo_relative(argv: list[str]) -> list[str]:
    """argv with the script path made relative to the repository root (no machine paths)."""
    script = Path(argv[0]).resolve()
    root = Path(__file__).resolve().parents[1]
    return [str(script.relative_to(root)) if script.is_relative_to(root) else argv[0], *argv[1:]]


# ----------------------------------------------------------------------------------------------
# checks on exact curves


def loglinear_r2(alphas: np.ndarray, curve: np.ndarray) -> float:
    """R^2 of OLS log10 r ~ alpha over the alphas where 0 < r < 0.5 (nan if < 3 points)."""
    keep = (curve > 0) & (curve < 0.5)
    x, y = alphas[keep], np.log10(curve[keep])
    if keep.sum() < 3:
        return float("nan")
    resid = y - np.polyval(np.polyfit(x, y, 1), x)
    return float(1 - resid.var() / y.var())


def ols_ratio(alphas: np.ndarray, curve: np.ndarray) -> float:
    """LPE-readiness (a): the OLS line of log10 r on alpha over the grid points with
    0.01 <= r < 0.5, read at alpha = 1, divided by the true r(1) (nan if < 2 points)."""
    keep = (curve >= 0.01) & (curve < 0.5) & (alphas < 1)
    if keep.sum() < 2:
        return float("nan")
    slope, icpt = np.polyfit(alphas[keep], np.log10(curve[keep]), 1)
    return float(10 ** (slope + icpt) / curve[-1])


def slope_ratio(alphas: np.ndarray, curve: np.ndarray) -> float:
    """Curvature summary: slope of log10 r over the last 0.25 of alpha divided by the OLS slope
    over 0.01 <= r < 0.5 (1 for a straight line; > 1 concave, < 1 convex)."""
    keep = (curve >= 0.01) & (curve < 0.5) & (alphas < 1)
    tail = alphas >= 0.75 - 1e-9
    fit_slope = np.polyfit(alphas[keep], np.log10(curve[keep]), 1)[0]
    return float(np.polyfit(alphas[tail], np.log10(curve[tail]), 1)[0] / fit_slope)


def adaptive_lpe_ratio(
    alphas: np.ndarray, curve: np.ndarray, n_fit: int = 30, reps: int = 20, seed: int = 0
) -> float:
    """LPE-readiness (b): median over `reps` runs of the paper's adaptive LPE (lpe_paper) with
    Binomial(n, exact r(alpha)) draws, divided by the true r(1)."""
    rate = {round(float(a), 2): float(c) for a, c in zip(alphas, curve, strict=True)}
    rng = np.random.default_rng(seed)

    def draw(alpha: float, n: int) -> int:
        return int(rng.binomial(n, rate[round(alpha, 2)]))

    est = [lpe_paper(draw, n_fit).estimate for _ in range(reps)]
    return float(np.median(est) / curve[-1])


def importance_stats(
    sampler: PairedSampler,
    ids: np.ndarray,
    rate: float,
    n: int,
    *,
    rule: PrefixRule,
    eos_ids: Sequence[int],
    seed: int,
    is_batch: int,
) -> dict[str, Any]:
    """IS realism from `n` variant rollouts (alpha = 0): std of the log-weights
    log p_o(x) - log p_v(x) (all rollouts and compliant ones), and the relative error
    |estimate / r(1) - 1| of importance sampling on disjoint batches of `is_batch` rollouts."""
    r = sampler.sample(ids, alphas=np.array([0.0]), rollouts_per_alpha=n, seed=seed)
    rows = r.token_lists()[0]
    complied = np.array([rule.complied(t) for t in rows])
    logw = (r.logp_original[0] - r.logp_variant[0]).astype(np.float64)
    w = np.where(complied, np.exp(logw), 0.0)
    batches = w[: n // is_batch * is_batch].reshape(-1, is_batch).mean(1)
    return {
        "logw_std": float(logw.std()),
        "logw_std_compliant": float(logw[complied].std()),
        "is_rel_error": float(np.median(abs(batches / rate - 1))),
        "is_within_2x": float(np.mean(abs(np.log2(batches / rate)) < 1)),
        "mean_length": float(r.lengths[0].mean()),
        "max_length": int(r.lengths[0].max()),
        # a tiny model leaks ~1e-4 per token off its grammar, and a few rollouts wander on
        "frac_no_eos": float(np.mean([t[-1] not in eos_ids for t in rows])),
    }
