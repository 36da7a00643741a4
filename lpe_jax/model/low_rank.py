"""A variant held as the original's weights plus low-rank deltas: one copy of the weights per pair.

The paper's variant is an abliteration: every residual-stream writer differs from the original by
a rank-1 term (o_proj/down_proj: -r r^T W; the embedding: -E r r^T; see
`lpe_jax.abliteration.orthogonalize`), every other tensor is identical. `as_low_rank` compares
the variant with the original tensor by tensor and builds a `LowRankQwen3` whose parameters are
- **shared**: the original's array itself (bitwise-equal tensors; no bytes allocated),
- **low rank**: a `LowRankWeight` = the original's array plus factors u [rows, r], vt [r, cols]
  (r <= max_rank), where every element of W_original + u @ vt is within 2 ulp of W_variant's,
  an ulp taken at the tensor's largest magnitude in its stored dtype (eps * max |W_variant|),
- **whole**: the variant's own array (anything else; 1-D tensors that differ are kept whole).

Stacked MoE expert weights [E, rows, cols] (Qwen3-MoE's experts; the abliteration edits every
expert's down_proj) are factored expert by expert: u [E, rows, r], vt [E, r, cols].

The low-rank model runs through the same `Qwen3` code: `x @ w` on a `LowRankWeight` computes
x @ W_o + (x @ u) @ vt, an embedding lookup E_o[t] + u[t] @ vt, and the experts' grouped product
its own `ragged_dot_f32`. Its output head is always an explicit `lm_head` (a tied original's
embedding, read transposed, is its base), because an abliteration edits the input embedding but
not the head. Run alone, the variant's pass still *reads* every weight a second time (weight
memory is halved, weight reads per step are not).

**2B rows through one weight copy.** `paired_model(original, variant, whole)` is both models as
one `LowRankQwen3` whose parameters are `PairedWeight`s; one `Qwen3.forward` over 2B rows (the
original's B, then the variant's B: the same loop, called on a batch of two halves) reads each
shared weight once and adds the factors' correction to the variant's half only (a whole tensor is
read for its own half). `LowRankQwen3.decode_slots_pair` is the engine's decode step on it; the
two models keep their own K/V buffers (`PairKV`: attention runs per half, nothing is copied). At
decode, where reading the weights dominates a step, this halves the weight bytes read
(`lpe_jax.decoding.engine.RolloutEngine(pair_batch=)`; docs/benchmarks.md).

Load-time cost: per differing 2-D tensor (per expert of a stacked one), a randomized range
finder of max_rank + 8 columns (O(rows * cols * (max_rank + 8)) flops) and one float64 pass to
check the reconstruction, in blocks of rows. `as_low_rank` compares two loaded models;
`load_low_rank_variant` reads the variant's checkpoint one tensor at a time instead, so the load
never holds both copies (its peak: the original plus about two of the largest tensor).
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from lpe_jax.model.f32_dot import einsum_f32, ragged_dot_f32
from lpe_jax.model.qwen3 import LayerKV, Qwen3, rms_norm, slot_kv

Array = jax.Array

DEFAULT_MAX_RANK = 8
ULP_TOLERANCE = 2.0  # accepted element error, in eps * the tensor's largest magnitude
_OVERSAMPLE = 8
_BLOCK_ROWS = 4096


@struct.dataclass
class LowRankWeight:
    """A weight W = base (or base.T when `transpose`) + u @ vt, used like the array W.

    base: the original's tensor (shared, never copied); u [rows, r], vt [r, cols] in the model's
    dtype, or both None (W is the base). `w[...]` is w itself; `x @ w` is x @ base + (x @ u) @ vt
    in x's dtype; `w[tokens]` (an embedding lookup; not when transposed) is base[tokens] +
    u[tokens] @ vt.
    """

    base: Array
    u: Array | None = None
    vt: Array | None = None
    transpose: bool = struct.field(pytree_node=False, default=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.base.shape[::-1] if self.transpose else self.base.shape

    @property
    def dtype(self) -> Any:
        return self.base.dtype

    def _base(self) -> Array:
        return self.base.T if self.transpose else self.base

    def __getitem__(self, key: Any) -> Any:
        if key is Ellipsis:
            return self
        if self.transpose:
            raise TypeError("a transposed LowRankWeight is an output head; it has no row lookup.")
        rows = self.base[key]
        return rows if self.u is None else rows + self.u[key] @ self.vt

    def __rmatmul__(self, x: Array) -> Array:
        out = x @ self._base()
        return out if self.u is None else out + (x @ self.u) @ self.vt

    def matmul_f32(self, x: Array) -> Array:
        """x [..., rows] @ W accumulated and returned in float32 (the output head)."""
        spec = "...i,oi->...o" if self.transpose else "...i,io->...o"
        out = einsum_f32(spec, x, self.base)
        if self.u is None:
            return out
        return out + einsum_f32("...r,ro->...o", einsum_f32("...i,ir->...r", x, self.u), self.vt)

    def ragged_dot_f32(self, lhs: Array, sizes: Array, second: Array | None = None) -> Array:
        """Stacked expert weights W [E, rows, cols] (base, u [E, rows, r], vt [E, r, cols]):
        `ragged_dot_f32(lhs, W, sizes)` (lhs [M, rows] grouped by expert), in float32.
        `second` (bool [M]) is for `PairedWeight`; here every entry takes the correction."""
        del second
        out = ragged_dot_f32(lhs, self.base, sizes)
        return out if self.u is None else out + self._ragged_delta(lhs, sizes)

    def _ragged_delta(self, lhs: Array, sizes: Array) -> Array:
        low = ragged_dot_f32(lhs, self.u, sizes).astype(lhs.dtype)
        return ragged_dot_f32(low, self.vt, sizes)


@struct.dataclass
class PairedWeight(LowRankWeight):
    """One tensor of both models of a pair, for an input whose leading axis holds 2B rows: the
    first B the original's, the last B the variant's (`paired_model`).

    The original's W is the base (transposed when `transpose`); the variant's is base + u @ vt
    (u, vt None: the same tensor), or `whole` (its own array, in the model's orientation) when it
    is not low rank. `x @ w`, `w.matmul_f32(x)`, `w[tokens]` read the base once for all 2B rows and
    add the correction to the variant's half only, computing for each half what the original and
    the `LowRankWeight` variant compute alone; a whole tensor is read twice (each half its own).
    `w * x`, `x + w` (a 1-D whole tensor: norm weight, bias) broadcast each half's own. Stacked
    expert weights: `ragged_dot_f32` with `second` marking the variant's entries.
    """

    whole: Array | None = None

    def __getitem__(self, key: Any) -> Any:
        if key is Ellipsis:
            return self
        if self.transpose:
            raise TypeError("a transposed PairedWeight is an output head; it has no row lookup.")
        h = _half(key)
        if self.whole is not None:
            return jnp.concatenate([self.base[key[:h]], self.whole[key[h:]]])
        rows = self.base[key]
        if self.u is None:
            return rows
        return jnp.concatenate([rows[:h], rows[h:] + self.u[key[h:]] @ self.vt])

    def __rmatmul__(self, x: Array) -> Array:
        h = _half(x)
        if self.whole is not None:
            return jnp.concatenate([x[:h] @ self._base(), x[h:] @ self.whole])
        out = x @ self._base()
        if self.u is None:
            return out
        return jnp.concatenate([out[:h], out[h:] + (x[h:] @ self.u) @ self.vt])

    def matmul_f32(self, x: Array) -> Array:
        h = _half(x)
        spec = "...i,oi->...o" if self.transpose else "...i,io->...o"
        if self.whole is not None:
            whole = einsum_f32("...i,io->...o", x[h:], self.whole)
            return jnp.concatenate([einsum_f32(spec, x[:h], self.base), whole])
        out = einsum_f32(spec, x, self.base)
        if self.u is None:
            return out
        low = einsum_f32("...i,ir->...r", x[h:], self.u)
        return jnp.concatenate([out[:h], out[h:] + einsum_f32("...r,ro->...o", low, self.vt)])

    def ragged_dot_f32(self, lhs: Array, sizes: Array, second: Array | None = None) -> Array:
        """As `LowRankWeight.ragged_dot_f32`; second bool [M]: the entries of the variant's rows
        (the expert order interleaves the halves)."""
        if second is None:
            raise ValueError("a PairedWeight's grouped product needs `second` (the variant rows).")
        out = ragged_dot_f32(lhs, self.base, sizes)
        if self.whole is not None:
            return jnp.where(second[:, None], ragged_dot_f32(lhs, self.whole, sizes), out)
        if self.u is None:
            return out
        return jnp.where(second[:, None], out + self._ragged_delta(lhs, sizes), out)

    def _pairwise(self, x: Array, op: Any) -> Array:
        if self.whole is None or self.u is not None or self.transpose:
            raise TypeError("only a 1-D whole PairedWeight (a norm weight or bias) broadcasts.")
        h = _half(x)
        return jnp.concatenate([op(x[:h], self.base), op(x[h:], self.whole)])

    def __mul__(self, x: Array) -> Array:
        return self._pairwise(x, lambda a, w: w * a)

    def __rmul__(self, x: Array) -> Array:
        return self._pairwise(x, lambda a, w: a * w)

    def __add__(self, x: Array) -> Array:
        return self._pairwise(x, lambda a, w: w + a)

    def __radd__(self, x: Array) -> Array:
        return self._pairwise(x, lambda a, w: a + w)


def _half(x: Array) -> int:
    n = x.shape[0]
    if n % 2:
        raise ValueError(f"a paired pass needs an even leading axis (B + B rows); got {n}.")
    return n // 2


class LowRankQwen3(Qwen3):
    """A `Qwen3` (same interface: forward, prefill, decode_step, ...) whose parameters may be
    `LowRankWeight`s over another model's arrays. Always untied: the head is `lm_head`.

    Built by `paired_model`, its parameters are `PairedWeight`s: then it is both models of the
    pair, and `decode_slots_pair` decodes both halves' slots in one pass."""

    def logits(self, x: Array) -> Array:
        """Final norm and LM head: hidden [..., H] -> float32 logits [..., V]."""
        x = rms_norm(x, self.norm[...], self.cfg.rms_norm_eps)
        head = self.lm_head[...]
        if isinstance(head, LowRankWeight):
            return head.matmul_f32(x)
        return einsum_f32("...h,hv->...v", x, head)

    def decode_slots_pair(
        self,
        tokens: Array,
        positions: Array,
        prompt_length: Array,
        write: Array,
        active: Array,
        states_o: tuple[Sequence[Any], Sequence[Any]],
        states_v: tuple[Sequence[Any], Sequence[Any]],
        block: int = 0,
    ) -> tuple[Array, Array, tuple[Any, Any], tuple[Any, Any]]:
        """`Qwen3.decode_slots` of both models of the pair at once (a model from `paired_model`):
        the S slots' rows of the original and the same S slots' rows of the variant go through
        one `forward` as 2S rows, every shared weight read once. Each model keeps its own state
        buffers (attention runs per half on them: no copy of either cache).

        tokens ... active: [S] as for decode_slots (both models decode the same tokens);
        states_o/states_v: (prompt, own) per layer of each model. Returns (float32 logits [S, V]
        of the original, of the variant, (prompt, own) of the original, of the variant)."""
        kv_o = slot_kv(prompt_length, write, *states_o, block)
        kv_v = slot_kv(prompt_length, write, *states_v, block)
        layers = [PairKV(a, b) for a, b in zip(kv_o.layers(), kv_v.layers(), strict=True)]
        both = lambda a: jnp.concatenate([a, a])[:, None]  # noqa: E731
        x, layers = self.forward(both(tokens), both(positions), layers)
        logits = self.logits(x[:, 0])
        s = tokens.shape[0]
        out_o = kv_o.with_layers([p.first for p in layers])
        out_v = kv_v.with_layers([p.second for p in layers])
        return (
            logits[:s],
            logits[s:],
            (tuple(states_o[0]), tuple(zip(out_o.k, out_o.v, strict=True))),
            (tuple(states_v[0]), tuple(zip(out_v.k, out_v.v, strict=True))),
        )


@struct.dataclass
class PairKV:
    """The decode state of one attention layer for a paired pass: the original's rows' LayerKV
    (the first half of the batch) and the variant's (the second); each half attends over its
    own buffers."""

    first: LayerKV
    second: LayerKV

    def decode(self, q: Array, k: Array, v: Array) -> tuple[PairKV, Array]:
        """`LayerKV.decode` of each half of q/k/v [2B, ...]; outputs concatenated."""
        h = _half(q)
        first, a = self.first.decode(q[:h], k[:h], v[:h])
        second, b = self.second.decode(q[h:], k[h:], v[h:])
        return PairKV(first, second), jnp.concatenate([a, b])


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    """How one variant tensor is held. kind: 'shared' | 'low_rank' | 'whole'; rank: of the
    factors (0 unless low rank); rel_error: ||W_v - (W_o + u vt)||_F / ||W_v||_F (0 when shared,
    nan when whole); max_ulp: the largest element error in eps * max|W_v|; reason: why
    a tensor is whole."""

    name: str
    shape: tuple[int, ...]
    kind: str
    rank: int = 0
    rel_error: float = 0.0
    max_ulp: float = 0.0
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class LowRankPlan:
    """Every variant tensor's plan, and the bytes involved (of the params, both models)."""

    tensors: tuple[TensorPlan, ...]
    max_rank: int
    two_model_bytes: int  # the original's params + the variant's, each held whole
    low_rank_bytes: int  # the original's + the factors and whole tensors (= two_model_bytes
    # when refused)

    @property
    def used(self) -> bool:
        """True when some matrix is shared or factored; else the variant is loaded whole (sharing
        only identical norms saves next to nothing)."""
        return any(t.kind != "whole" and len(t.shape) == 2 for t in self.tensors)

    def of_kind(self, kind: str) -> list[TensorPlan]:
        return [t for t in self.tensors if t.kind == kind]

    def summary(self) -> str:
        """One log line: counts by kind, the worst reconstruction error, the whole tensors and
        why, and the bytes saved."""
        lr, whole = self.of_kind("low_rank"), self.of_kind("whole")
        ranks = sorted({t.rank for t in lr})
        err = max((t.rel_error for t in lr), default=0.0)
        ulp = max((t.max_ulp for t in lr), default=0.0)
        mib = 2.0**20
        line = (
            f"low-rank variant (max_rank {self.max_rank}): {len(lr)} tensors low rank "
            f"(ranks {ranks}, max rel error {err:.2e}, max element error {ulp:.2f} eps*max|W|), "
            f"{len(self.of_kind('shared'))} shared, {len(whole)} whole"
        )
        if whole:
            shown = "; ".join(f"{t.name} ({t.reason})" for t in whole[:4])
            line += f" [{shown}{'; ...' if len(whole) > 4 else ''}]"
        if not self.used:
            line += "; refused: no matrix shared or low rank, the variant is loaded whole"
        saved = self.two_model_bytes - self.low_rank_bytes
        return (
            f"{line}; params {self.two_model_bytes / mib:.1f} MiB as two models -> "
            f"{self.low_rank_bytes / mib:.1f} MiB (saved {saved / mib:.1f} MiB)"
        )


# ----------------------------------------------------------------------------------------------
# comparing tensors


def _params(model: nnx.Module) -> Iterator[tuple[tuple[Any, ...], nnx.Param]]:
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param):
            yield tuple(path), node


