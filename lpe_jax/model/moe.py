"""Sparse mixture-of-experts MLP of Qwen3-MoE and Qwen3.5-MoE, in Flax NNX.

HF `Qwen3MoeSparseMoeBlock` (router `Qwen3MoeTopKRouter`, experts `Qwen3MoeExperts`) and
`Qwen3_5MoeSparseMoeBlock` (`Qwen3_5MoeTopKRouter`, `Qwen3_5MoeExperts`, plus a shared expert):

    logits = x @ router                       (activation dtype)
    probs  = softmax(logits) in float32;  top-k experts by probability
    w      = top-k probs, divided by their sum when renormalised, cast to the activation dtype
    y      = sum_k w_k * down_e(silu(gate_e x) * up_e x)
    y     += sigmoid(x @ shared_expert_gate) * shared_expert(x)          (Qwen3.5-MoE only)

Renormalisation: Qwen3-MoE follows `norm_topk_prob` in its config (transformers' default: false;
Qwen3-30B-A3B sets true); Qwen3.5-MoE's router always renormalises (its config has no such key).

Expert weights are stacked with the expert axis first ([E, H, F], [E, F, H]) so they can be
sharded over an expert mesh axis. Two exact dispatches (`MoEConfig.dispatch`):
- 'ragged': the (token, expert) pairs sorted by expert and run as grouped matmuls
  (`jax.lax.ragged_dot`): only the selected experts are computed.
- 'dense': every expert on every token, unselected ones weighted by zero (E / k times the FLOPs;
  the simplest form to shard over experts, a sum over the expert axis).
Both compute each selected expert's SwiGLU on the token as HF does; they differ from HF only in the
order of the final sums over experts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lpe_jax.model.f32_dot import einsum_f32, ragged_dot_f32
from lpe_jax.model.hf_keymap import HFParam, transposed

Array = jax.Array
DISPATCHES = ("ragged", "dense")
QWEN3_MOE_TYPES = ("qwen3_moe",)
QWEN35_MOE_TYPES = ("qwen3_5_moe", "qwen3_5_moe_text")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Static shape of one sparse MoE block. shared_expert_intermediate_size 0: no shared expert."""

    hidden_size: int
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    norm_topk_prob: bool
    shared_expert_intermediate_size: int = 0
    dispatch: str = "ragged"

    def __post_init__(self) -> None:
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok={self.top_k} must be in [1, num_experts={self.num_experts}]."
            )
        if self.dispatch not in DISPATCHES:
            raise ValueError(f"dispatch {self.dispatch!r} unknown; use one of {DISPATCHES}.")

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], dispatch: str = "ragged") -> MoEConfig:
        """From a Qwen3-MoE or Qwen3.5-MoE (text) config dict, by its `model_type`."""
        model_type = hf.get("model_type")
        if model_type not in QWEN3_MOE_TYPES + QWEN35_MOE_TYPES:
            raise ValueError(
                f"model_type {model_type!r} has no sparse MoE block here; supported: "
                f"{list(QWEN3_MOE_TYPES + QWEN35_MOE_TYPES)}."
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (only 'silu').")
        # transformers' Qwen3MoeConfig writes `num_local_experts` (its attribute map); the Hub's
        # config.json files say `num_experts`.
        experts = hf.get("num_experts", hf.get("num_local_experts"))
        missing = [k for k in ("hidden_size", "num_experts_per_tok", "moe_intermediate_size")]
        missing = [k for k in missing if k not in hf] + (["num_experts"] if experts is None else [])
        if missing:
            raise ValueError(f"config lacks {missing}; a {model_type} config has them.")
        qwen35 = model_type in QWEN35_MOE_TYPES
        if qwen35 and "shared_expert_intermediate_size" not in hf:
            raise ValueError("config lacks shared_expert_intermediate_size (Qwen3.5-MoE has it).")
        return cls(
            hidden_size=int(hf["hidden_size"]),
            num_experts=int(experts),
            top_k=int(hf["num_experts_per_tok"]),
            expert_intermediate_size=int(hf["moe_intermediate_size"]),
            norm_topk_prob=True if qwen35 else bool(hf.get("norm_topk_prob", False)),
            shared_expert_intermediate_size=int(hf["shared_expert_intermediate_size"])
            if qwen35
            else 0,
            dispatch=dispatch,
        )


def is_sparse_layer(hf: Mapping[str, Any], layer: int) -> bool:
    """Whether layer `layer` has a sparse MoE block (else a dense SwiGLU MLP of
    `intermediate_size`). Qwen3.5-MoE: every layer. Qwen3-MoE: not in `mlp_only_layers`, and
    (layer + 1) divisible by `decoder_sparse_step`, as HF `Qwen3MoeDecoderLayer` decides."""
    if hf.get("model_type") in QWEN35_MOE_TYPES:
        return True
    experts = hf.get("num_experts", hf.get("num_local_experts", 0))
    step = int(hf.get("decoder_sparse_step", 1))
    return (
        layer not in (hf.get("mlp_only_layers") or []) and experts > 0 and (layer + 1) % step == 0
    )


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Any, std: float = 0.02) -> nnx.Param:
    return nnx.Param((std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype))


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)); the shared expert (HF Qwen3_5MoeMLP)."""

    def __init__(self, hidden: int, intermediate: int, dtype: Any, rngs: nnx.Rngs):
        self.gate_proj = _param(rngs, (hidden, intermediate), dtype)
        self.up_proj = _param(rngs, (hidden, intermediate), dtype)
        self.down_proj = _param(rngs, (intermediate, hidden), dtype)

    def __call__(self, x: Array) -> Array:
        return (jax.nn.silu(x @ self.gate_proj[...]) * (x @ self.up_proj[...])) @ self.down_proj[
            ...
        ]


class Experts(nnx.Module):
    """E SwiGLU experts, weights stacked with the expert axis first: gate_proj/up_proj
    [E, H, F], down_proj [E, F, H]."""

    def __init__(self, cfg: MoEConfig, dtype: Any, rngs: nnx.Rngs):
        e, h, f = cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size
        self.gate_proj = _param(rngs, (e, h, f), dtype)
        self.up_proj = _param(rngs, (e, h, f), dtype)
        self.down_proj = _param(rngs, (e, f, h), dtype)

    def ragged(self, x: Array, weights: Array, experts: Array) -> Array:
        """x [N, H]; weights [N, k] (x.dtype), experts int [N, k] -> [N, H] in x.dtype."""
        k = experts.shape[1]
        flat = experts.reshape(-1)
        order = jnp.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
        token = order // k
        sizes = jnp.bincount(flat, length=self.gate_proj.shape[0]).astype(jnp.int32)
        xs = x[token]
        second = token >= x.shape[0] // 2  # the variant's half of a paired pass (low_rank)

        def grouped(lhs: Array, w: Any) -> Array:
            # A low-rank or paired weight (lpe_jax.model.low_rank) runs its own grouped product.
            if isinstance(w, jax.Array):
                return ragged_dot_f32(lhs, w, sizes).astype(x.dtype)
            return w.ragged_dot_f32(lhs, sizes, second).astype(x.dtype)

        gate = grouped(xs, self.gate_proj[...])
        up = grouped(xs, self.up_proj[...])
        y = grouped(jax.nn.silu(gate) * up, self.down_proj[...])
        y = y * weights.reshape(-1)[order][:, None]
        return jnp.zeros_like(x).at[token].add(y)

    def dense(self, x: Array, weights: Array, experts: Array) -> Array:
        """As `ragged`, computing every expert and weighting the unselected ones by zero."""
        n = x.shape[0]
        combine = jnp.zeros((n, self.gate_proj.shape[0]), x.dtype)
        combine = combine.at[jnp.arange(n)[:, None], experts].set(weights)
        gate = einsum_f32("nh,ehf->nef", x, self.gate_proj[...]).astype(x.dtype)
        up = einsum_f32("nh,ehf->nef", x, self.up_proj[...]).astype(x.dtype)
        y = einsum_f32("nef,efh->neh", jax.nn.silu(gate) * up, self.down_proj[...])
        return jnp.sum(y.astype(x.dtype) * combine[..., None], axis=1)


class SparseMoE(nnx.Module):
    """HF Qwen3MoeSparseMoeBlock / Qwen3_5MoeSparseMoeBlock (with a shared expert when
    cfg.shared_expert_intermediate_size > 0). Router weight `gate` [H, E]."""

    def __init__(self, cfg: MoEConfig, dtype: Any, rngs: nnx.Rngs):
        self.cfg = cfg
        self.gate = _param(rngs, (cfg.hidden_size, cfg.num_experts), dtype)
        self.experts = Experts(cfg, dtype, rngs)
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = SwiGLU(
                cfg.hidden_size, cfg.shared_expert_intermediate_size, dtype, rngs
            )
            self.shared_expert_gate = _param(rngs, (cfg.hidden_size, 1), dtype)

    def route(self, x: Array) -> tuple[Array, Array]:
        """x [N, H] -> (weights [N, k] in x.dtype, experts int [N, k]), best first."""
        probs = jax.nn.softmax((x @ self.gate[...]).astype(jnp.float32), axis=-1)
        top, experts = jax.lax.top_k(probs, self.cfg.top_k)
        if self.cfg.norm_topk_prob:
            top = top / jnp.sum(top, axis=-1, keepdims=True)
        return top.astype(x.dtype), experts

    def __call__(self, x: Array) -> Array:
        """x [..., H] -> [..., H] in x.dtype."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, experts = self.route(x)
        run = self.experts.ragged if self.cfg.dispatch == "ragged" else self.experts.dense
        y = run(x, weights, experts)
        if self.cfg.shared_expert_intermediate_size:
            y = y + jax.nn.sigmoid(x @ self.shared_expert_gate[...]) * self.shared_expert(x)
        return y.reshape(shape)


