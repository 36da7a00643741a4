"""Peak host memory of loading a pair with the variant as low-rank deltas: loaded whole then
factored (`as_low_rank`) vs streamed tensor by tensor from its checkpoint
(`load_low_rank_variant`, what `--variant_low_rank=auto` runs). Issue 20.

--mode=prepare writes a random Qwen3 checkpoint (the original, tied) and its abliteration along
a random direction (`write_abliterated`) under --dir. --mode=whole / --mode=streamed then load the
pair that way in this process and print the plan, the process's peak RSS and the live JAX
buffers; run each in its own process (a process's peak never goes down).

  .venv/bin/python experiments/benchmark_low_rank_load.py --mode=prepare --dir=/tmp/lr_ckpt
  .venv/bin/python experiments/benchmark_low_rank_load.py --mode=whole --dir=/tmp/lr_ckpt
  .venv/bin/python experiments/benchmark_low_rank_load.py --mode=streamed --dir=/tmp/lr_ckpt
"""

from __future__ import annotations

import resource
import shutil
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

from lpe_jax.abliteration.orthogonalize import write_abliterated
from lpe_jax.model import qwen3
from lpe_jax.model.checkpoint import load_model, save_model
from lpe_jax.model.low_rank import as_low_rank, load_low_rank_variant, unique_bytes
from lpe_jax.organisms import toy

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "prepare", ["prepare", "whole", "streamed"], "What to do.")
flags.DEFINE_string("dir", "/tmp/lpe_low_rank_load", "Where the two checkpoints are.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Load dtype.")
flags.DEFINE_integer("hidden", 1024, "Hidden size (--mode=prepare).")
flags.DEFINE_integer("layers", 4, "Decoder layers (--mode=prepare).")
flags.DEFINE_integer("vocab", 32768, "Vocabulary (--mode=prepare).")

MIB = 2.0**20
# The toy pair's tokenizer stands in (the load never reads it).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(argv: list[str]) -> None:
    del argv
    root = Path(FLAGS.dir)
    original_dir, variant_dir = root / "original", root / "abliterated"
    if FLAGS.mode == "prepare":
        h = FLAGS.hidden
        cfg = qwen3.Qwen3Config(
            FLAGS.vocab, h, FLAGS.layers, h // 128, max(1, h // 256), 128, 3 * h
        )
        save_model(qwen3.init_random(cfg, seed=0), original_dir)
        for name in TOKENIZER_FILES:  # write_abliterated ships the original's tokenizer
            shutil.copy2(toy.TOY_DIR / "original" / name, original_dir / name)
        direction = np.random.default_rng(1).normal(size=h)
        shutil.rmtree(variant_dir.with_name(variant_dir.name + ".partial"), ignore_errors=True)
        write_abliterated(original_dir, variant_dir, direction, overwrite=True)
        print(f"wrote {original_dir} and {variant_dir}")
        return
    t0 = time.perf_counter()
    original = load_model(original_dir, FLAGS.dtype)
    after_original = _rss_mib()
    if FLAGS.mode == "whole":
        variant, plan = as_low_rank(original, load_model(variant_dir, FLAGS.dtype))
    else:
        variant, plan = load_low_rank_variant(original, variant_dir, FLAGS.dtype)
    seconds = time.perf_counter() - t0
    print(plan.summary())
    live = unique_bytes(jax.live_arrays()) / MIB
    print(
        f"{FLAGS.mode}: load {seconds:.1f} s; peak RSS after the original {after_original:.0f} "
        f"MiB, overall {_rss_mib():.0f} MiB; live JAX buffers {live:.0f} MiB "
        f"(params planned {plan.low_rank_bytes / MIB:.0f} MiB)"
    )
    del variant


if __name__ == "__main__":
    app.run(main)
