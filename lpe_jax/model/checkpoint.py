"""Hugging Face checkpoints <-> lpe_jax model modules, without torch.

`load_model` reads config.json's `model_type` (or, without one, `architectures`) and dispatches
through `ARCHITECTURES`: 'qwen3' (dense) and 'qwen3_moe' (Qwen3-MoE: the same `Qwen3` module with
sparse MoE MLPs) load here; any other model type is refused with the list of supported ones.

The Qwen3 loader reads an HF directory (config.json + model.safetensors, or shards listed in
model.safetensors.index.json; tensors in bf16, f16 or f32), maps names through one explicit table
with shape checks, converts on the host with NumPy (HF Linear weights are [out, in]; ours are
[in, out]) and puts each tensor on the device once. The module is built abstractly first
(`nnx.eval_shape`), so a 4B model never materializes a random copy.

Qwen3-MoE expert tensors are stored one per expert (`mlp.experts.{e}.gate_proj.weight`, the Hub's
layout and what transformers' `save_pretrained` writes) and stacked [E, ...] on load.

`save_model` writes the inverse: a directory transformers' `Qwen3ForCausalLM` (or
`Qwen3MoeForCausalLM`) loads.

Optional converted-params cache (`cache_dir=`): an orbax checkpoint keyed by the sha256 of
config.json, the index file and the *full content* of every safetensors file. Header+size hashes
are not enough here: an original model and its abliterated variant have identical headers and
sizes, which is exactly the pair this project loads. Hashing 8 GB takes seconds, so each file's
digest is memoized in the cache dir under (absolute path, size, mtime_ns); a file rewritten in place
gets a new mtime and is hashed again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from lpe_jax.model.moe import MoEConfig
from lpe_jax.model.qwen3 import Qwen3, Qwen3Config
from lpe_jax.model.qwen35 import Qwen35, Qwen35Config

QWEN3_MODEL_TYPES = ("qwen3", "qwen3_moe")  # both built by `Qwen3` (see Qwen3Config)
# HF class names, read when config.json has no model_type.
_CLASS_MODEL_TYPES = {"Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3_moe"}
# Loaded by lpe_jax.model.qwen35_checkpoint (the text tower of dense and MoE Qwen3.5).
QWEN35_MODEL_TYPES = ("qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text")
_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# safetensors dtype name -> NumPy dtype (also read by lpe_jax.abliteration.orthogonalize).
ST_TO_NP = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
}
_NP_TO_ST = {v: k for k, v in ST_TO_NP.items()}
# Buffers some older exports carry; they hold nothing our model needs (rotary is recomputed).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_HF_DEFAULT_HEAD_DIM = 128  # transformers.Qwen3Config's default when config.json omits it
_CACHE_FORMAT = "lpe_jax-qwen3-v1"  # bump when the converted layout changes
_QWEN35_LAYOUT = "qkv-grouped"  # Qwen3.5 cache entries: gated_deltanet's q|k|v channel order
TIED_HEAD_READINGS = ("embedding", "lm_head")  # see load_model(tied_head=...)


# ----------------------------------------------------------------------------------------------
# dtype and config


def _np_dtype(dtype: Any) -> np.dtype:
    """'float32' | 'bfloat16' (or the matching numpy/jnp dtype) -> numpy dtype."""
    key = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if key not in _DTYPES:
        raise ValueError(
            f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} (e.g. dtype='bfloat16')."
        )
    return _DTYPES[key]


def _rope_theta(hf: dict[str, Any]) -> float:
    """rope_theta from transformers 4 (`rope_theta`) or 5 (`rope_parameters`) configs."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling")
    if params:
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise ValueError(
                f"rope_type {rope_type!r} is not supported (only 'default' rotary embeddings); "
                "use a checkpoint without rope scaling."
            )
        if "rope_theta" in params:
            return float(params["rope_theta"])
    if "rope_theta" in hf:
        return float(hf["rope_theta"])
    raise ValueError(
        "config.json gives no rope_theta (neither 'rope_theta' nor 'rope_parameters.rope_theta'); "
        "add it to the config."
    )


