"""The pair's device mesh and its sharding rules: axes ('rows', 'tensor', 'experts').

- 'rows' splits the engine's slots (a data axis): every row's arrays live on one row group.
- 'tensor' splits attention heads and K/V heads, the dense MLP's hidden units, each expert's hidden
  units and the vocabulary (embedding, LM head, logits).
- 'experts' splits a MoE layer's experts.

Qwen3.5 (dense and MoE) follows the same rules: gated attention's q_proj (each head's query and
output gate, adjacent per head), K/V and o_proj by heads as Qwen3's; a Gated DeltaNet layer by
its key heads, each with the value heads it serves (`in_proj_qkv`, `conv1d` and the conv window
hold q|k|v grouped by key head, re-laid out once at load: `gated_deltanet.qkv_channel_order`),
and by value heads (`in_proj_z`, `in_proj_b/a`, `A_log`, `dt_bias`, `out_proj`, the delta
state); the shared expert's hidden units over 'tensor'; the router and the shared expert's gate
whole.

As in jax-ml/jax-llm-examples' qwen3, every array dimension has a *logical* axis (`PARAM_AXES`
by parameter name, `state_axes` by layer kind) and `ShardingRules` maps logical axes to mesh
axes; arrays get `NamedSharding`s from these and XLA partitions the program, inserting the
collectives. Nothing here communicates by hand: the sampler's cross-shard max (Gumbel-max) and
log-sum-exp are ordinary reductions over the vocabulary-sharded logits. A mesh (n, 1, 1) is the
row sharding of earlier versions: parameters replicated, rows split over n devices.

`check_mesh` validates a mesh shape against the device count and the models' dimensions before
anything is placed; every dimension a mesh axis splits must divide evenly (whole heads, whole
experts). The vocabulary need not divide: `pad_vocab` pads every parameter's vocabulary dimension
(embedding rows, LM head columns, their low-rank factors) with zeros to `padded_vocab`, the next
multiple of the tensor size, and the engine masks the padded logits to -inf (never sampled, adding
nothing to any log-sum-exp), so tokens and log-probs are those of the unpadded model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.tree_util import GetAttrKey

from lpe_jax.model.low_rank import LowRankWeight, buffer_key
from lpe_jax.model.qwen3 import Qwen3Config
from lpe_jax.model.qwen35 import Qwen35Config

ROWS, TENSOR, EXPERTS = "rows", "tensor", "experts"
AXES = (ROWS, TENSOR, EXPERTS)

Logical = tuple[str | None, ...]


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis -> mesh axis (None: replicated along that dimension)."""

    rows: str | None = ROWS
    vocab: str | None = TENSOR
    heads: str | None = TENSOR
    kv_heads: str | None = TENSOR
    ffw: str | None = TENSOR
    experts: str | None = EXPERTS
    expert_ffw: str | None = TENSOR
    shared_ffw: str | None = TENSOR  # Qwen3.5-MoE's shared expert
    lin_groups: str | None = TENSOR  # Gated DeltaNet q|k|v channels, grouped by key head
    lin_v_heads: str | None = TENSOR  # Gated DeltaNet value heads
    embed: str | None = None


RULES = ShardingRules()

