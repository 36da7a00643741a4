"""Benchmark the paired decode loop (both models every step) with random weights.

Steady state: eos_token_ids is empty, so every row runs all --new_tokens steps. Reports compile
time, ms/step, pair-tokens/s and peak memory; with --reference=hf also times the same loop written
with Hugging Face transformers (two Qwen3ForCausalLM, or Qwen3MoeForCausalLM for a MoE preset,
DynamicCache, eager attention, no_grad, sampling from the linear path) in the same run, and prints
the ratio. Qwen3-MoE presets (`--preset=tiny_moe`, `small_moe`) decode the same loop with sparse
MoE MLPs.

  .venv/bin/python experiments/benchmark_decode.py --preset=tiny --rows=64 --reference=hf
  .venv/bin/python experiments/benchmark_decode.py --preset=tiny_moe --rows=64 --reference=hf

--variant=abliterated: the variant is the original abliterated along a random direction, in buffers
of its own (two models, as two loaded checkpoints); --variant=low_rank: that variant as low-rank
deltas on the original's arrays (`as_low_rank`), which the engine decodes with the original as 2B
rows through one copy of the weights (issue 20). Qwen3 presets only.

A qwen3_5_* preset decodes a Qwen3.5 pair (hybrid Gated DeltaNet / gated attention); its HF
reference is two Qwen3_5ForCausalLM with their own hybrid cache (transformers' torch fallbacks for
the conv and the delta rule where the fast kernels are absent, as on CPU).
"""

from __future__ import annotations

import resource
import statistics
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from lpe_jax.abliteration.orthogonalize import orthogonalize_model
from lpe_jax.decoding import paths
from lpe_jax.decoding.sampler import PairedSampler
from lpe_jax.model import qwen3, qwen35
from lpe_jax.model.checkpoint import config_to_hf
from lpe_jax.model.low_rank import as_low_rank, pair_whole_tensors

# Presets only this benchmark needs: ~20M params, to measure CPU scaling beyond "tiny"; Qwen3-MoE
# shapes with every layer sparse, top-8 of experts a quarter of the dense width (Qwen3-30B-A3B's
# proportions: 128 experts of 768 = 1/8 of its 6144, top-8).
EXTRA_PRESETS = {
    "small_20m": qwen3.Qwen3Config(32000, 384, 6, 6, 2, 64, 1024),
    "tiny_moe": qwen3.Qwen3Config(
        512, 64, 2, 4, 2, 32, 128, num_experts=16, num_experts_per_tok=4,
        moe_intermediate_size=32, norm_topk_prob=True,
    ),
    "small_moe": qwen3.Qwen3Config(
        32000, 384, 6, 6, 2, 64, 1024, num_experts=32, num_experts_per_tok=8,
        moe_intermediate_size=128, norm_topk_prob=True,
    ),
}  # fmt: skip
ALL_PRESETS = {**qwen3.PRESETS, **EXTRA_PRESETS, **qwen35.PRESETS}

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "tiny", sorted(ALL_PRESETS), "Model shape (random weights).")
flags.DEFINE_integer("rows", 64, "Rows decoded together (alphas x rollouts, padded to a bucket).")
flags.DEFINE_integer("prompt_len", 64, "Prompt tokens.")
flags.DEFINE_integer("new_tokens", 128, "Generated tokens per row (all of them: no EOS).")
flags.DEFINE_integer("alphas", 20, "Number of alpha values in [0, 1], spread over the rows.")
flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Parameter dtype.")
flags.DEFINE_integer("repeats", 3, "Timed runs after the compiling one (median reported).")
flags.DEFINE_enum("reference", "none", ["none", "hf"], "Also time the HF transformers loop.")
flags.DEFINE_enum(
    "variant",
    "random",
    ["random", "abliterated", "low_rank"],
    "random: a second random model; abliterated: the original abliterated, held whole; "
    "low_rank: that abliteration as low-rank deltas on the original (decoded as 2B rows).",
)
flags.DEFINE_integer("hf_repeats", 1, "Timed HF runs (median reported).")
flags.DEFINE_integer(
    "hf_threads",
    0,
    "torch CPU threads for the HF run (0: torch's default). On a shared CPU box "
    "torch's OpenMP threads stall when another process holds a core; 1 gives stable timings.",
)


