"""What fits where: `memory.plan_mesh` for bfloat16 pairs on a few machines (planned, not measured).

For each model pair (two copies of one shape: original and variant) and machine, the mesh that
splits the weights least (tensor, then experts, grown until each row group holds at least
--min_slots slots; where no mesh reaches that, the one with the most slots, marked "only"), its
weights per device, and the slots the engine would size: (MEMORY_FRACTION of the device - weights
- the prompt table) / one slot's bytes per device, times the rows size (at most MAX_AUTO_ROWS per
device, as the engine caps them).
Qwen3.5 is placed by the same rules (its Gated DeltaNet layers by key and value heads).

  .venv/bin/python experiments/plan_mesh.py --max_new_tokens=512
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from lpe_jax.decoding import memory, sharding  # noqa: E402
from lpe_jax.decoding.rollouts import prompt_bucket  # noqa: E402
from lpe_jax.model import qwen3, qwen35  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("max_new_tokens", 512, "Generated tokens per row the slots hold.")
flags.DEFINE_integer("prompt_len", 256, "Longest prompt, in tokens.")
flags.DEFINE_integer("prompts", 64, "Prompt-table entries.")
flags.DEFINE_integer("min_slots", 32, "Fewest slots per row group for a mesh to count as fitting.")

GIB = 2**30
# Device memory: H100 and H200 as nvidia-smi reports them (81,559 / 143,771 MiB), a TPU v5e chip
# 16 GiB of HBM.
MACHINES = {
    "1x H100": (1, 81559 * 2**20),
    "1x H200": (1, 143771 * 2**20),
    "8x H100": (8, 81559 * 2**20),
    "v5e-8": (8, 16 * GIB),
}
# Shapes of the published config.json files (Qwen/Qwen3-14B, -32B, -30B-A3B); the others are
# qwen3.PRESETS / qwen35.PRESETS (Qwen3.5-4B's shape is assumed there, see its comment).
MODELS = {
    "Qwen3-4B": qwen3.PRESETS["qwen3_4b"],
    "Qwen3-8B": qwen3.PRESETS["qwen3_8b"],
    "Qwen3-14B": qwen3.Qwen3Config(151936, 5120, 40, 40, 8, 128, 17408, tie_word_embeddings=False),
    "Qwen3-32B": qwen3.Qwen3Config(151936, 5120, 64, 64, 8, 128, 25600, tie_word_embeddings=False),
    "Qwen3-30B-A3B": qwen3.Qwen3Config(
        151936, 2048, 48, 32, 4, 128, 6144, tie_word_embeddings=False, num_experts=128,
        num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
    ),
    "Qwen3.5-4B (assumed shape)": qwen35.PRESETS["qwen3_5_4b"],
    "Qwen3.5-9B": qwen35.PRESETS["qwen3_5_9b"],
}  # fmt: skip


def _meshes(n: int) -> list[tuple[int, int, int]]:
    """Every (rows, tensor, experts) over n devices, least weight-splitting first."""
    shapes = [
        (n // (t * e), t, e) for t in range(1, n + 1) for e in range(1, n + 1) if n % (t * e) == 0
    ]
    return sorted(shapes, key=lambda s: (s[1] * s[2], s[2]))


def _plan(cfg, n: int, mem: int) -> tuple[tuple[int, int, int], memory.MeshPlan, int] | None:
    """(mesh, plan, slots) of the first mesh with --min_slots per row group, else of the mesh with
    the most slots (slots < --min_slots then), None where no mesh holds a slot."""
    best = None
    for shape in _meshes(n):
        try:
            sharding.check_mesh(shape, n, [cfg])
            plan = memory.plan_mesh(
                cfg, cfg, "bfloat16", "bfloat16", shape, 0, FLAGS.prompts, FLAGS.max_new_tokens,
                prompt_bucket(FLAGS.prompt_len), attention_block=64,
            )  # fmt: skip
        except ValueError:
            continue
        budget = mem * memory.MEMORY_FRACTION - plan.weights - plan.prompts * plan.prompt_bytes
        per_device = min(memory.MAX_AUTO_ROWS, int(budget // plan.slot_bytes))
        if per_device >= FLAGS.min_slots:
            return shape, plan, per_device * shape[0]
        if per_device >= 1 and (best is None or per_device * shape[0] > best[2]):
            best = (shape, plan, per_device * shape[0])
    return best


def main(argv: list[str]) -> None:
    del argv
    print(
        f"bfloat16 pairs, {FLAGS.max_new_tokens} new tokens, prompts <= {FLAGS.prompt_len} "
        f"tokens, {FLAGS.prompts} prompt entries; planned by memory.py, not measured"
    )
    print("| pair | " + " | ".join(MACHINES) + " |")
    print("|---|" + "---|" * len(MACHINES))
    for name, cfg in MODELS.items():
        cells = []
        for n, mem in MACHINES.values():
            got = _plan(cfg, n, mem)
            if got is None:
                cells.append("does not fit")
                continue
            shape, plan, slots = got
            mesh = ",".join(map(str, shape))
            only = "only " if slots < FLAGS.min_slots * shape[0] else ""
            cells.append(f"mesh {mesh}: {plan.weights / GIB:.1f} GiB weights, {only}{slots} slots")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    app.run(main)