# Logical axes of each parameter, keyed by the last names of its path (module attribute names;
# layer indices dropped). The longest matching suffix wins ('experts', 'gate_proj' before
# 'gate_proj'). Weights are stored [in, out].
PARAM_AXES: dict[tuple[str, ...], Logical] = {
    ("embed_tokens",): ("vocab", "embed"),
    ("lm_head",): ("embed", "vocab"),
    ("norm",): ("embed",),
    ("input_layernorm",): ("embed",),
    ("post_attention_layernorm",): ("embed",),
    ("self_attn", "q_proj"): ("embed", "heads"),
    ("self_attn", "k_proj"): ("embed", "kv_heads"),
    ("self_attn", "v_proj"): ("embed", "kv_heads"),
    ("self_attn", "o_proj"): ("heads", "embed"),
    ("self_attn", "q_bias"): ("heads",),
    ("self_attn", "k_bias"): ("kv_heads",),
    ("self_attn", "v_bias"): ("kv_heads",),
    ("self_attn", "o_bias"): ("embed",),
    ("self_attn", "q_norm"): (None,),  # over head_dim: every head shard needs all of it
    ("self_attn", "k_norm"): (None,),
    ("mlp", "gate_proj"): ("embed", "ffw"),
    ("mlp", "up_proj"): ("embed", "ffw"),
    ("mlp", "down_proj"): ("ffw", "embed"),
    ("mlp", "gate"): ("embed", None),  # the MoE router: every token scores every expert
    ("experts", "gate_proj"): ("experts", "embed", "expert_ffw"),
    ("experts", "up_proj"): ("experts", "embed", "expert_ffw"),
    ("experts", "down_proj"): ("experts", "expert_ffw", "embed"),
    # Qwen3.5-MoE's shared expert and its gate (self_attn above covers gated attention: q_proj's
    # columns are heads x (query | gate), so a split by heads keeps each head's pair together).
    ("shared_expert", "gate_proj"): ("embed", "shared_ffw"),
    ("shared_expert", "up_proj"): ("embed", "shared_ffw"),
    ("shared_expert", "down_proj"): ("shared_ffw", "embed"),
    ("shared_expert_gate",): ("embed", None),
    # Qwen3.5's Gated DeltaNet (q|k|v grouped by key head: gated_deltanet.qkv_channel_order).
    ("linear_attn", "in_proj_qkv"): ("embed", "lin_groups"),
    ("linear_attn", "conv1d"): ("lin_groups", None),
    ("linear_attn", "in_proj_z"): ("embed", "lin_v_heads"),
    ("linear_attn", "in_proj_b"): ("embed", "lin_v_heads"),
    ("linear_attn", "in_proj_a"): ("embed", "lin_v_heads"),
    ("linear_attn", "A_log"): ("lin_v_heads",),
    ("linear_attn", "dt_bias"): ("lin_v_heads",),
    ("linear_attn", "norm"): (None,),  # over head_v_dim, as q_norm
    ("linear_attn", "out_proj"): ("lin_v_heads", "embed"),
}

# A low-rank weight (lpe_jax.model.low_rank.LowRankWeight) keeps the named parameter's base and
# factors u [rows, r], vt [r, cols] (stacked experts: [E, rows, r], [E, r, cols]): u follows the
# weight's rows, vt its columns. A transposed base (a tied original's embedding [V, H] serving as
# the head [H, V]) is placed as the embedding is, so it is the original's placed array itself.
_LOW_RANK_LEAVES = ("base", "u", "vt")


def logical_to_spec(logical: Logical, rules: ShardingRules = RULES) -> PartitionSpec:
    """The PartitionSpec of an array whose dimensions have these logical axes."""
    spec = [None if a is None else getattr(rules, a) for a in logical]
    used = [a for a in spec if a is not None]
    if len(set(used)) != len(used):
        raise ValueError(f"logical axes {logical} map two dimensions to one mesh axis: {spec}.")
    return PartitionSpec(*spec)


def _names(path: Sequence[Any]) -> tuple[str, ...]:
    """A pytree path's string keys, without 'value' (an nnx.Variable's) and layer indices."""
    out = []
    for k in path:
        name = getattr(k, "key", getattr(k, "name", None))
        if isinstance(name, str) and name != "value":
            out.append(name)
    return tuple(out)


