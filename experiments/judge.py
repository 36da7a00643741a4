"""Fill the verdicts of a run directory written by sample.py, with any judge.

    python experiments/judge.py --run=runs/toy                      # the toy organism's rule
    OPENAI_API_KEY=... python experiments/judge.py --run=runs/hb --judge=rubric \\
        --judge_options='{"base_url": "https://api.openai.com/v1", "model": "gpt-4o-mini",
                          "cache_path": "runs/hb/judge_cache.sqlite"}'

Chunks already judged by the same judge id are skipped, so an interrupted run resumes. Verdicts
the judge could not give stay -1 (unknown): they are retried on the next run and never counted
as refusals.
"""

from __future__ import annotations

from pathlib import Path

from absl import flags, logging

from lpe_jax.model.tokenizer import load_tokenizer
from lpe_jax.runs.data import dataset_hash, load_prompts
from lpe_jax.runs.pipeline import judge_rows
from lpe_jax.runs.store import UNKNOWN, RolloutStore

import common

FLAGS = flags.FLAGS
common.define_judge_flags()
common.define_distributed_flags()
flags.DEFINE_string("run", None, "Run directory written by sample.py.", required=True)


def run_prompts(m: dict) -> dict[str, str]:
    """{id: text} of the run's prompts, reloaded as sample.py read them (file, category, limit)."""
    # Runs sampled before the manifest recorded the category used the default, "standard".
    category = m.get("category", "standard")
    prompts = load_prompts(m["prompts"], functional_category=category)[: m["n_prompts"]]
    if dataset_hash(prompts) != m["dataset_hash"]:
        raise ValueError(
            f"the prompts file {m['prompts']} (category {category!r}, first {m['n_prompts']}) "
            f"changed since {FLAGS.run} was sampled (dataset hash differs); restore it or sample "
            "a new run."
        )
    return {p.id: p.text for p in prompts}


def main(argv: list[str]) -> None:
    del argv
    process, n_proc = common.init_distributed()
    store = RolloutStore.load(FLAGS.run)
    m = store.manifest
    text = run_prompts(m)
    if not Path(m["original"]).is_dir():
        raise ValueError(
            f"{FLAGS.run} was sampled from the original model at {m['original']}, which no longer "
            "exists; judging decodes with its tokenizer, so restore that directory"
        )
    tokenizer = load_tokenizer(m["original"])
    judge = common.make_judge(m["original"])
    chunks = [c for i, c in enumerate(store.chunks()) if i % n_proc == process]
    progress = common.Progress(len(chunks), "chunks")
    unknown = 0
    for prompt_id, alpha in chunks:
        chunk = store.read_chunk(prompt_id, alpha)
        old = chunk.get("verdicts")
        same_judge = old is not None and str(chunk["verdict_judge_id"]) == judge.judge_id
        if same_judge and not (old == UNKNOWN).any():
            progress.update()
            continue
        verdicts = judge_rows(
            judge,
            text[prompt_id],
            chunk["tokens"],
            chunk["lengths"],
            chunk["nonfinite"],
            lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        )
        unknown += int((verdicts == UNKNOWN).sum())
        store.set_verdicts(prompt_id, alpha, verdicts, judge.judge_id)
        progress.update()
    logging.info("judge stats: %s", judge.stats.summary())
    print(f"judged {len(chunks)} chunks with {judge.judge_id}; {unknown} unknown verdicts")


if __name__ == "__main__":
    common.run(main)