def _peak_memory() -> str:
    stats = jax.local_devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return f"device peak {stats['peak_bytes_in_use'] / 2**30:.2f} GiB"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return f"host peak RSS {rss:.2f} GiB (whole process, HF reference included if run)"


def _jax_run(cfg: qwen3.Qwen3Config, prompt: np.ndarray, alphas: np.ndarray, r: int) -> dict:
    dtype = jnp.dtype(FLAGS.dtype)
    if isinstance(cfg, qwen35.Qwen35Config):
        m_o, m_v = (qwen35.Qwen35(cfg, dtype=dtype, rngs=nnx.Rngs(params=i)) for i in (0, 1))
    else:
        m_o, m_v = (qwen3.init_random(cfg, dtype=dtype, seed=i) for i in (0, 1))
    if FLAGS.variant != "random":
        m_v = _abliterated(m_o)
        if FLAGS.variant == "low_rank":
            m_v, plan = as_low_rank(m_o, m_v)
            print(plan.summary())
    paired = not isinstance(pair_whole_tensors(m_o, m_v), str)
    print(f"variant={FLAGS.variant}: decoded as 2B rows through one weight copy: {paired}")
    s = PairedSampler(
        original=m_o,
        variant=m_v,
        path=paths.linear,
        max_new_tokens=FLAGS.new_tokens,
        eos_token_ids=[],
        max_rows=FLAGS.rows,
    )
    times = []
    for i in range(FLAGS.repeats + 1):
        t0 = time.perf_counter()
        out = s.sample(prompt, alphas, rollouts_per_alpha=r, seed=i)
        times.append(time.perf_counter() - t0)  # sample() returns NumPy: the work is done
    assert (out.lengths == FLAGS.new_tokens).all()
    steady = statistics.median(times[1:])
    return dict(first_s=times[0], wall_s=steady, compilations=s.num_compilations)


def _abliterated(original: qwen3.Qwen3) -> qwen3.Qwen3:
    """The original abliterated along a random direction, copied into buffers of its own."""
    direction = np.random.default_rng(1).normal(size=original.cfg.hidden_size)
    graphdef, state = nnx.split(orthogonalize_model(original, direction))
    return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.array(x, copy=True), state))