def _name(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


def _head(model: Qwen3) -> tuple[Array, bool]:
    """(array, transposed?) of the model's output head [H, V]."""
    if model.cfg.tie_word_embeddings:
        return model.embed_tokens[...], True
    return model.lm_head[...], False


def _tensor(model: Qwen3, path: tuple[Any, ...]) -> tuple[Array, bool]:
    if path == ("lm_head",):
        return _head(model)
    node: Any = model
    for p in path:
        node = node[p] if isinstance(p, int) else getattr(node, p)
    return node[...], False


def _as_f32(a: Array, transpose: bool) -> np.ndarray:
    # A float32 tensor is read in place (never written): no copy of the largest tensors at load.
    x = np.asarray(a).astype(np.float32, copy=False)
    return x.T if transpose else x


def _blocks(n: int) -> Iterator[slice]:
    return (slice(i, min(i + _BLOCK_ROWS, n)) for i in range(0, n, _BLOCK_ROWS))


def _factor(
    w_o: np.ndarray, w_v: np.ndarray, max_rank: int, dtype: Any, seed: int
) -> tuple[np.ndarray, np.ndarray, float, float] | str:
    """(u, vt, rel_error, max_ulp) with w_v ~= w_o + u @ vt (u, vt in `dtype`, as the model
    holds them) within ULP_TOLERANCE * eps * max|w_v| per element, or the reason there is none."""
    rows, cols = w_o.shape
    p = min(max_rank + _OVERSAMPLE, rows, cols)
    omega = np.random.default_rng(seed).standard_normal((cols, p)).astype(np.float32)
    y = np.concatenate([(w_v[b] - w_o[b]) @ omega for b in _blocks(rows)]).astype(np.float64)
    q, _ = np.linalg.qr(y)  # [rows, p]: spans the delta's leading column space
    sketch = sum(q[b].T @ (w_v[b] - w_o[b]).astype(np.float64) for b in _blocks(rows))
    ub, s, vt = np.linalg.svd(sketch, full_matrices=False)
    # Keep every direction larger than the largest error the tolerance allows at all.
    eps = float(jnp.finfo(dtype).eps)
    floor = ULP_TOLERANCE * eps * float(np.sqrt(np.sum(np.square(w_v, dtype=np.float64))))
    rank = max(1, int(np.sum(s > floor)))
    if rank > max_rank:
        return f"rank > {max_rank}: singular value {max_rank + 1} is {s[max_rank]:.3g}"
    u = ((q @ ub[:, :rank]) * s[:rank]).astype(dtype)
    vt = vt[:rank].astype(dtype)
    u64, vt64 = u.astype(np.float64), vt.astype(np.float64)
    # One ulp at the tensor's largest magnitude: rounding the variant when it was written moved
    # each element by up to half that, and a least-squares fit spreads such noise evenly.
    ulp = eps * max(float(np.max(np.abs(w_v))), float(jnp.finfo(dtype).tiny))
    sq_err = sq_ref = worst = 0.0
    for b in _blocks(rows):
        o, v = w_o[b].astype(np.float64), w_v[b].astype(np.float64)
        err = np.abs(v - o - u64[b] @ vt64)
        worst = max(worst, float(np.max(err)) / ulp)
        sq_err += float(np.sum(err * err))
        sq_ref += float(np.sum(v * v))
    if worst > ULP_TOLERANCE:
        return f"rank-{rank} reconstruction off by {worst:.1f} ulp (> {ULP_TOLERANCE})"
    return u, vt, float(np.sqrt(sq_err / max(sq_ref, 1e-300))), worst


def _factor_stacked(
    w_o: np.ndarray, w_v: np.ndarray, max_rank: int, dtype: Any, seed: int
) -> tuple[np.ndarray, np.ndarray, float, float] | str:
    """`_factor` of each expert of stacked weights [E, rows, cols]: u [E, rows, r],
    vt [E, r, cols] with r the largest expert's rank (smaller ones padded with exact zeros);
    the worst expert's rel_error and max_ulp."""
    us, vts, rel, ulp = [], [], 0.0, 0.0
    for e in range(w_v.shape[0]):
        found = _factor(w_o[e], w_v[e], max_rank, dtype, seed)
        if isinstance(found, str):
            return f"expert {e}: {found}"
        us.append(found[0])
        vts.append(found[1])
        rel, ulp = max(rel, found[2]), max(ulp, found[3])
    r = max(u.shape[1] for u in us)
    u = np.stack([np.pad(u, ((0, 0), (0, r - u.shape[1]))) for u in us])
    vt = np.stack([np.pad(v, ((0, r - v.shape[0]), (0, 0))) for v in vts])
    return u, vt, rel, ulp


def _check_configs(original: Qwen3, cfg_v: Any, dtype_v: Any) -> None:
    a = dataclasses.replace(original.cfg, tie_word_embeddings=False)
    b = dataclasses.replace(cfg_v, tie_word_embeddings=False)
    if a != b:
        raise ValueError(
            f"the variant's config {cfg_v} differs from the original's {original.cfg} "
            "beyond tied embeddings; a low-rank variant needs the same architecture "
            "(pass variant_low_rank='off' to load it whole)."
        )
    if original.dtype != dtype_v:
        raise ValueError(
            f"the original is {original.dtype} and the variant {dtype_v}; load both in one dtype."
        )
    if type(original) is not Qwen3:
        raise TypeError(
            f"the original is a {type(original).__name__}; a low-rank variant is built over a "
            "plain Qwen3."
        )


def _check_pair(original: Qwen3, variant: Qwen3) -> None:
    _check_configs(original, variant.cfg, variant.dtype)
    for name, model in (("original", original), ("variant", variant)):
        if type(model) is not Qwen3:
            raise TypeError(
                f"the {name} is a {type(model).__name__}; as_low_rank compares two plain Qwen3 "
                "models."
            )


def _nbytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def as_low_rank(
    original: Qwen3, variant: Qwen3, *, max_rank: int = DEFAULT_MAX_RANK
) -> tuple[Qwen3, LowRankPlan]:
    """(model, plan): a `LowRankQwen3` equal to `variant` that holds the original's arrays plus
    factors of rank <= max_rank where the difference allows (see the module docstring), or
    `variant` itself when no tensor is shared or low rank (a random variant: refused whole).

    Tolerance: a tensor is low rank when every element of W_o + u @ vt is within 2 eps * max|W_v|
    of W_v (eps of the model's dtype: rounding noise, nothing more); its relative Frobenius error
    and its largest element error in those units are reported. The randomized range finder's seed
    is the tensor's name (the same factors whichever order tensors come in). The variant's
    tensors that are shared or factored are no longer referenced by the result (drop `variant` to
    free them); `load_low_rank_variant` never holds them all.
    """
    _check_pair(original, variant)
    cfg = dataclasses.replace(variant.cfg, tie_word_embeddings=False)
    out = nnx.eval_shape(lambda: LowRankQwen3(cfg, dtype=variant.dtype, rngs=nnx.Rngs(0)))
    items = ((path, *_tensor(variant, path)) for path, _ in list(_params(out)))
    variant_bytes = _nbytes(nnx.state(variant, nnx.Param))
    model, plan = _assemble(original, out, items, variant_bytes, max_rank)
    return (variant if model is None else model), plan


def load_low_rank_variant(
    original: Qwen3,
    path: str | os.PathLike,
    dtype: str = "float32",
    *,
    tied_head: str | None = None,
    max_rank: int = DEFAULT_MAX_RANK,
) -> tuple[Qwen3, LowRankPlan]:
    """`as_low_rank(original, load_model(path, dtype))` without holding the whole variant: its
    checkpoint is read one parameter at a time (`checkpoint.qwen3_tensors`), each compared with
    the original's tensor and dropped once shared or factored, so the load's peak is the
    original plus one variant tensor (and its float32 copies) plus what is kept. Same plan and
    model as `as_low_rank` on the loaded variant. Refused (no matrix shared or low rank): the
    variant is then loaded whole by `load_model` (read a second time) and returned with the plan.
    Qwen3 and Qwen3-MoE checkpoints; `tied_head` as for `load_model`."""
    from lpe_jax.model.checkpoint import load_model, qwen3_tensors

    cfg_v, tensors = qwen3_tensors(path, dtype, tied_head=tied_head)
    _check_configs(original, cfg_v, jnp.dtype(dtype))
    cfg = dataclasses.replace(cfg_v, tie_word_embeddings=False)
    out = nnx.eval_shape(lambda: LowRankQwen3(cfg, dtype=original.dtype, rngs=nnx.Rngs(0)))
    read = [0]

    def items() -> Iterator[tuple[tuple[Any, ...], Any, bool]]:
        for p, host in tensors:
            read[0] += host.nbytes
            yield p, host, False
            if p == ("embed_tokens",) and cfg_v.tie_word_embeddings:
                yield ("lm_head",), host, True  # a tied variant's head is its embedding

    model, plan = _assemble(original, out, items(), read, max_rank)
    if model is None:
        return load_model(path, dtype, tied_head=tied_head), plan
    return model, plan


def _assemble(
    original: Qwen3,
    out: LowRankQwen3,
    items: Iterable[tuple[tuple[Any, ...], Any, bool]],
    variant_bytes: int | list[int],
    max_rank: int,
) -> tuple[LowRankQwen3 | None, LowRankPlan]:
    """Fill the abstract `out` from the variant's (path, array, read transposed?) items, each
    planned against the original's tensor; (None, plan) when refused. variant_bytes: the
    variant's params, or a one-element list the items fill while they are read."""
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1; got {max_rank}.")
    plans, values, extra = [], {}, 0
    for path, a_v, t_v in items:
        a_o, t_o = _tensor(original, path)
        name = _name(path)
        seed = zlib.crc32(name.encode())
        plan, value = _plan_tensor(name, a_o, t_o, a_v, t_v, max_rank, original.dtype, seed)
        if isinstance(value, np.ndarray):  # a whole tensor read from a checkpoint
            value = jax.device_put(value)
        plans.append(plan)
        values[path] = value
        if plan.kind == "whole":
            extra += _nbytes(value)
        elif plan.kind == "low_rank":
            extra += _nbytes((value.u, value.vt))
    order = {_name(p): i for i, (p, _) in enumerate(_params(out))}
    plans.sort(key=lambda t: order[t.name])
    base = _nbytes(nnx.state(original, nnx.Param))
    v_bytes = variant_bytes if isinstance(variant_bytes, int) else variant_bytes[0]
    two = base + v_bytes
    plan = LowRankPlan(tuple(plans), max_rank, two_model_bytes=two, low_rank_bytes=base + extra)
    if not plan.used:
        return None, dataclasses.replace(plan, low_rank_bytes=two)
    for path, value in values.items():
        parent: Any = out
        for p in path[:-1]:
            parent = parent[p] if isinstance(p, int) else getattr(parent, p)
        setattr(parent, path[-1], nnx.Param(value))
    return out, plan


def _plan_tensor(
    name: str,
    a_o: Array,
    t_o: bool,
    a_v: Array,
    t_v: bool,
    max_rank: int,
    dtype: Any,
    seed: int,
) -> tuple[TensorPlan, Any]:
    """(plan, the parameter's value) of one tensor; a_*, t_*: the array and whether it is read
    transposed (a tied head)."""
    w_o, w_v = _as_f32(a_o, t_o), _as_f32(a_v, t_v)
    shape = w_v.shape
    if w_o.shape != shape:
        raise ValueError(f"{name}: the original is {w_o.shape} and the variant {shape}.")
    if np.array_equal(w_o, w_v):
        if not t_o:
            return TensorPlan(name, shape, "shared"), a_o
        return TensorPlan(name, shape, "shared"), LowRankWeight(a_o, transpose=True)
    whole = a_v.T if t_v else a_v
    if w_v.ndim not in (2, 3):
        return TensorPlan(name, shape, "whole", rel_error=np.nan, reason="1-D, differs"), whole
    found = (_factor if w_v.ndim == 2 else _factor_stacked)(w_o, w_v, max_rank, dtype, seed)
    if isinstance(found, str):
        return TensorPlan(name, shape, "whole", rel_error=np.nan, reason=found), whole
    u, vt, rel, ulp = found
    if t_o:  # W = base.T + u vt
        value = LowRankWeight(a_o, jnp.asarray(u), jnp.asarray(vt), transpose=True)
    else:
        value = LowRankWeight(a_o, jnp.asarray(u), jnp.asarray(vt))
    return TensorPlan(name, shape, "low_rank", rank=u.shape[-1], rel_error=rel, max_ulp=ulp), value


def buffer_key(a: Any) -> tuple[Any, ...] | None:
    """Identifies a concrete array's device buffers (equal keys: the same memory); None for
    anything else."""
    if not isinstance(a, jax.Array):
        return None
    shards = tuple((s.device.id, s.data.unsafe_buffer_pointer()) for s in a.addressable_shards)
    return (a.shape, a.dtype, shards)


def _same_buffers(a: Any, b: Any) -> bool:
    """Whether two concrete arrays are views of the same device buffers."""
    key = buffer_key(a)
    return key is not None and key == buffer_key(b)


def pair_whole_tensors(original: Qwen3, variant: Qwen3) -> tuple[str, ...] | str:
    """Whether the pair can decode as 2B rows through one copy of the weights (`paired_model`):
    the names of the variant's whole tensors (its own arrays, read for its half only) when
    `variant` is a `LowRankQwen3` built on `original`'s arrays (`as_low_rank(original, ...)`),
    else a sentence saying why not. Needs concrete arrays (call it outside jit)."""
    if type(original) is not Qwen3:
        return f"the original is a {type(original).__name__}, not a plain Qwen3"
    if not isinstance(variant, LowRankQwen3):
        return "the variant is not low rank (as_low_rank, --variant_low_rank=auto)"
    whole = []
    for path, node in _params(variant):
        value, name = node[...], _name(path)
        base, transposed = _tensor(original, path)
        if isinstance(value, LowRankWeight):
            if not (_same_buffers(value.base, base) and value.transpose == transposed):
                return f"the variant's {name} is low rank over another model's array"
        elif not _same_buffers(value, base):
            whole.append(name)
    return tuple(whole)


def paired_model(original: Qwen3, variant: LowRankQwen3, whole: Sequence[str]) -> LowRankQwen3:
    """Both models of a pair as one `LowRankQwen3` whose parameters are `PairedWeight`s: a pass
    over 2B rows (the original's B first) computes each half as its own model does. Holds no
    new arrays (the variant's bases are the original's; a whole tensor pairs the original's
    array with the variant's). whole: `pair_whole_tensors(original, variant)` (checked there,
    outside jit; this runs inside jit too)."""
    graphdef, state = nnx.split(variant)
    out = nnx.merge(graphdef, state)
    names = frozenset(whole)
    for path, node in list(_params(out)):
        value = node[...]
        if isinstance(value, LowRankWeight):
            paired = PairedWeight(value.base, value.u, value.vt, transpose=value.transpose)
        elif _name(path) in names:
            base, transposed = _tensor(original, path)
            paired = PairedWeight(base, transpose=transposed, whole=value)
        else:
            continue  # shared: the original's array itself
        parent: Any = out
        for p in path[:-1]:
            parent = parent[p] if isinstance(p, int) else getattr(parent, p)
        setattr(parent, path[-1], nnx.Param(paired))
    return out


def unique_bytes(*trees: Any) -> int:
    """Bytes of the distinct device buffers behind the trees' arrays (a buffer two trees or two
    leaves share counts once)."""
    seen: dict[tuple[Any, ...], int] = {}
    for leaf in jax.tree.leaves(trees):
        for shard in leaf.addressable_shards:
            key = (shard.device.id, shard.data.unsafe_buffer_pointer())
            seen[key] = shard.data.size * shard.data.dtype.itemsize
    return sum(seen.values())


def unique_param_bytes(*models: nnx.Module) -> int:
    """`unique_bytes` of the models' parameters: what a pair really holds."""
    return unique_bytes(*(nnx.state(m, nnx.Param) for m in models))