def model_type_of(hf: dict[str, Any]) -> str:
    """The architecture of a parsed config.json: its `model_type`, or without one, the
    model type of its `architectures` class. ValueError when neither names a supported one, or
    when the two disagree."""
    model_type = hf.get("model_type")
    classes = hf.get("architectures") or []
    implied = {_CLASS_MODEL_TYPES[c] for c in classes if c in _CLASS_MODEL_TYPES}
    if model_type is None and len(implied) == 1:
        model_type = implied.pop()
    elif model_type in _CLASS_MODEL_TYPES.values() and implied - {model_type}:
        raise ValueError(
            f"config.json says model_type {model_type!r} but architectures {classes}; the config "
            "is inconsistent: fix one of them."
        )
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"model_type {model_type!r} is not supported (architectures {classes}); supported "
            f"model types: {sorted(ARCHITECTURES)}. Point load_model at a checkpoint of one."
        )
    return model_type


def model_config(hf: dict[str, Any]) -> Qwen3Config | Qwen35Config:
    """The static config of a parsed config.json, for any supported model type: a `Qwen3Config`
    (Qwen3, Qwen3-MoE) or a `Qwen35Config` (Qwen3.5 dense or MoE, text or multimodal). Both
    have `hidden_size`, `num_layers` and `vocab_size`."""
    if model_type_of(hf) in QWEN35_MODEL_TYPES:
        return Qwen35Config.from_hf(hf)
    return config_from_hf(hf)


def config_from_hf(hf: dict[str, Any]) -> Qwen3Config:
    """Qwen3Config from a parsed HF config.json of a Qwen3 or Qwen3-MoE model. Raises ValueError
    on other model types and unsupported settings."""
    model_type = model_type_of(hf)
    if model_type not in QWEN3_MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} is not a Qwen3 or Qwen3-MoE model ({QWEN3_MODEL_TYPES}); "
            "load it with load_model, which dispatches on the model type."
        )
    if hf.get("use_sliding_window"):
        raise ValueError(
            "use_sliding_window=true is not supported; this Qwen3 uses full attention everywhere."
        )
    missing = [
        k
        for k in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
        )
        if k not in hf
    ]
    if missing:
        raise ValueError(f"config.json lacks {missing}; a Qwen3 config needs them.")
    heads = int(hf["num_attention_heads"])
    # head_dim is never derived from hidden/heads when given (Qwen3-4B: 128, hidden/heads = 80).
    # When the key is absent we apply transformers' Qwen3Config default, which is 128, not
    # hidden/heads: that is what Qwen3ForCausalLM builds, and a checkpoint that disagrees fails
    # the per-tensor shape check below with both shapes named.
    head_dim = hf.get("head_dim") or _HF_DEFAULT_HEAD_DIM
    return Qwen3Config(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        intermediate_size=int(hf["intermediate_size"]),
        rope_theta=_rope_theta(hf),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        # transformers' Qwen3Config default is untied when the key is absent.
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 40960)),
        **(_moe_fields(hf) if model_type == "qwen3_moe" else {}),
    )


def _moe_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """Qwen3Config's MoE fields from a qwen3_moe config.json (ValueError when incomplete)."""
    moe = MoEConfig.from_hf({**hf, "model_type": "qwen3_moe"})  # checks keys, act, top-k
    only = hf.get("mlp_only_layers") or []
    if not all(isinstance(i, int) for i in only):
        raise ValueError(f"mlp_only_layers must list layer indices, got {only!r}.")
    return dict(
        num_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        moe_intermediate_size=moe.expert_intermediate_size,
        norm_topk_prob=moe.norm_topk_prob,
        decoder_sparse_step=int(hf.get("decoder_sparse_step", 1)),
        mlp_only_layers=tuple(sorted(only)),
    )


def config_to_hf(cfg: Qwen3Config, dtype: str) -> dict[str, Any]:
    """HF config.json dict for `cfg`, readable by transformers 4.5x and 5.x."""
    moe = {}
    if cfg.num_experts:
        moe = {
            "num_experts": cfg.num_experts,
            "num_experts_per_tok": cfg.num_experts_per_tok,
            "moe_intermediate_size": cfg.moe_intermediate_size,
            "norm_topk_prob": cfg.norm_topk_prob,
            "decoder_sparse_step": cfg.decoder_sparse_step,
            "mlp_only_layers": list(cfg.mlp_only_layers),
            "output_router_logits": False,
        }
    return {
        "architectures": ["Qwen3MoeForCausalLM" if cfg.num_experts else "Qwen3ForCausalLM"],
        "model_type": cfg.model_type,
        **moe,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 4 key
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},  # 5
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.num_layers,
        "layer_types": ["full_attention"] * cfg.num_layers,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": None,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


