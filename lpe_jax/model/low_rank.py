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

The low-rank model runs through the same `Qwen3` code: `x @ w` on a `LowRankWeight` computes
x @ W_o + (x @ u) @ vt, and an embedding lookup E_o[t] + u[t] @ vt. Its output head is always an
explicit `lm_head` (a tied original's embedding, read transposed, is its base), because an
abliteration edits the input embedding but not the head. Both halves of a pair then pass their
rows through one copy of the weights: the variant's pass still *reads* every weight a second time
(weight memory is halved, weight reads per step are not; that takes both models' rows in one
batch through the shared weights, which the engine does not do).

Load-time cost: per differing 2-D tensor, a randomized range finder of max_rank + 8 columns
(O(rows * cols * (max_rank + 8)) flops) and one float64 pass to check the reconstruction, in
blocks of rows; the variant must be loaded whole first (the peak at load is still two copies).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from lpe_jax.model.f32_dot import einsum_f32
from lpe_jax.model.qwen3 import Qwen3, rms_norm

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


class LowRankQwen3(Qwen3):
    """A `Qwen3` (same interface: forward, prefill, decode_step, ...) whose parameters may be
    `LowRankWeight`s over another model's arrays. Always untied: the head is `lm_head`."""

    def logits(self, x: Array) -> Array:
        """Final norm and LM head: hidden [..., H] -> float32 logits [..., V]."""
        x = rms_norm(x, self.norm[...], self.cfg.rms_norm_eps)
        head = self.lm_head[...]
        if isinstance(head, LowRankWeight):
            return head.matmul_f32(x)
        return einsum_f32("...h,hv->...v", x, head)


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
    x = np.asarray(a).astype(np.float32)
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


def _check_pair(original: Qwen3, variant: Qwen3) -> None:
    a = dataclasses.replace(original.cfg, tie_word_embeddings=False)
    b = dataclasses.replace(variant.cfg, tie_word_embeddings=False)
    if a != b:
        raise ValueError(
            f"the variant's config {variant.cfg} differs from the original's {original.cfg} "
            "beyond tied embeddings; a low-rank variant needs the same architecture "
            "(pass variant_low_rank='off' to load it whole)."
        )
    if original.dtype != variant.dtype:
        raise ValueError(
            f"the original is {original.dtype} and the variant {variant.dtype}; load both in "
            "one dtype."
        )
    for name, model in (("original", original), ("variant", variant)):
        if type(model) is not Qwen3:
            raise TypeError(
                f"the {name} is a {type(model).__name__}; as_low_rank compares two plain Qwen3 "
                "models."
            )


def _nbytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def as_low_rank(
    original: Qwen3, variant: Qwen3, *, max_rank: int = DEFAULT_MAX_RANK, seed: int = 0
) -> tuple[Qwen3, LowRankPlan]:
    """(model, plan): a `LowRankQwen3` equal to `variant` that holds the original's arrays plus
    factors of rank <= max_rank where the difference allows (see the module docstring), or
    `variant` itself when no tensor is shared or low rank (a random variant: refused whole).

    Tolerance: a tensor is low rank when every element of W_o + u @ vt is within 2 eps * max|W_v|
    of W_v (eps of the model's dtype: rounding noise, nothing more); its relative Frobenius error
    and its largest element error in those units are reported. `seed` fixes the randomized
    range finder. The variant's tensors that are shared or factored are no longer referenced by
    the result (drop `variant` to free them).
    """
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1; got {max_rank}.")
    _check_pair(original, variant)
    cfg = dataclasses.replace(variant.cfg, tie_word_embeddings=False)
    out = nnx.eval_shape(lambda: LowRankQwen3(cfg, dtype=variant.dtype, rngs=nnx.Rngs(0)))
    plans, values, extra = [], {}, 0
    for i, (path, _) in enumerate(list(_params(out))):
        (a_o, t_o), (a_v, t_v) = _tensor(original, path), _tensor(variant, path)
        plan, value = _plan_tensor(_name(path), a_o, t_o, a_v, t_v, max_rank, variant.dtype, i)
        plans.append(plan)
        values[path] = value
        if plan.kind == "whole":
            extra += _nbytes(a_v)
        elif plan.kind == "low_rank":
            extra += _nbytes((value.u, value.vt))
    base = _nbytes(nnx.state(original, nnx.Param))
    two = base + _nbytes(nnx.state(variant, nnx.Param))
    plan = LowRankPlan(tuple(plans), max_rank, two_model_bytes=two, low_rank_bytes=base + extra)
    if not plan.used:
        return variant, dataclasses.replace(plan, low_rank_bytes=two)
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
    if w_v.ndim != 2:
        return TensorPlan(name, shape, "whole", rel_error=np.nan, reason="1-D, differs"), whole
    found = _factor(w_o, w_v, max_rank, dtype, seed)
    if isinstance(found, str):
        return TensorPlan(name, shape, "whole", rel_error=np.nan, reason=found), whole
    u, vt, rel, ulp = found
    if t_o:  # W = base.T + u vt
        value = LowRankWeight(a_o, jnp.asarray(u), jnp.asarray(vt), transpose=True)
    else:
        value = LowRankWeight(a_o, jnp.asarray(u), jnp.asarray(vt))
    return TensorPlan(name, shape, "low_rank", rank=u.shape[1], rel_error=rel, max_ulp=ulp), value


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
