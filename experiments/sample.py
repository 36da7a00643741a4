"""Sample prompts x alpha grid x R rollouts into a resumable run directory.

    python experiments/sample.py --out=runs/toy --alphas=0,0.25,0.5,0.75,1 --rollouts=100

Every (prompt, alpha) chunk is one draw on the rollout engine (lpe_jax.runs.scheduler): the chunks
of many prompts and alphas decode side by side, and each is written atomically as soon as its last
row ends. A rerun with the same flags skips finished chunks and regenerates the others identically:
a row's tokens depend only on (seed, prompt, alpha, rollout index), and its log-probs only on the
row itself, since the engine decodes every row in the same fixed-shape step whatever its slot or
batch-mates (tests/test_experiments.py checks a resumed store is bit-identical). So an interrupted
run resumes with no rollout lost or duplicated. Multi-host: every process takes every
num_processes-th prompt and writes into the same --out.
"""

from __future__ import annotations

import numpy as np
from absl import flags, logging

from lpe_jax.decoding.paths import as_path
from lpe_jax.runs.pipeline import derive_seed
from lpe_jax.runs.scheduler import Draw, Drawn, Job, JobPrompt
from lpe_jax.runs.store import RolloutStore

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


def chunk_job(alpha: float, rollouts: int, seed: int) -> Job:
    """One chunk: rollouts 0 .. rollouts - 1 of stream (prompt, seed, alpha); returns the Drawn."""
    drawn: Drawn = yield Draw(alpha, rollouts, seed)
    return drawn


def main(argv: list[str]) -> None:
    del argv
    alphas = parse_alphas(FLAGS.alphas)
    if FLAGS.rollouts < 1:
        raise ValueError(f"--rollouts must be >= 1, got {FLAGS.rollouts}")
    as_path(common.path_shape()).check_alphas(np.array(alphas))  # fail before any work
    process, n_proc = common.init_distributed()
    prompts = common.load_prompts()
    pair = common.load_pair()
    manifest = {
        **common.sampling_manifest(pair, prompts),
        "alphas": alphas,
        "rollouts": FLAGS.rollouts,
    }
    store = RolloutStore.open(FLAGS.out, manifest)
    mine = prompts[process::n_proc]
    todo = [(p, a) for p in mine for a in alphas if not store.has_chunk(p.id, a)]
    written = 0
    if todo:
        ids = {p.id: np.asarray(common.prompt_ids(pair, p.text)) for p, _ in todo}
        engine = common.make_engine(pair, common.max_prompt_len(pair, prompts))
        sched = common.make_scheduler(engine)
        for p, a in todo:
            job = chunk_job(a, FLAGS.rollouts, derive_seed(FLAGS.seed, p.id))
            sched.add((p.id, a), JobPrompt(p.id, ids[p.id], p.text), job)
        progress = common.Progress(len(todo), "chunks")
        for (prompt_id, alpha), drawn in sched.run():
            store.write_chunk(prompt_id, alpha, drawn.chunk())
            written += 1
            progress.update()
    logging.info("process %d/%d wrote %d chunks into %s", process, n_proc, written, FLAGS.out)
    print(
        f"sampled {len(mine)} prompts x {len(alphas)} alphas; {written} new chunks in {FLAGS.out}"
    )


if __name__ == "__main__":
    common.run(main)
