"""Gated DeltaNet: the linear-attention layer of Qwen3.5 (HF `Qwen3_5GatedDeltaNet`, identical in
`Qwen3_5MoeGatedDeltaNet`), in Flax NNX.

Per token: in-projections `in_proj_qkv` (q, k, v), `in_proj_z` (output gate),
`in_proj_b` (beta = sigmoid(b), the write strength) and `in_proj_a` (decay
g = -exp(A_log) * softplus(a + dt_bias) <= 0, in log space); a causal depthwise conv of width
`conv_kernel` over q|k|v followed by SiLU; q and k L2-normalised (eps 1e-6, float32), q scaled by
head_k_dim^-1/2; the gated delta rule on a state S [head_k_dim, head_v_dim] per value head:

    S <- exp(g_t) S;   S <- S + beta_t k_t (v_t - S^T k_t)^T;   o_t = S^T q_t

then `gated_rms_norm(o, z)` per value head and `out_proj`. Each q/k head serves
num_v_heads / num_k_heads consecutive value heads (HF's repeat_interleave).

Two exact forms of the rule: `chunk_gated_delta_rule` (HF `torch_chunk_gated_delta_rule`, used
by `prefill`: the within-chunk part as matmuls and a unit-triangular solve, a scan over chunks)
and `recurrent_gated_delta_rule` (HF `torch_recurrent_gated_delta_rule`, used by `decode`, one
token at a time). Both run in float32, as HF's do.

A sequence's whole history lives in a fixed-size `GatedDeltaNetState`: the conv window (the last
conv_kernel - 1 inputs of the conv) and S. `prefill(x, lengths)` takes right-padded rows of
different true lengths: positions >= a row's length get beta = 0 and g = 0, which makes them
identity steps of the rule, and the conv window is read at the true length, so the returned state
is the state after exactly `lengths[b]` tokens. Outputs at padded positions are junk.

**Channel layout of q|k|v (one permutation at load).** HF's `in_proj_qkv` (and `conv1d`, and the
conv window) order their channels [all q heads | all k heads | all v heads]: a contiguous split
over a tensor mesh axis would cut across q, k and v. Here they are stored *grouped by key head*:
for key head i, [q_i (head_k_dim) | k_i (head_k_dim) | the value heads i*r .. i*r + r - 1 it
serves (r * head_v_dim)], r = num_v_heads / num_k_heads (`qkv_channel_order` gives the map;
`hf_weight_table` applies it to `in_proj_qkv` and `conv1d` once, at load). A split into n equal
blocks (n dividing num_k_heads) then holds whole key heads with their own value heads, and value
heads keep HF's order, so `in_proj_z`, `in_proj_b/a`, `A_log`, `dt_bias`, `out_proj` and the
delta state are unchanged. The conv is per channel, so the forward math is HF's exactly; only the
channel order of `GatedDeltaNetState.conv` differs from HF's conv cache (by the same map).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from lpe_jax.model.hf_keymap import HFParam, same, transposed
from lpe_jax.model.qwen35_norms import gated_rms_norm

Array = jax.Array
_L2NORM_EPS = 1e-6  # HF l2norm's eps (matches the FLA kernels), not rms_norm_eps


@dataclasses.dataclass(frozen=True)
class GatedDeltaNetConfig:
    """Static shape of one Gated DeltaNet layer (the `linear_*` keys of a Qwen3.5 config)."""

    hidden_size: int
    num_k_heads: int
    num_v_heads: int
    head_k_dim: int
    head_v_dim: int
    conv_kernel: int = 4
    rms_norm_eps: float = 1e-6
    chunk_size: int = 64  # HF's default chunk; any size gives the same result up to rounding

    def __post_init__(self) -> None:
        if self.num_v_heads % self.num_k_heads:
            raise ValueError(
                f"linear_num_value_heads={self.num_v_heads} is not a multiple of "
                f"linear_num_key_heads={self.num_k_heads}; each key head must serve whole "
                "value heads."
            )
        if self.conv_kernel < 2:
            raise ValueError(f"linear_conv_kernel_dim={self.conv_kernel} must be >= 2.")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size={self.chunk_size} must be >= 1.")

    @property
    def key_dim(self) -> int:
        return self.num_k_heads * self.head_k_dim

    @property
    def value_dim(self) -> int:
        return self.num_v_heads * self.head_v_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the conv: q, k and v (grouped by key head, module docstring)."""
        return 2 * self.key_dim + self.value_dim

    @property
    def group_dim(self) -> int:
        """Channels of one key head's group: its q, its k and the value heads it serves."""
        return self.conv_dim // self.num_k_heads

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> GatedDeltaNetConfig:
        """From a Qwen3.5 (or Qwen3.5-MoE) text config dict (`config.json`'s `text_config` for a
        multimodal checkpoint). Raises ValueError on a missing key or an activation not SiLU."""
        keys = ("hidden_size", "linear_num_key_heads", "linear_num_value_heads")
        keys += ("linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim")
        missing = [k for k in keys if k not in hf]
        if missing:
            raise ValueError(f"config lacks {missing}; a Qwen3.5 text config has them.")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (only 'silu').")
        return cls(
            hidden_size=int(hf["hidden_size"]),
            num_k_heads=int(hf["linear_num_key_heads"]),
            num_v_heads=int(hf["linear_num_value_heads"]),
            head_k_dim=int(hf["linear_key_head_dim"]),
            head_v_dim=int(hf["linear_value_head_dim"]),
            conv_kernel=int(hf["linear_conv_kernel_dim"]),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        )

    def state_bytes(self, dtype: Any) -> int:
        """Bytes of one sequence's state: conv window in `dtype`, delta state in float32."""
        conv = self.conv_dim * (self.conv_kernel - 1) * jnp.dtype(dtype).itemsize
        return conv + self.num_v_heads * self.head_k_dim * self.head_v_dim * 4