def _hf_run(cfg: qwen3.Qwen3Config, prompt: np.ndarray, alphas: np.ndarray, r: int) -> float:
    import torch

    # transformers >= 5.2x renames past_key_values; the old name works in every 5.x we support.
    warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
    from transformers import AutoModelForCausalLM, DynamicCache, Qwen3Config, Qwen3MoeConfig

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if FLAGS.hf_threads:
        torch.set_num_threads(FLAGS.hf_threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[FLAGS.dtype]
    if isinstance(cfg, qwen35.Qwen35Config):
        hf_cfg, make = _hf_qwen35(cfg)
    else:
        # The same config.json our save_model writes, so the reference has exactly our shape.
        hf_class = Qwen3MoeConfig if cfg.num_experts else Qwen3Config
        hf_cfg = hf_class.from_dict(config_to_hf(cfg, FLAGS.dtype))
        make = AutoModelForCausalLM.from_config
    hf_cfg._attn_implementation = "eager"
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        with dev:
            models.append(make(hf_cfg).to(dtype).eval())
    row_alpha = torch.tensor(np.repeat(alphas, r), dtype=torch.float32, device=dev)[:, None]
    ids = torch.tensor(prompt, device=dev)[None].repeat(row_alpha.shape[0], 1)

    def loop(n_tokens: int) -> None:
        # Qwen3.5 builds its own hybrid cache (K/V + conv and delta states) on the first call.
        hybrid = isinstance(cfg, qwen35.Qwen35Config)
        caches = [None, None] if hybrid else [DynamicCache(), DynamicCache()]
        pairs = zip(models, caches, strict=True)
        outs = [m(ids, past_key_values=c, use_cache=True) for m, c in pairs]
        caches = [o.past_key_values for o in outs]
        logits = [o.logits[:, -1].float() for o in outs]
        lp = torch.zeros(2, ids.shape[0], device=dev)
        for t in range(n_tokens):
            path = row_alpha * logits[0] + (1 - row_alpha) * logits[1]
            tok = torch.multinomial(torch.softmax(path, -1), 1)
            for j in range(2):
                lp[j] += torch.log_softmax(logits[j], -1).gather(1, tok)[:, 0]
            if t + 1 < n_tokens:
                logits = [
                    m(tok, past_key_values=c, use_cache=True).logits[:, -1].float()
                    for m, c in zip(models, caches, strict=True)
                ]
        if dev.type == "cuda":
            torch.cuda.synchronize()

    times = []
    with torch.no_grad():
        loop(2)  # warm-up: first-call allocations and lazy initialisation
        for _ in range(FLAGS.hf_repeats):
            t0 = time.perf_counter()
            loop(FLAGS.new_tokens)
            times.append(time.perf_counter() - t0)
    models.clear()  # free the weights before the JAX run
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(times)


def _hf_qwen35(cfg: qwen35.Qwen35Config) -> tuple:
    """(transformers config, model class) of exactly this dense Qwen3.5 shape."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    a, lin = cfg.attention, cfg.linear
    hf_cfg = Qwen3_5TextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        layer_types=list(cfg.layer_types), num_attention_heads=a.num_heads,
        num_key_value_heads=a.num_kv_heads, head_dim=a.head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta,
                         "partial_rotary_factor": a.rotary_dim / a.head_dim},
        linear_conv_kernel_dim=lin.conv_kernel, linear_key_head_dim=lin.head_k_dim,
        linear_value_head_dim=lin.head_v_dim, linear_num_key_heads=lin.num_k_heads,
        linear_num_value_heads=lin.num_v_heads, tie_word_embeddings=cfg.tie_word_embeddings,
    )  # fmt: skip
    return hf_cfg, Qwen3_5ForCausalLM


def _params(cfg: qwen3.Qwen3Config | qwen35.Qwen35Config) -> int:
    if isinstance(cfg, qwen3.Qwen3Config):
        return cfg.num_params()
    model = nnx.eval_shape(lambda: qwen35.Qwen35(cfg, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def main(argv: list[str]) -> None:
    del argv
    cfg = ALL_PRESETS[FLAGS.preset]
    if FLAGS.variant != "random" and not isinstance(cfg, qwen3.Qwen3Config):
        raise ValueError(f"--variant={FLAGS.variant} needs a Qwen3 preset; got {FLAGS.preset}.")
    if FLAGS.alphas < 1 or FLAGS.rows < FLAGS.alphas:
        raise ValueError(f"need 1 <= --alphas <= --rows; got {FLAGS.alphas}, {FLAGS.rows}.")
    alphas = np.linspace(0.0, 1.0, FLAGS.alphas)
    r = FLAGS.rows // FLAGS.alphas
    live = r * FLAGS.alphas  # rows decoded in the engine's --rows slots
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, FLAGS.prompt_len)
    steps = FLAGS.new_tokens
    print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  preset={FLAGS.preset} "
        f"({_params(cfg) / 1e6:.1f}M params/model) dtype={FLAGS.dtype}"
    )
    print(
        f"rows={FLAGS.rows} ({live} live = {FLAGS.alphas} alphas x {r}) "
        f"prompt_len={FLAGS.prompt_len} new_tokens={steps}"
    )
    # HF first: torch hands its GPU memory back (empty_cache); JAX's allocator keeps what it took.
    hf_s = _hf_run(cfg, prompt, alphas, r) if FLAGS.reference == "hf" else None
    res = _jax_run(cfg, prompt, alphas, r)
    ms = 1e3 * res["wall_s"] / steps
    compile_s = res["first_s"] - res["wall_s"]
    print(
        f"lpe_jax: first call {res['first_s']:.2f} s (compile ~{compile_s:.2f} s), "
        f"{ms:.2f} ms/step, {live * steps / res['wall_s']:.0f} pair-tokens/s, "
        f"compilations={res['compilations']}, {_peak_memory()}"
    )
    if hf_s is not None:
        hf_ms = 1e3 * hf_s / steps
        print(
            f"hf eager: {hf_ms:.2f} ms/step, {live * steps / hf_s:.0f} pair-tokens/s; "
            f"speedup lpe_jax vs hf = {hf_ms / ms:.2f}x"
        )


if __name__ == "__main__":
    app.run(main)