# ----------------------------------------------------------------------------------------------
# name table


_Entry = tuple[tuple[str | int, ...], tuple[int, ...], bool]


def weight_table(cfg: Qwen3Config) -> dict[str, _Entry]:
    """HF tensor name -> (attribute path in `Qwen3`, HF shape, transpose?).

    Transposed entries are Linear weights: HF [out, in], ours [in, out]. lm_head appears only
    when embeddings are untied. An expert's tensor has a path ending in its expert index: it is
    that slice of the stacked parameter (`split_expert`).
    """
    h, hd, v, f = cfg.hidden_size, cfg.head_dim, cfg.vocab_size, cfg.intermediate_size
    qd, kvd = cfg.num_heads * hd, cfg.num_kv_heads * hd
    table: dict[str, _Entry] = {
        "model.embed_tokens.weight": (("embed_tokens",), (v, h), False),
        "model.norm.weight": (("norm",), (h,), False),
    }
    if not cfg.tie_word_embeddings:
        table["lm_head.weight"] = (("lm_head",), (v, h), True)
    for i in range(cfg.num_layers):
        pre, at = f"model.layers.{i}.", ("layers", i, "self_attn")
        lay = ("layers", i)
        table[pre + "input_layernorm.weight"] = ((*lay, "input_layernorm"), (h,), False)
        table[pre + "post_attention_layernorm.weight"] = (
            (*lay, "post_attention_layernorm"),
            (h,),
            False,
        )
        for name, shape in (("q", (qd, h)), ("k", (kvd, h)), ("v", (kvd, h)), ("o", (h, qd))):
            table[pre + f"self_attn.{name}_proj.weight"] = ((*at, f"{name}_proj"), shape, True)
            if cfg.attention_bias:
                table[pre + f"self_attn.{name}_proj.bias"] = (
                    (*at, f"{name}_bias"),
                    shape[:1],
                    False,
                )
        table[pre + "self_attn.q_norm.weight"] = ((*at, "q_norm"), (hd,), False)
        table[pre + "self_attn.k_norm.weight"] = ((*at, "k_norm"), (hd,), False)
        if cfg.is_sparse(i):
            table.update(_sparse_mlp_table(cfg, pre + "mlp.", (*lay, "mlp")))
            continue
        for name, shape in (("gate", (f, h)), ("up", (f, h)), ("down", (h, f))):
            table[pre + f"mlp.{name}_proj.weight"] = ((*lay, "mlp", f"{name}_proj"), shape, True)
    return table


def _sparse_mlp_table(cfg: Qwen3Config, pre: str, at: tuple[str | int, ...]) -> dict[str, _Entry]:
    """A Qwen3-MoE sparse MLP: router `gate` [E, H] and one tensor per expert and projection."""
    h, f, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    table: dict[str, _Entry] = {pre + "gate.weight": ((*at, "gate"), (e, h), True)}
    for x in range(e):
        for name, shape in (("gate", (f, h)), ("up", (f, h)), ("down", (h, f))):
            path = (*at, "experts", f"{name}_proj", x)
            table[f"{pre}experts.{x}.{name}_proj.weight"] = (path, shape, True)
    return table


def split_expert(path: tuple[str | int, ...]) -> tuple[tuple[str | int, ...], int | None]:
    """(the parameter's path, the expert index or None) of a `weight_table` path."""
    if isinstance(path[-1], int):
        return path[:-1], path[-1]
    return path, None


def _variable(model: Qwen3, path: tuple[str | int, ...]) -> nnx.Variable:
    obj: Any = model
    for p in path:
        obj = obj[p] if isinstance(p, int) else getattr(obj, p)
    return obj


