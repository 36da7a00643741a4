"""Sparse MoE blocks (lpe_jax.model.moe) against transformers' Qwen3MoeSparseMoeBlock and
Qwen3_5MoeSparseMoeBlock (float32, 'highest' matmul precision), both dispatches, both expert
layouts of the key map."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hybrid_fixtures import randomize, rel_err, state_dict_numpy

from lpe_jax.model.hf_keymap import assign_hf
from lpe_jax.model.moe import MoEConfig, SparseMoE, hf_weight_table, is_sparse_layer

pytestmark = pytest.mark.usefixtures("highest_matmul_precision")
_call = nnx.jit(lambda m, x: m(x))
SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
SMALL.update(num_key_value_heads=2, head_dim=16, moe_intermediate_size=16, num_experts=6)
SMALL.update(num_experts_per_tok=2)


def _hf_block(kind: str, **overrides):
    import transformers
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    if kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**{**SMALL, "intermediate_size": 40, **overrides})
        return cfg, randomize(Qwen3MoeSparseMoeBlock(cfg))
    cfg = transformers.Qwen3_5MoeTextConfig(
        **{**SMALL, "shared_expert_intermediate_size": 24, **overrides}
    )
    return cfg, randomize(Qwen3_5MoeSparseMoeBlock(cfg))


def _per_expert_layout(weights: dict, cfg: MoEConfig) -> dict:
    """transformers' fused expert tensors rewritten as the Hub's one-tensor-per-expert names."""
    out = {k: v for k, v in weights.items() if not k.startswith("experts.")}
    f = cfg.expert_intermediate_size
    for e in range(cfg.num_experts):
        out[f"experts.{e}.gate_proj.weight"] = weights["experts.gate_up_proj"][e, :f]
        out[f"experts.{e}.up_proj.weight"] = weights["experts.gate_up_proj"][e, f:]
        out[f"experts.{e}.down_proj.weight"] = weights["experts.down_proj"][e]
    return out


@pytest.mark.parametrize(
    "kind, overrides",
    [("qwen3_moe", {}), ("qwen3_moe", {"norm_topk_prob": True}), ("qwen3_5_moe", {})],
)
def test_matches_hf(kind, overrides):
    import torch

    hf_cfg, hf = _hf_block(kind, **overrides)
    x = np.random.default_rng(0).normal(size=(3, 5, hf_cfg.hidden_size)).astype(np.float32)
    with torch.no_grad():
        ref = hf(torch.from_numpy(x)).numpy()
    fused = state_dict_numpy(hf)
    assert "experts.gate_up_proj" in fused  # transformers 5's in-memory layout
    for dispatch, layout in (("ragged", "fused"), ("dense", "per_expert")):
        cfg = MoEConfig.from_hf(hf_cfg.to_dict(), dispatch=dispatch)
        assert cfg.norm_topk_prob == (kind == "qwen3_5_moe" or bool(overrides))
        assert bool(cfg.shared_expert_intermediate_size) == (kind == "qwen3_5_moe")
        weights = fused if layout == "fused" else _per_expert_layout(fused, cfg)
        ours = SparseMoE(cfg, jnp.float32, nnx.Rngs(0))
        assign_hf(ours, hf_weight_table(cfg, "", weights.keys()), weights)
        y = _call(ours, jnp.asarray(x))
        assert np.abs(ref).max() > 0.1
        assert rel_err(y, ref) <= 1e-5, (dispatch, rel_err(y, ref))


def test_key_map_and_layer_pattern():
    hf_cfg, hf = _hf_block("qwen3_moe")
    cfg = MoEConfig.from_hf(hf_cfg.to_dict())
    weights = _per_expert_layout(state_dict_numpy(hf), cfg)
    del weights["experts.3.up_proj.weight"]
    with pytest.raises(ValueError, match=r"missing experts\.3\.up_proj\.weight"):
        assign_hf(
            SparseMoE(cfg, jnp.float32, nnx.Rngs(0)), hf_weight_table(cfg, "", weights), weights
        )
    base = {"model_type": "qwen3_moe", "num_experts": 4}
    assert [is_sparse_layer({**base, "decoder_sparse_step": 2}, i) for i in range(4)] == [
        False,
        True,
        False,
        True,
    ]
    assert not is_sparse_layer({**base, "mlp_only_layers": [1]}, 1)
    assert is_sparse_layer({"model_type": "qwen3_5_moe_text"}, 0)
    with pytest.raises(ValueError, match="model_type"):
        MoEConfig.from_hf({"model_type": "qwen3"})


def test_bfloat16_hidden_256_runs():
    # f32 parity is tested above; here bf16 must run on CPU and both dispatches must agree (they
    # share the routing, so they differ only in rounding order).
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, 256)), jnp.bfloat16)
    ys = []
    for dispatch in ("ragged", "dense"):
        cfg = MoEConfig(
            256,
            num_experts=8,
            top_k=2,
            expert_intermediate_size=64,
            norm_topk_prob=True,
            shared_expert_intermediate_size=96,
            dispatch=dispatch,
        )
        ys.append(_call(SparseMoE(cfg, jnp.bfloat16, nnx.Rngs(0)), x))
    assert ys[0].dtype == ys[1].dtype == jnp.bfloat16
    assert bool(jnp.isfinite(ys[0].astype(jnp.float32)).all())
    assert rel_err(ys[0].astype(jnp.float32), ys[1].astype(jnp.float32)) <= 2e-2