def param_axes(path: Sequence[Any], ndim: int) -> Logical | None:
    """Logical axes of the parameter leaf at `path` (a pytree key path of a model's nnx.State),
    or None when no rule names it. Low-rank factors follow their weight (see _LOW_RANK_LEAVES)."""
    names = _names(path)
    part = None
    if names and names[-1] in _LOW_RANK_LEAVES:
        part, names = names[-1], names[:-1]
    for n in range(len(names), 0, -1):
        axes = PARAM_AXES.get(names[-n:])
        if axes is not None:
            break
    else:
        return None
    if part == "u":
        axes = (*axes[:-1], None)
    elif part == "vt":
        axes = (*axes[:-2], None, axes[-1])
    return axes if len(axes) == ndim else None


def _is_low_rank(x: Any) -> bool:
    return isinstance(x, LowRankWeight)


def param_logical(params: Any, split: bool) -> Any:
    """Logical axes of every array of a model's parameter state (same tree; a `LowRankWeight`
    gets one of the same kind holding its arrays' axes, its base's reversed when transposed).
    A leaf no rule names: replicated when not `split`, else ValueError naming it and the fix."""

    def one(path: Sequence[Any], x: Any) -> Any:
        axes = param_axes(path, len(x.shape))
        if axes is None:
            if split:
                raise ValueError(
                    f"no sharding rule for parameter {'.'.join(_names(path))} {x.shape}; "
                    "this model family is not placed by rules yet: use a rows-only mesh "
                    "(--mesh=N,1,1), or add its parameters to sharding.PARAM_AXES."
                )
            axes = (None,) * len(x.shape)
        if not _is_low_rank(x):
            return axes

        def factor(a: Any, part: str) -> Logical | None:
            return None if a is None else param_axes((*path, GetAttrKey(part)), a.ndim)

        base = axes[::-1] if x.transpose else axes
        return x.replace(base=base, u=factor(x.u, "u"), vt=factor(x.vt, "vt"))

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_low_rank)