def _stack_transposed(*ws: np.ndarray) -> np.ndarray:
    return np.stack([w.T for w in ws])


def hf_weight_table(cfg: MoEConfig, prefix: str, names: Collection[str]) -> list[HFParam]:
    """HF names of one sparse MoE block under `prefix` (e.g. 'model.layers.0.mlp.') ->
    `SparseMoE` parameters.

    Experts come in one of two layouts, told apart by `names` (the checkpoint's tensor names):
    one tensor per expert, `experts.{e}.{gate,up,down}_proj.weight` (Hub checkpoints and what
    `save_pretrained` writes), or transformers 5's fused in-memory layout,
    `experts.gate_up_proj` [E, 2F, H] (gate rows first) and `experts.down_proj` [E, H, F].
    """
    e, h, f = cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size
    table = [transposed(("gate",), prefix + "gate.weight", (e, h))]
    ex = prefix + "experts."
    if ex + "gate_up_proj" in names:
        table += [
            HFParam(
                ("experts", "gate_proj"),
                (ex + "gate_up_proj",),
                ((e, 2 * f, h),),
                lambda w: w[:, :f].transpose(0, 2, 1),
            ),
            HFParam(
                ("experts", "up_proj"),
                (ex + "gate_up_proj",),
                ((e, 2 * f, h),),
                lambda w: w[:, f:].transpose(0, 2, 1),
            ),
            HFParam(
                ("experts", "down_proj"),
                (ex + "down_proj",),
                ((e, h, f),),
                lambda w: w.transpose(0, 2, 1),
            ),
        ]
    else:
        for name, shape in (("gate", (f, h)), ("up", (f, h)), ("down", (h, f))):
            table.append(
                HFParam(
                    ("experts", f"{name}_proj"),
                    tuple(f"{ex}{i}.{name}_proj.weight" for i in range(e)),
                    (shape,) * e,
                    _stack_transposed,
                )
            )
    if cfg.shared_expert_intermediate_size:
        s, sf = prefix + "shared_expert.", cfg.shared_expert_intermediate_size
        for name, shape in (("gate", (sf, h)), ("up", (sf, h)), ("down", (h, sf))):
            table.append(
                transposed(("shared_expert", f"{name}_proj"), f"{s}{name}_proj.weight", shape)
            )
        table.append(
            transposed(("shared_expert_gate",), prefix + "shared_expert_gate.weight", (1, h))
        )
    return table
