"""Sample prompts x alpha grid x R rollouts into a resumable run directory.

    python experiments/sample.py --out=runs/toy --alphas=0,0.25,0.5,0.75,1 --rollouts=100

Each (prompt, alpha) chunk is written atomically once sampled; all alphas of a prompt are sampled
in one batched pass. A rerun with the same flags skips finished chunks and regenerates the
others identically (keys derive from seed, prompt, alpha and rollout index), so an interrupted
run resumes with no rollout lost or duplicated. Multi-host: every process takes every
num_processes-th prompt and writes into the same --out.
"""

from __future__ import annotations

import numpy as np
from absl import flags, logging

from lpe_jax.pipeline import derive_seed
from lpe_jax.store import RolloutStore

import common

FLAGS = flags.FLAGS
common.define_model_flags()
common.define_prompt_flags()
common.define_distributed_flags()
flags.DEFINE_string("out", None, "Run directory.", required=True)
flags.DEFINE_list("alphas", ["0", "0.25", "0.5", "0.75", "1"], "Alpha grid.")
flags.DEFINE_integer("rollouts", 100, "Rollouts per (prompt, alpha).")


def parse_alphas(values: list[str]) -> list[float]:
    try:
        alphas = [round(float(a), 6) for a in values]
    except ValueError as e:
        raise ValueError(f"--alphas must be numbers, got {values}") from e
    if not alphas or len(set(alphas)) != len(alphas):
        raise ValueError(f"--alphas must be non-empty and distinct, got {values}")
    return sorted(alphas)


def main(argv: list[str]) -> None:
    del argv
    alphas = parse_alphas(FLAGS.alphas)
    if FLAGS.rollouts < 1:
        raise ValueError(f"--rollouts must be >= 1, got {FLAGS.rollouts}")
    process, n_proc = common.init_distributed()
    prompts = common.load_prompts()
    pair = common.load_pair()
    sampler = common.make_sampler(pair)
    sampler.path.check_alphas(np.array(alphas))  # fail before any work
    manifest = {
        **common.sampling_manifest(pair, prompts),
        "alphas": alphas,
        "rollouts": FLAGS.rollouts,
    }
    store = RolloutStore.open(FLAGS.out, manifest)
    mine = prompts[process::n_proc]
    progress = common.Progress(len(mine), "prompts")
    written = 0
    for prompt in mine:
        todo = [a for a in alphas if not store.has_chunk(prompt.id, a)]
        if todo:
            # Resample the prompt's whole grid, not only the missing alphas: the same batch
            # gives bit-identical log-probs (XLA's reduction order depends on the batch shape),
            # so a resumed chunk equals the one an uninterrupted run would have written.
            ids = common.prompt_ids(pair, prompt.text)
            r = sampler.sample(ids, alphas, FLAGS.rollouts, seed=derive_seed(FLAGS.seed, prompt.id))
            for i, a in enumerate(alphas):
                if a not in todo:
                    continue
                store.write_chunk(
                    prompt.id,
                    a,
                    {
                        "tokens": r.tokens[i],
                        "lengths": r.lengths[i],
                        "logp_original": r.logp_original[i],
                        "logp_variant": r.logp_variant[i],
                        "truncated": r.truncated[i],
                        "nonfinite": r.nonfinite[i],
                    },
                )
                written += 1
        progress.update()
    logging.info("process %d/%d wrote %d chunks into %s", process, n_proc, written, FLAGS.out)
    print(
        f"sampled {len(mine)} prompts x {len(alphas)} alphas; {written} new chunks in {FLAGS.out}"
    )


if __name__ == "__main__":
    common.run(main)
