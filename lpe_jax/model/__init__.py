"""The model: Flax NNX ports of the Qwen families and everything that reads their checkpoints.

`qwen3` is dense Qwen3 with its one layer loop (`Qwen3.forward`, a residual-stream hook, one state
per layer); `qwen35`, `gated_deltanet`, `gated_attention` and `moe` are the Qwen3.5 hybrid and
mixture-of-experts layer kinds (parity-tested, not yet loaded by `checkpoint`); `checkpoint` maps
HF safetensors onto the modules; `forward` gives full-sequence logits; `tokenizer` wraps the
checkpoint's tokenizer and chat template; `f32_dot` is the float32-accumulating dot every model file
uses. Imports JAX.
"""