def qkv_channel_order(cfg: GatedDeltaNetConfig) -> np.ndarray:
    """int [conv_dim]: our q|k|v channel c is HF's channel order[c] (module docstring: grouped
    by key head). `hf[..., order]` converts an HF-ordered channel axis (in_proj_qkv's output,
    conv1d's rows, the conv cache) to ours; `np.argsort(order)` converts back."""
    dk, kd = cfg.head_k_dim, cfg.key_dim
    vg = cfg.value_dim // cfg.num_k_heads  # value channels per key head
    groups = [
        np.concatenate(
            [
                np.arange(i * dk, (i + 1) * dk),
                kd + np.arange(i * dk, (i + 1) * dk),
                2 * kd + np.arange(i * vg, (i + 1) * vg),
            ]
        )
        for i in range(cfg.num_k_heads)
    ]
    return np.concatenate(groups)


@struct.dataclass
class GatedDeltaNetState:
    """One layer's state for a batch of sequences; its size does not grow with their length.

    conv: [B, conv_dim, conv_kernel - 1] in the activation dtype, the last conv inputs (oldest
        first; zeros before the first token), as HF's conv cache with its channels in our
        grouped order (`qkv_channel_order`).
    recurrent: float32 [B, num_v_heads, head_k_dim, head_v_dim], the delta-rule state S. Kept in
        float32 in every dtype, as HF does: it is updated every token, and bf16 would round it
        at each step (measured, with what bf16 would save: docs/benchmarks.md, "Qwen3.5's delta
        state stays float32").
    """

    conv: Array
    recurrent: Array


