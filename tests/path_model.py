"""A tiny exact sequence model for the path-IS and mixture tests (NumPy only).

T = 3 steps over V = 3 tokens; each endpoint's logits at step t depend on the previous token
(tables [T, V, V]); the linear path at alpha is softmax(alpha l_o + (1 - alpha) l_v) per token.
All V^T sequences are enumerated, so every rate is exact and draws are exact.
"""

import itertools

import numpy as np
from scipy.special import log_softmax

V, T = 3, 3
_rng = np.random.default_rng(123)
L_O = _rng.normal(0, 1, (T, V, V))
L_O[:, :, 2] -= 3.0  # the original avoids token 2
L_V = _rng.normal(0, 1, (T, V, V))
L_V[:, :, 2] += 1.0
SEQS = np.array(list(itertools.product(range(V), repeat=T)))
_PREV = np.concatenate([np.zeros((len(SEQS), 1), int), SEQS[:, :-1]], 1)


def token_logp(logits: np.ndarray) -> np.ndarray:
    """[S, T] per-token log-probs of every sequence under per-step logit tables [T, V, V]."""
    lp = log_softmax(logits, axis=-1)
    return np.stack([lp[t, _PREV[:, t], SEQS[:, t]] for t in range(T)], 1)


def seq_logp(alpha: float) -> np.ndarray:
    """[S] log M(alpha)(x) on the linear path."""
    return token_logp(alpha * L_O + (1 - alpha) * L_V).sum(1)


def rate(log_p: np.ndarray, comply: np.ndarray) -> float:
    return float(np.exp(log_p)[comply].sum())


def draw_ladder(alphas, n, comply, rng):
    """Exact draws: per alpha, n sequences from M(alpha) -> flat (alpha, c, log q, log p)."""
    lo = seq_logp(1.0)
    out = []
    for a in alphas:
        la = seq_logp(a)
        i = rng.choice(len(SEQS), size=n, p=np.exp(la) / np.exp(la).sum())
        out.append((np.full(n, a), comply[i].astype(np.int8), la[i], lo[i]))
    return [np.concatenate(x) for x in zip(*out, strict=True)]