def padded_vocab(vocab: int, tensor: int) -> int:
    """The vocabulary size placed on a mesh with `tensor` vocabulary shards: the next multiple of
    `tensor` (equal shards), `vocab` itself where it divides."""
    return -(-vocab // tensor) * tensor


def pad_vocab(params: Any, vocab: int, tensor: int) -> Any:
    """`params` (a model's nnx.State, or its pure tree) with every vocabulary dimension
    (`PARAM_AXES`' 'vocab' by `param_logical`: embedding rows, LM head columns, a tied head's
    transposed base, low-rank factors of either) of size `vocab` zero-padded to
    `padded_vocab(vocab, tensor)`; a dimension already padded, and every other leaf, is returned
    as is. numpy leaves stay numpy (host), jax arrays stay jax arrays. The padded logits are 0
    here, meaningless: the engine masks them to -inf."""
    size = padded_vocab(vocab, tensor)
    if size == vocab:
        return params

    def one(axes: Logical, x: Any) -> Any:
        widths = [
            (0, size - n if a == "vocab" and n == vocab else 0)
            for a, n in zip(axes, np.shape(x), strict=True)
        ]
        if not any(w for _, w in widths):
            return x
        return np.pad(x, widths) if isinstance(x, np.ndarray) else jax.numpy.pad(x, widths)

    logical = param_logical(params, split=False)
    return jax.tree.map(one, logical, params, is_leaf=lambda x: isinstance(x, tuple))


def _splits(mesh: Mesh) -> bool:
    """Whether the mesh splits any parameter (a 'tensor' or 'experts' axis longer than 1)."""
    return mesh.shape.get(TENSOR, 1) * mesh.shape.get(EXPERTS, 1) > 1


def param_shardings(mesh: Mesh, params: Any, rules: ShardingRules = RULES) -> Any:
    """NamedShardings for a model's parameter state (same tree), from `PARAM_AXES`.

    On a mesh that splits parameters, a leaf no rule names raises ValueError (it would be
    replicated on every device unnoticed); on a rows-only mesh everything is replicated.
    """
    return jax.tree.map(
        lambda axes: NamedSharding(mesh, logical_to_spec(axes, rules)),
        param_logical(params, _splits(mesh)),
        is_leaf=lambda x: isinstance(x, tuple),
    )


def param_bytes_on_device(
    params: Any,
    mesh_shape: Sequence[int],
    keep: Any = None,
    rules: ShardingRules = RULES,
) -> int:
    """Bytes of the parameter state's arrays held on each device of a (rows, tensor, experts)
    mesh when placed by `param_shardings` (every dimension a mesh axis splits must divide; see
    `check_mesh`). From shapes alone: no devices needed. keep(array) -> bool: count only these
    (default all)."""
    sizes = dict(zip(AXES, mesh_shape, strict=True))
    logical = param_logical(params, sizes[TENSOR] * sizes[EXPERTS] > 1)
    is_axes = lambda x: isinstance(x, tuple)  # noqa: E731
    total = 0
    for axes, x in zip(
        jax.tree.leaves(logical, is_leaf=is_axes), jax.tree.leaves(params), strict=True
    ):
        if keep is not None and not keep(x):
            continue
        spec = logical_to_spec(axes, rules)
        split = (1 if a is None else sizes[a] for a in spec)
        # ceil: a vocabulary dimension is padded to the tensor size (pad_vocab)
        n = math.prod(-(-d // k) for d, k in zip(x.shape, split, strict=True))
        total += n * x.dtype.itemsize
    return total


def place_params(
    mesh: Mesh,
    params: Any,
    vocab: int,
    like: tuple[Any, Any] | None = None,
    rules: ShardingRules = RULES,
) -> Any:
    """`params` (a model's nnx.State or pure tree; leaves in host memory or on devices) placed on
    `mesh`: vocabulary dimensions padded (`pad_vocab`) and every leaf put into its rule sharding
    (`param_shardings`). From host memory, jax.device_put copies each device only its own shard,
    so on a mesh that splits the weights no device ever holds a whole one.

    like: (state, placed state) of a model whose arrays `params` may share (a low-rank variant's
    bases, shared tensors: the same device buffers): those become the placed arrays themselves,
    so the mesh holds each shared weight once (the same rules give them the same sharding)."""
    if like is not None:
        placed = {}
        for a, b in zip(jax.tree.leaves(like[0]), jax.tree.leaves(like[1]), strict=True):
            if (key := buffer_key(a)) is not None:
                placed[key] = b
        params = jax.tree.map(lambda a: placed.get(buffer_key(a) or (), a), params)
    params = pad_vocab(params, vocab, mesh.shape[TENSOR])
    return jax.device_put(params, param_shardings(mesh, params, rules))


def place_param(
    mesh: Mesh,
    names: Sequence[str | int],
    host: np.ndarray,
    vocab: int,
    rules: ShardingRules = RULES,
) -> jax.Array:
    """One parameter from host memory into its sharding on `mesh` (`place_params`); `names` is
    its attribute path in the model, e.g. ('layers', 0, 'self_attn', 'q_proj')."""
    tree: Any = host
    for n in reversed(names):
        tree = {n: tree}
    placed = place_params(mesh, tree, vocab, rules=rules)
    for n in names:
        placed = placed[n]
    return placed


def state_axes(cfg: Any, ndim: int, lead: str | None, field: str | None = None) -> Logical:
    """Logical axes of one leaf of a layer's engine state (prompt or own state) whose leading
    dimension is rows (`lead`='rows': slots) or prompt-table entries (None); `field` is the
    leaf's name in its state (a `GatedDeltaNetState`'s 'conv' or 'recurrent'), None for K/V.

    Attention K/V [n, kv, positions, hd] (Qwen3's, Qwen3.5's gated attention): K/V heads on
    'kv_heads'. Qwen3.5's Gated DeltaNet: the conv window [n, conv_dim, K-1] by its channels, split
    as `conv1d`'s rows ('lin_groups'), the delta state [n, nv, dk, dv] by value heads.
    """
    if isinstance(cfg, Qwen35Config) and field == "conv" and ndim == 3:
        return (lead, "lin_groups", None)
    if isinstance(cfg, Qwen35Config) and field == "recurrent" and ndim == 4:
        return (lead, "lin_v_heads", None, None)
    if isinstance(cfg, Qwen3Config | Qwen35Config) and field is None and ndim == 4:
        return (lead, "kv_heads", None, None)
    return (lead,) + (None,) * (ndim - 1)


def state_shardings(
    mesh: Mesh, cfg: Any, states: Any, lead: str | None, rules: ShardingRules = RULES
) -> Any:
    """NamedShardings for a tree of layer states of `cfg`'s model (see `state_axes`)."""

    def one(path: Sequence[Any], x: Any) -> NamedSharding:
        names = _names(path)
        field = names[-1] if names and names[-1] in ("conv", "recurrent") else None
        return NamedSharding(mesh, logical_to_spec(state_axes(cfg, np.ndim(x), lead, field), rules))

    return jax.tree_util.tree_map_with_path(one, states)


def logits_sharding(mesh: Mesh, lead: str | None = ROWS) -> NamedSharding:
    """[n, V] float32 logits: rows (or prompt entries, lead=None) by the vocabulary shards."""
    return NamedSharding(mesh, logical_to_spec((lead, "vocab")))


# --- building and checking a mesh ---


def _dims(cfg: Any) -> dict[str, tuple[int, str]]:
    """The sizes each logical axis splits in `cfg`'s model that must divide: logical -> (size,
    config field). Not the vocabulary: `pad_vocab` pads it to the next multiple."""
    if isinstance(cfg, Qwen35Config):
        return _hybrid_dims(cfg)
    if not isinstance(cfg, Qwen3Config):
        return {}
    dims = {
        "heads": (cfg.num_heads, "num_heads"),
        "kv_heads": (cfg.num_kv_heads, "num_kv_heads"),
    }
    if not all(cfg.is_sparse(i) for i in range(cfg.num_layers)):
        dims["ffw"] = (cfg.intermediate_size, "intermediate_size")
    if cfg.num_experts:
        dims["experts"] = (cfg.num_experts, "num_experts")
        dims["expert_ffw"] = (cfg.moe_intermediate_size, "moe_intermediate_size")
    return dims


def _hybrid_dims(cfg: Qwen35Config) -> dict[str, tuple[int, str]]:
    """`_dims` of a Qwen3.5 model, named by its HF config keys; only the layer kinds it has."""
    dims: dict[str, tuple[int, str]] = {}
    if cfg.count("full_attention"):
        dims["heads"] = (cfg.attention.num_heads, "num_attention_heads")
        dims["kv_heads"] = (cfg.attention.num_kv_heads, "num_key_value_heads")
    if cfg.count("linear_attention"):
        dims["lin_groups"] = (cfg.linear.num_k_heads, "linear_num_key_heads")
        dims["lin_v_heads"] = (cfg.linear.num_v_heads, "linear_num_value_heads")
    if cfg.num_layers and cfg.moe is None:
        dims["ffw"] = (cfg.intermediate_size, "intermediate_size")
    elif cfg.num_layers:
        dims["experts"] = (cfg.moe.num_experts, "num_experts")
        dims["expert_ffw"] = (cfg.moe.expert_intermediate_size, "moe_intermediate_size")
        if cfg.moe.shared_expert_intermediate_size:
            size = cfg.moe.shared_expert_intermediate_size
            dims["shared_ffw"] = (size, "shared_expert_intermediate_size")
    return dims


def parse_mesh_shape(text: str) -> tuple[int, int, int]:
    """'2,4,1' -> (2, 4, 1): rows, tensor, experts; ValueError naming the expected form."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 3 or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise ValueError(
            f"mesh {text!r} must be three positive integers rows,tensor,experts (e.g. 8,1,1 or "
            "2,4,1) whose product is the device count."
        )
    return int(parts[0]), int(parts[1]), int(parts[2])


def check_mesh(
    shape: Sequence[int], num_devices: int, cfgs: Sequence[Any] = (), whole_pair: bool = True
) -> None:
    """Raise ValueError unless `shape` (rows, tensor, experts) fits `num_devices` and splits every
    dimension of the models `cfgs` evenly (heads, K/V heads, MLP hidden units, experts; not the
    vocabulary, which is padded: `pad_vocab`); the message names each dimension that does not divide
    and the mesh sizes that would. whole_pair=False: `cfgs` are part of the pair (one model at
    load), so an experts axis only the other model splits is not an error."""
    shape = tuple(shape)
    if len(shape) != 3 or any(isinstance(s, bool) or not isinstance(s, int) for s in shape):
        raise ValueError(f"mesh shape must be 3 ints (rows, tensor, experts); got {shape!r}.")
    if min(shape) < 1:
        raise ValueError(f"mesh sizes must be >= 1; got {shape}.")
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh {shape} holds {math.prod(shape)} devices but {num_devices} are in use; "
            f"choose sizes whose product is {num_devices} (e.g. {(num_devices, 1, 1)})."
        )
    sizes = dict(zip(AXES, shape, strict=True))
    problems, by_axis = [], {}
    for cfg in cfgs:
        for logical, (size, field) in _dims(cfg).items():
            axis = getattr(RULES, logical)
            by_axis.setdefault(axis, []).append(size)
            if size % sizes[axis]:
                problems.append(f"{field}={size} does not divide over {axis}={sizes[axis]}")
        if not _dims(cfg) and sizes[TENSOR] * sizes[EXPERTS] > 1:
            problems.append(f"{type(cfg).__name__} has no tensor/expert sharding rules")
    if whole_pair and cfgs and sizes[EXPERTS] > 1 and EXPERTS not in by_axis:
        problems.append(f"experts={sizes[EXPERTS]} splits nothing (no model has experts)")
    if problems:
        fixes = []
        for axis, dims in by_axis.items():
            g = math.gcd(*dims)
            ok = [d for d in range(1, g + 1) if g % d == 0 and num_devices % d == 0]
            fixes.append(f"{axis} in {ok}")
        raise ValueError(
            f"mesh {shape} (rows, tensor, experts) does not fit the models: "
            + "; ".join(dict.fromkeys(problems))
            + ". Choose "
            + (", ".join(fixes) if fixes else "a rows-only mesh")
            + f" with rows * tensor * experts = {num_devices}."
        )


def pair_mesh(
    shape: Sequence[int] | None = None,
    devices: Sequence[jax.Device] | None = None,
    cfgs: Sequence[Any] = (),
) -> Mesh:
    """A mesh with axes ('rows', 'tensor', 'experts') over `devices` (default: all local
    devices), checked by `check_mesh` against the models `cfgs`. shape None: (devices, 1, 1),
    rows split over every device and parameters replicated."""
    devs = list(jax.local_devices() if devices is None else devices)
    if not devs:
        raise ValueError("a mesh needs at least one device; got an empty list.")
    shape = (len(devs), 1, 1) if shape is None else tuple(shape)
    check_mesh(shape, len(devs), cfgs)
    return Mesh(np.array(devs).reshape(shape), AXES)


def row_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """`pair_mesh` with every device on 'rows' (parameters replicated)."""
    return pair_mesh(None, devices)


def rows_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over 'rows', the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(ROWS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def row_groups(mesh: Mesh) -> int:
    """How many ways the mesh splits rows (its 'rows' size)."""
    return int(mesh.shape.get(ROWS, mesh.size))


def round_to_devices(rows: int, num_devices: int) -> int:
    """Largest multiple of num_devices that is <= rows, and at least num_devices."""
    return max(num_devices, rows // num_devices * num_devices)