def l2norm(x: Array) -> Array:
    """HF's l2norm in float32: x * rsqrt(sum(x^2) + 1e-6) over the last axis."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + _L2NORM_EPS)


def causal_conv(x: Array, window: Array, weight: Array) -> Array:
    """Depthwise causal conv + SiLU: x [B, T, C] after `window` [B, C, K-1] -> [B, T, C] in
    x.dtype; weight [C, K] (HF conv1d.weight squeezed), tap K-1 on the newest input."""
    k = weight.shape[1]
    seq = jnp.concatenate([window.transpose(0, 2, 1), x], axis=1).astype(jnp.float32)
    t = x.shape[1]
    w = weight.astype(jnp.float32)
    out = sum(seq[:, j : j + t] * w[:, j] for j in range(k))
    return jax.nn.silu(out).astype(x.dtype)


def chunk_gated_delta_rule(
    q: Array, k: Array, v: Array, g: Array, beta: Array, state: Array, chunk: int
) -> tuple[Array, Array]:
    """The gated delta rule over a sequence, chunk by chunk (HF torch_chunk_gated_delta_rule).

    q, k [B, T, h, dk] (already L2-normalised, q scaled); v [B, T, h, dv]; g, beta [B, T, h];
    state float32 [B, h, dk, dv], the state before token 0. All in float32.
    Returns (outputs float32 [B, T, h, dv], the state after token T-1).
    """
    b, t, h, dk = k.shape
    dv = v.shape[-1]
    pad = -t % chunk
    n = (t + pad) // chunk

    def chunks(x: Array) -> Array:  # [B, T, h, ...] -> [N, B, h, C, ...], zero padded
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape(b, n, chunk, h, *x.shape[3:])
        return jnp.moveaxis(x, (1, 3), (0, 2))

    q, k, v, g, beta = map(chunks, (q, k, v, g, beta))  # padding: beta = g = 0, identity steps
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    cum = jnp.cumsum(g, axis=-1)  # [N, B, h, C]: log decay from the chunk start to position i
    causal = jnp.tril(jnp.ones((chunk, chunk), bool))
    decay = jnp.exp(jnp.where(causal, cum[..., :, None] - cum[..., None, :], -jnp.inf))
    system = jnp.einsum("nbhid,nbhjd->nbhij", k_beta, k) * decay
    intra = jnp.einsum("nbhid,nbhjd->nbhij", q, k) * decay  # diagonal included
    # (I + strictly-lower(system))^-1: HF solves with unitriangular=True, ignoring the diagonal.
    unit = jnp.where(jnp.tril(causal, -1), system, 0.0) + jnp.eye(chunk, dtype=system.dtype)

    def solve(rhs: Array) -> Array:
        return jax.scipy.linalg.solve_triangular(unit, rhs, lower=True, unit_diagonal=True)

    new_values = solve(v_beta)
    k_cumdecay = solve(k_beta * jnp.exp(cum)[..., None])
    q_decayed = q * jnp.exp(cum)[..., None]
    k_decayed = k * jnp.exp(cum[..., -1:] - cum)[..., None]
    chunk_decay = jnp.exp(cum[..., -1])[..., None, None]

    def step(s: Array, xs: tuple[Array, ...]) -> tuple[Array, Array]:
        nv, kc, qd, kd, att, cd = xs
        v_new = nv - jnp.einsum("bhcd,bhde->bhce", kc, s)
        out = jnp.einsum("bhcd,bhde->bhce", qd, s) + jnp.einsum("bhij,bhje->bhie", att, v_new)
        s = s * cd + jnp.einsum("bhcd,bhce->bhde", kd, v_new)
        return s, out

    xs = (new_values, k_cumdecay, q_decayed, k_decayed, intra, chunk_decay)
    state, out = jax.lax.scan(step, state.astype(jnp.float32), xs)  # out [N, B, h, C, dv]
    out = jnp.moveaxis(out, (0, 2), (1, 3)).reshape(b, n * chunk, h, dv)
    return out[:, :t], state


def recurrent_gated_delta_rule(
    q: Array, k: Array, v: Array, g: Array, beta: Array, state: Array
) -> tuple[Array, Array]:
    """The gated delta rule one token at a time (HF torch_recurrent_gated_delta_rule).

    Same arguments and results as `chunk_gated_delta_rule` (no chunk size).
    """

    def step(s: Array, xs: tuple[Array, ...]) -> tuple[Array, Array]:
        q_t, k_t, v_t, g_t, beta_t = xs  # [B, h, d] and [B, h]
        s = s * jnp.exp(g_t)[..., None, None]
        delta = (v_t - jnp.einsum("bhde,bhd->bhe", s, k_t)) * beta_t[..., None]
        s = s + k_t[..., :, None] * delta[..., None, :]
        return s, jnp.einsum("bhde,bhd->bhe", s, q_t)

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta))
    state, out = jax.lax.scan(step, state.astype(jnp.float32), xs)
    return jnp.moveaxis(out, 0, 1), state


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Any, std: float = 0.02) -> nnx.Param:
    return nnx.Param((std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype))


class GatedDeltaNet(nnx.Module):
    """HF Qwen3_5GatedDeltaNet. Linear weights stored [in, out] (HF's transposed); parameter
    names are HF's, so `hf_weight_table` is a rename plus transposes."""

    def __init__(self, cfg: GatedDeltaNetConfig, dtype: Any, rngs: nnx.Rngs):
        self.cfg = cfg
        h, nv = cfg.hidden_size, cfg.num_v_heads
        self.in_proj_qkv = _param(rngs, (h, cfg.conv_dim), dtype)
        self.in_proj_z = _param(rngs, (h, cfg.value_dim), dtype)
        self.in_proj_b = _param(rngs, (h, nv), dtype)
        self.in_proj_a = _param(rngs, (h, nv), dtype)
        self.conv1d = _param(rngs, (cfg.conv_dim, cfg.conv_kernel), dtype, std=0.3)
        self.dt_bias = nnx.Param(jnp.ones((nv,), dtype))
        a = jax.random.uniform(rngs.params(), (nv,), jnp.float32, 0.01, 16.0)  # HF's init range
        self.A_log = nnx.Param(jnp.log(a).astype(dtype))
        self.norm = nnx.Param(jnp.ones((cfg.head_v_dim,), dtype))
        self.out_proj = _param(rngs, (cfg.value_dim, h), dtype)

    def init_state(self, batch: int, dtype: Any) -> GatedDeltaNetState:
        """The state before any token: zeros (conv window in `dtype`, delta state float32)."""
        cfg = self.cfg
        return GatedDeltaNetState(
            conv=jnp.zeros((batch, cfg.conv_dim, cfg.conv_kernel - 1), dtype),
            recurrent=jnp.zeros(
                (batch, cfg.num_v_heads, cfg.head_k_dim, cfg.head_v_dim), jnp.float32
            ),
        )

    def _gates(self, x: Array) -> tuple[Array, Array, Array, Array]:
        """x [B, T, H] -> (conv input [B, T, conv_dim], z [B, T, nv, dv], beta f32 [B, T, nv],
        g f32 [B, T, nv]); beta is sigmoid(b) in x.dtype as HF computes it, then upcast."""
        cfg = self.cfg
        b, t, _ = x.shape
        z = (x @ self.in_proj_z[...]).reshape(b, t, cfg.num_v_heads, cfg.head_v_dim)
        beta = jax.nn.sigmoid(x @ self.in_proj_b[...]).astype(jnp.float32)
        a = (x @ self.in_proj_a[...]).astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32)
        g = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(a)
        return x @ self.in_proj_qkv[...], z, beta, g

    def _qkv(self, mixed: Array) -> tuple[Array, Array, Array]:
        """Conv output [B, T, conv_dim] -> q, k float32 [B, T, nv, dk] (L2-normalised, q
        scaled, key heads repeated per value head) and v float32 [B, T, nv, dv]."""
        cfg = self.cfg
        b, t, _ = mixed.shape
        dk = cfg.head_k_dim
        groups = mixed.reshape(b, t, cfg.num_k_heads, cfg.group_dim)  # grouped by key head
        q, k, v = groups[..., :dk], groups[..., dk : 2 * dk], groups[..., 2 * dk :]
        rep = cfg.num_v_heads // cfg.num_k_heads
        q, k = jnp.repeat(q, rep, axis=2), jnp.repeat(k, rep, axis=2)
        v = v.reshape(b, t, cfg.num_v_heads, cfg.head_v_dim).astype(jnp.float32)
        return l2norm(q) * cfg.head_k_dim**-0.5, l2norm(k), v

    def _out(self, core: Array, z: Array, dtype: Any) -> Array:
        """Rule outputs f32 [B, T, nv, dv] -> gated norm -> out_proj -> [B, T, H] in dtype."""
        b, t = core.shape[:2]
        y = gated_rms_norm(core.astype(dtype), z, self.norm[...], self.cfg.rms_norm_eps)
        return y.reshape(b, t, -1) @ self.out_proj[...]

    def prefill(
        self, x: Array, lengths: Array | None = None, state: GatedDeltaNetState | None = None
    ) -> tuple[Array, GatedDeltaNetState]:
        """Rows x [B, T, H], right-padded, through the layer with the chunked rule.

        lengths: int [B] true lengths (default T; 0 <= length <= T, may be traced).
        state: the state before x (default `init_state`), so a prefill can continue a sequence.
        Returns (y [B, T, H] in x.dtype, junk at positions >= length; the state after each row's
        `lengths[b]` tokens).
        """
        cfg = self.cfg
        b, t, _ = x.shape
        if state is None:
            state = self.init_state(b, x.dtype)
        lengths = jnp.full((b,), t, jnp.int32) if lengths is None else jnp.asarray(lengths)
        mixed_in, z, beta, g = self._gates(x)
        mixed = causal_conv(mixed_in, state.conv, self.conv1d[...])
        q, k, v = self._qkv(mixed)
        real = (jnp.arange(t)[None, :] < lengths[:, None])[..., None]  # [B, T, 1]
        beta, g = jnp.where(real, beta, 0.0), jnp.where(real, g, 0.0)  # padding: identity steps
        core, recurrent = chunk_gated_delta_rule(q, k, v, g, beta, state.recurrent, cfg.chunk_size)
        # The conv window after `length` tokens: the K-1 conv inputs just before position length,
        # reaching back into the previous window for short rows.
        seq = jnp.concatenate([state.conv, mixed_in.transpose(0, 2, 1)], axis=2)
        window = jax.vmap(
            lambda s, n: jax.lax.dynamic_slice_in_dim(s, n, cfg.conv_kernel - 1, axis=1)
        )(seq, lengths)
        return self._out(core, z, x.dtype), GatedDeltaNetState(
            window.astype(state.conv.dtype), recurrent
        )

    def decode(self, x: Array, state: GatedDeltaNetState) -> tuple[Array, GatedDeltaNetState]:
        """One new token per row, x [B, 1, H], with the recurrent rule.

        Returns (y [B, 1, H] in x.dtype, the state after the token).
        """
        mixed_in, z, beta, g = self._gates(x)
        mixed = causal_conv(mixed_in, state.conv, self.conv1d[...])
        q, k, v = self._qkv(mixed)
        core, recurrent = recurrent_gated_delta_rule(q, k, v, g, beta, state.recurrent)
        window = jnp.concatenate([state.conv[:, :, 1:], mixed_in.transpose(0, 2, 1)], axis=2)
        return self._out(core, z, x.dtype), GatedDeltaNetState(
            window.astype(state.conv.dtype), recurrent
        )