# ----------------------------------------------------------------------------------------------
# safetensors, read and written with the raw format: 8-byte little-endian header length, JSON
# header {name: {dtype, shape, data_offsets}}, then the data. No torch needed.


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header without __metadata__, byte offset where tensor data starts)."""
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes).")
        (n,) = struct.unpack("<Q", raw)
        if n > os.path.getsize(path):
            raise ValueError(f"{path} is not a safetensors file (header length {n} too large).")
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def _read_tensor(mm: np.memmap, info: dict[str, Any], start: int) -> np.ndarray:
    """A read-only view of one tensor in its stored dtype (checked against ST_TO_NP first)."""
    lo, hi = info["data_offsets"]
    return mm[start + lo : start + hi].view(ST_TO_NP[info["dtype"]]).reshape(info["shape"])


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, arr in tensors.items():
        header[name] = {
            "dtype": _NP_TO_ST[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data section 8-byte aligned, as the spec recommends
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for arr in tensors.values():
            fh.write(np.ascontiguousarray(arr).tobytes())


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of an HF directory, after checking they exist."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not weight_map:
            raise ValueError(f"{index} has no 'weight_map'; re-save the checkpoint.")
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(
                f"{index.name} lists shard(s) {missing} that are missing from {path}; "
                "download the complete checkpoint."
            )
        return files
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    hint = f" (found {found}: re-save with safe_serialization=True)" if found else ""
    raise FileNotFoundError(
        f"no weights in {path}: expected model.safetensors or model.safetensors.index.json{hint}."
    )


def read_headers(files: list[Path]) -> dict[str, tuple[Path, int, dict[str, Any]]]:
    """tensor name -> (file, data start, header entry), over all shards."""
    out: dict[str, tuple[Path, int, dict[str, Any]]] = {}
    for file in files:
        header, start = _read_header(file)
        for name, info in header.items():
            if name in out:
                raise ValueError(f"tensor {name} appears in both {out[name][0]} and {file}.")
            out[name] = (file, start, info)
    return out


# ----------------------------------------------------------------------------------------------
# loading and saving


def read_config(path: Path) -> dict[str, Any]:
    """The HF ``config.json`` of checkpoint directory ``path`` as a dict (clear error if absent)."""
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist.")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(
            f"{path} has no config.json; pass an HF model directory (config.json + safetensors)."
        )
    return json.loads(cfg_file.read_text())


def _abstract_model(cfg: Qwen3Config, dtype: np.dtype) -> Qwen3:
    """A Qwen3 whose params are ShapeDtypeStructs: no memory, no random init."""
    return nnx.eval_shape(lambda: Qwen3(cfg, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0)))


def check_names(cfg: Qwen3Config, names: set[str]) -> None:
    """Every tensor the config needs is present, and nothing else is (before reading any data)."""
    table = weight_table(cfg)
    ignorable = {n for n in names if n.endswith(_IGNORED_SUFFIXES)}
    if cfg.tie_word_embeddings:
        ignorable.add("lm_head.weight")  # some exports keep a copy of the tied embedding
    unexpected = sorted(names - table.keys() - ignorable)
    fused = [n for n in unexpected if n.endswith("mlp.experts.gate_up_proj")]
    if fused:
        raise ValueError(
            f"checkpoint stores fused expert tensors (e.g. {fused[0]}), transformers' in-memory "
            "layout; re-save it with save_pretrained, which writes one tensor per expert "
            "(mlp.experts.{e}.gate_proj.weight), the layout of Hub checkpoints."
        )
    if unexpected:
        # An error, not a warning: weights we would drop (e.g. biases while attention_bias is
        # false, extra layers) mean config.json does not describe these weights, and ignoring
        # them would silently give a different model.
        raise ValueError(
            f"checkpoint has {len(unexpected)} tensor(s) this Qwen3 config does not use, e.g. "
            f"{unexpected[:5]}; fix config.json (attention_bias, num_hidden_layers, ...) to match."
        )
    missing = [n for n in table if n not in names]
    if missing:
        raise ValueError(
            f"checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:5]}; the weights are "
            "incomplete or config.json describes a different model."
        )


def _convert(
    model: Qwen3, cfg: Qwen3Config, files: list[Path], dtype: np.dtype, mesh: Any = None
) -> None:
    """Fill the abstract `model` in place from the safetensors `files`: each parameter is put on
    the device once (see `_host_tensors`); with `mesh`, straight into its sharding there
    (`sharding.place_param`: each device receives only its shard); mesh=False: kept in host
    memory (numpy)."""
    from lpe_jax.decoding import sharding  # the model package does not import decoding at load

    for path, host in _host_tensors(model, cfg, files, dtype):
        if mesh is False:
            value = host
        elif mesh is None:
            value = jax.device_put(host)
        else:
            value = sharding.place_param(mesh, path, host, cfg.vocab_size)
        _variable(model, path).set_value(value)


def qwen3_tensors(
    path: str | os.PathLike, dtype: str = "float32", *, tied_head: str | None = None
) -> tuple[Qwen3Config, Iterator[tuple[tuple[str | int, ...], np.ndarray]]]:
    """(config, parameters one at a time) of a Qwen3 or Qwen3-MoE checkpoint, without building
    the model: each item is (the `Qwen3` attribute path, the host array in `dtype` and our
    layout), read from the memory-mapped safetensors when the iterator reaches it (stacked expert
    weights once all their experts are read). Names, shapes and dtypes are checked before the
    first item; `tied_head` as for `load_model`. For loaders that keep less than the whole
    model (`lpe_jax.model.low_rank.load_low_rank_variant`)."""
    path = Path(path)
    np_dtype = _np_dtype(dtype)
    hf = read_config(path)
    if ARCHITECTURES.get(model_type_of(hf)) is not _load_qwen3:
        raise ValueError(
            f"{path} is a {model_type_of(hf)} checkpoint; qwen3_tensors reads qwen3 and "
            "qwen3_moe only."
        )
    files = weight_files(path)
    cfg = _head_reading(config_from_hf(hf), files, tied_head, path)
    return cfg, _host_tensors(_abstract_model(cfg, np_dtype), cfg, files, np_dtype)


def _host_tensors(
    model: Qwen3, cfg: Qwen3Config, files: list[Path], dtype: np.dtype
) -> Iterator[tuple[tuple[str | int, ...], np.ndarray]]:
    """(attribute path, contiguous host array) of every parameter of the abstract `model`.

    All names, shapes and dtypes are checked from the headers before any data is read (the checks
    run at the call, not at the first item); then each tensor is cast and transposed on the host.
    """
    table = weight_table(cfg)
    headers = read_headers(files)
    check_names(cfg, set(headers))
    for name, (_, shape, _) in table.items():
        info = headers[name][2]
        if tuple(info["shape"]) != shape:
            raise ValueError(
                f"tensor {name} has shape {tuple(info['shape'])} but config.json implies {shape}; "
                "the config and weights disagree (wrong config.json or wrong shard?)."
            )
        if info["dtype"] not in ST_TO_NP:
            raise ValueError(
                f"tensor {name} has dtype {info['dtype']}; supported: {sorted(ST_TO_NP)}. "
                "Convert the checkpoint to bf16, f16 or f32."
            )
        lo, hi = info["data_offsets"]
        if hi - lo != np.prod(shape, dtype=np.int64) * ST_TO_NP[info["dtype"]].itemsize:
            raise ValueError(
                f"tensor {name} spans {hi - lo} bytes, not what shape {shape} and dtype "
                f"{info['dtype']} need; {headers[name][0].name} is corrupt: download it again."
            )
    return _read_tensors(model, table, headers, files, dtype)


def _read_tensors(
    model: Qwen3,
    table: dict[str, _Entry],
    headers: dict[str, tuple[Path, int, dict[str, Any]]],
    files: list[Path],
    dtype: np.dtype,
) -> Iterator[tuple[tuple[str | int, ...], np.ndarray]]:
    maps = {f: np.memmap(f, dtype=np.uint8, mode="r") for f in files}
    stacks: dict[tuple[str | int, ...], np.ndarray] = {}  # expert-stacked params, filled on host
    left: dict[tuple[str | int, ...], int] = {}  # experts not read yet, per stacked param
    for attr, _, _ in table.values():
        path, expert = split_expert(attr)
        if expert is not None:
            left[path] = left.get(path, 0) + 1
    for name, (attr, _, transpose) in table.items():
        file, start, info = headers[name]
        arr = _read_tensor(maps[file], info, start)
        host = (arr.T if transpose else arr).astype(dtype, copy=False)
        path, expert = split_expert(attr)
        if expert is None:
            yield path, np.ascontiguousarray(host)
            continue
        if path not in stacks:
            stacks[path] = np.empty(_variable(model, path).shape, dtype)
        stacks[path][expert] = host
        left[path] -= 1
        if not left[path]:
            yield path, stacks.pop(path)


def _max_abs_difference(files: list[Path], a: str, b: str, rows: int = 4096) -> float:
    """Largest |a - b| over two equally shaped stored tensors, in float32, read in row blocks."""
    headers = read_headers(files)
    (fa, sa, ia), (fb, sb, ib) = headers[a], headers[b]
    if ia["shape"] != ib["shape"]:
        return float("inf")
    ta = _read_tensor(np.memmap(fa, dtype=np.uint8, mode="r"), ia, sa)
    tb = _read_tensor(np.memmap(fb, dtype=np.uint8, mode="r"), ib, sb)
    worst = 0.0
    for lo in range(0, ta.shape[0], rows):
        x, y = ta[lo : lo + rows].astype(np.float32), tb[lo : lo + rows].astype(np.float32)
        worst = max(worst, float(np.max(np.abs(x - y), initial=0.0)))
    return worst


def _head_reading(
    cfg: Qwen3Config, files: list[Path], tied_head: str | None, path: Path
) -> Qwen3Config:
    """The config to build, once the output head of a tied config with a stored lm_head is known.

    transformers 4 ties such a checkpoint (the head is the embedding); transformers 5 unties it
    and reads lm_head.weight when the copy differs. Equal copies mean the same model either way;
    different ones are refused unless ``tied_head`` picks a reading.
    """
    if tied_head not in (None, *TIED_HEAD_READINGS):
        raise ValueError(
            f"tied_head must be one of {TIED_HEAD_READINGS} or None, got {tied_head!r}"
        )
    if not cfg.tie_word_embeddings or "lm_head.weight" not in read_headers(files):
        return cfg  # one reading only
    if tied_head == "lm_head":
        return dataclasses.replace(cfg, tie_word_embeddings=False)
    if tied_head == "embedding":
        return cfg
    diff = _max_abs_difference(files, "lm_head.weight", "model.embed_tokens.weight")
    if diff == 0.0:
        return cfg
    raise ValueError(
        f"{path}: config.json ties the embeddings (tie_word_embeddings=true) but the checkpoint "
        f"also stores lm_head.weight, which differs from model.embed_tokens.weight (largest "
        f"|difference| {diff:.3g}); transformers 4 uses the embedding as the output head, "
        "transformers 5 uses lm_head.weight, so every logit depends on the reader. Pick one: "
        "load_model(..., tied_head='embedding' or 'lm_head') (scripts: --tied_head=embedding or "
        "--tied_head=lm_head), or fix the checkpoint (drop lm_head.weight, or set "
        "tie_word_embeddings=false)."
    )


Loader = Callable[..., nnx.Module]
"""`loader(path, hf, dtype, cache_dir, *, tied_head, mesh) -> model`: builds the model of
checkpoint directory `path` (parsed config.json `hf`) with parameters in `dtype`
('float32'|'bfloat16'), using the converted-params cache `cache_dir` (or None), placed on `mesh`
(or one device); see `load_model`."""


def load_model(
    path: str | os.PathLike,
    dtype: str = "float32",
    cache_dir: str | os.PathLike | None = None,
    *,
    tied_head: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> nnx.Module:
    """Load an HF checkpoint directory with parameters in `dtype` ('float32'|'bfloat16').

    The architecture is config.json's `model_type` (without one, its `architectures`), built by
    the loader `ARCHITECTURES` registers for it; any other is refused with a ValueError listing
    the supported model types. Qwen3 and Qwen3-MoE give a `Qwen3` (`_load_qwen3`); Qwen3.5
    (dense and MoE, text tower) a `Qwen35` (`lpe_jax.model.qwen35_checkpoint.load_qwen35`;
    `tied_head` is refused there).

    With `cache_dir`, converted params are stored there (orbax) under a key derived from the
    checkpoint's content and `dtype`; a later load of the same checkpoint restores them without
    reading or converting safetensors.

    `tied_head` matters only for a checkpoint whose config ties the embeddings but which also
    stores an lm_head.weight that differs from the embedding (readers disagree there): 'embedding'
    uses the embedding as the head (transformers 4), 'lm_head' the stored lm_head (transformers 5).
    Left None, such a checkpoint is refused with a ValueError naming the difference; an equal
    copy loads as tied.

    `mesh` (axes ('rows', 'tensor', 'experts'), `lpe_jax.decoding.sharding.pair_mesh`; checked
    against the model by `sharding.check_mesh`): every parameter goes from host memory straight
    into its rule sharding (`sharding.place_params`), so on a mesh that splits the weights no
    device ever holds the whole model (or a whole weight). Its vocabulary dimensions are then
    zero-padded to a multiple of the tensor size (`sharding.pad_vocab`): the model's logits are
    [..., padded] with meaningless padded columns, which the rollout engine masks; the config
    keeps the real vocab_size. The params cache reads and writes the unpadded arrays (through
    host memory), so its entries serve loads with and without a mesh. None: one device.
    """
    path = Path(path)
    _np_dtype(dtype)  # a bad dtype is refused before anything is read
    hf = read_config(path)
    loader = ARCHITECTURES[model_type_of(hf)]
    return loader(path, hf, dtype, cache_dir, tied_head=tied_head, mesh=mesh)


def _load_qwen3(
    path: Path,
    hf: dict[str, Any],
    dtype: str,
    cache_dir: str | os.PathLike | None,
    *,
    tied_head: str | None,
    mesh: jax.sharding.Mesh | None = None,
) -> Qwen3:
    """A Qwen3 or Qwen3-MoE checkpoint as a `Qwen3`: Linear weights [in, out]; embed_tokens
    [V, H]; lm_head [H, V] when untied; experts stacked [E, ...] (see `load_model`)."""
    np_dtype = _np_dtype(dtype)
    files = weight_files(path)
    cfg = _head_reading(config_from_hf(hf), files, tied_head, path)
    if mesh is not None:
        _check_mesh(mesh, cfg)
    model = _abstract_model(cfg, np_dtype)
    if cache_dir is None:
        _convert(model, cfg, files, np_dtype, mesh)
        return model
    # An untied reading of a tied config has other params (an lm_head): its own entry.
    reading = "-lm_head" if cfg.tie_word_embeddings != bool(hf.get("tie_word_embeddings")) else ""
    key = _content_key(path, files, Path(cache_dir))
    entry = Path(cache_dir) / f"{key}-{np_dtype.name}{reading}"
    if _cache_restore(model, entry, mesh):
        return _placed(model, mesh)
    _convert(model, cfg, files, np_dtype, None if mesh is None else False)
    _cache_save(model, entry)
    return _placed(model, mesh)


def _check_mesh(mesh: jax.sharding.Mesh, cfg: Any) -> None:
    """`sharding.check_mesh` of one model of a pair on `mesh`, before anything is read (a dense
    model on a mesh whose experts axis only its partner splits is placed whole over it)."""
    from lpe_jax.decoding import sharding

    sharding.check_mesh(tuple(mesh.devices.shape), mesh.size, [cfg], whole_pair=False)


def _placed(model: nnx.Module, mesh: jax.sharding.Mesh | None) -> nnx.Module:
    """`model` (params in host memory when mesh is set) with its params on `mesh` by the rules
    (`sharding.place_params`); unchanged when mesh is None."""
    if mesh is None:
        return model
    from lpe_jax.decoding import sharding

    state = nnx.state(model, nnx.Param)
    nnx.update(model, sharding.place_params(mesh, state, model.cfg.vocab_size))
    return model


def _load_qwen35(
    path: Path,
    hf: dict[str, Any],
    dtype: str,
    cache_dir: str | os.PathLike | None,
    *,
    tied_head: str | None,
    mesh: jax.sharding.Mesh | None = None,
) -> Qwen35:
    """A Qwen3.5 checkpoint (`lpe_jax.model.qwen35_checkpoint.load_qwen35`), through the
    converted-params cache as `_load_qwen3` (keyed by content: the entries of the two families
    never meet); tied_head, a Qwen3-only option, is refused rather than ignored."""
    from lpe_jax.model.qwen35_checkpoint import abstract_model, load_qwen35

    if tied_head is not None:
        raise ValueError(f"{path} is a Qwen3.5 checkpoint; tied_head applies to Qwen3 only.")
    if mesh is not None:  # read whole, then placed by the rules (`_placed`)
        _check_mesh(mesh, abstract_model(path, dtype).cfg)
    if cache_dir is None:
        return _placed(load_qwen35(path, dtype), mesh)
    model = abstract_model(path, dtype)  # checks config and headers before the cache is read
    key = _content_key(path, weight_files(path), Path(cache_dir))
    # The layout tag keeps entries converted before the q|k|v re-layout (gated_deltanet's
    # channel order) from being restored into the grouped layout.
    entry = Path(cache_dir) / f"{key}-{_np_dtype(dtype).name}-{_QWEN35_LAYOUT}"
    if _cache_restore(model, entry):
        return _placed(model, mesh)
    model = load_qwen35(path, dtype)
    _cache_save(model, entry)
    return _placed(model, mesh)


# model_type -> loader. One entry per architecture; `load_model` refuses every other model type.
ARCHITECTURES: dict[str, Loader] = {
    "qwen3": _load_qwen3,
    "qwen3_moe": _load_qwen3,
    **{t: _load_qwen35 for t in QWEN35_MODEL_TYPES},
}


def save_model(model: Qwen3, path: str | os.PathLike, *, dtype: str | None = None) -> Path:
    """Write `model` as an HF directory: config.json + model.safetensors ([out, in] Linear weights).

    dtype: 'float32' or 'bfloat16' for the stored tensors; None keeps the model's dtype. Returns
    the directory. transformers' `Qwen3ForCausalLM` (`Qwen3MoeForCausalLM` with experts) and
    `load_model` read it.
    """
    path = Path(path)
    np_dtype = _np_dtype(dtype if dtype is not None else model.dtype)
    cfg = model.cfg
    tensors = {}
    for name, (attr, shape, transpose) in weight_table(cfg).items():
        param, expert = split_expert(attr)
        arr = np.asarray(_variable(model, param)[...]).astype(np_dtype)
        arr = arr if expert is None else arr[expert]
        tensors[name] = np.ascontiguousarray(arr.T if transpose else arr)
        assert tensors[name].shape == shape, (name, tensors[name].shape, shape)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config_to_hf(cfg, np_dtype.name), indent=2))
    _write_safetensors(path / "model.safetensors", tensors)
    return path


# ----------------------------------------------------------------------------------------------
# content key for the converted-params cache


def _file_sha256(file: Path, memo_dir: Path | None) -> str:
    """sha256 of `file`'s bytes, memoized under (absolute path, size, mtime_ns) when memo_dir."""
    st = file.stat()
    stamp = f"{file.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    memo = None
    if memo_dir is not None:
        memo = memo_dir / "digests" / (hashlib.sha256(stamp.encode()).hexdigest() + ".txt")
        if memo.exists():
            return memo.read_text().strip()
    digest = hashlib.sha256()
    with open(file, "rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(digest.hexdigest())
    return digest.hexdigest()


def checkpoint_fingerprint(
    path: str | os.PathLike, memo_dir: str | os.PathLike | None = None
) -> str:
    """Content hash of an HF checkpoint directory (config, index, every weight file's bytes).

    For run manifests: equal fingerprints mean equal weights. Hashing reads every byte (seconds
    for a 4B model); with `memo_dir` (e.g. the params cache dir) each file is hashed once.
    """
    path = Path(path)
    read_config(path)
    return _content_key(path, weight_files(path), None if memo_dir is None else Path(memo_dir))


def _content_key(path: Path, files: list[Path], memo_dir: Path | None) -> str:
    """sha256 over config.json, the shard index (if any) and every weight file's content."""
    key = hashlib.sha256(_CACHE_FORMAT.encode())
    key.update((path / "config.json").read_bytes())
    index = path / "model.safetensors.index.json"
    if index.exists():
        key.update(index.read_bytes())
    for file in files:
        key.update(file.name.encode())
        key.update(_file_sha256(file, memo_dir).encode())
    return key.hexdigest()[:32]


# orbax is imported only when a cache is used: it is slow to import and most loads do not need it.


class _DropOrbaxInfo(logging.Filter):
    """Drops orbax's INFO records (~70 lines per save: versions, thread ids, throughput), which
    bury a job's own progress; its warnings and errors pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def _import_orbax() -> Any:
    """orbax.checkpoint, with its INFO logging (through absl's logger) filtered out once."""
    import orbax.checkpoint as ocp

    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _DropOrbaxInfo) for f in absl_logger.filters):
        absl_logger.addFilter(_DropOrbaxInfo())
    return ocp


def _cache_restore(model: nnx.Module, entry: Path, host: Any = None) -> bool:
    """Fill the abstract `model` from cache `entry` (on the first device; into host memory, numpy,
    when `host` is set, for `_placed` to spread); False when there is no such entry."""
    if not entry.exists():  # orbax renames a finished save into place, so present = complete
        return False
    ocp = _import_orbax()

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = nnx.state(model, nnx.Param)
    abstract = jax.tree.map(
        lambda x: (
            np.empty(x.shape, x.dtype)  # untouched pages until orbax writes them
            if host is not None
            else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device)
        ),
        nnx.to_pure_dict(state),
    )
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(entry.resolve(), abstract)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    return True


def _cache_save(model: nnx.Module, entry: Path) -> None:
    ocp = _import_orbax()

    entry.parent.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(entry.resolve(), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        ckptr.wait_until_finished()