def hf_weight_table(cfg: GatedDeltaNetConfig, prefix: str) -> list[HFParam]:
    """HF names of one Gated DeltaNet layer under `prefix` (e.g.
    'model.language_model.layers.0.linear_attn.') -> `GatedDeltaNet` parameters; `in_proj_qkv`
    and `conv1d` have their channels put in the grouped order (`qkv_channel_order`)."""
    h, nv, c = cfg.hidden_size, cfg.num_v_heads, cfg.conv_dim
    order = qkv_channel_order(cfg)  # HF's q|k|v channels -> grouped by key head
    return [
        HFParam(
            ("in_proj_qkv",), (prefix + "in_proj_qkv.weight",), ((c, h),), lambda w: w[order].T
        ),
        transposed(("in_proj_z",), prefix + "in_proj_z.weight", (cfg.value_dim, h)),
        transposed(("in_proj_b",), prefix + "in_proj_b.weight", (nv, h)),
        transposed(("in_proj_a",), prefix + "in_proj_a.weight", (nv, h)),
        HFParam(
            ("conv1d",),
            (prefix + "conv1d.weight",),
            ((c, 1, cfg.conv_kernel),),
            lambda w: w[order, 0],
        ),
        same(("dt_bias",), prefix + "dt_bias", (nv,)),
        same(("A_log",), prefix + "A_log", (nv,)),
        same(("norm",), prefix + "norm.weight", (cfg.head_v_dim,)),
        transposed(("out_proj",), prefix + "out_proj.weight", (h, cfg.value_dim)),
    ]
