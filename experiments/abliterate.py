"""Make an abliterated twin of a checkpoint (Arditi et al. 2024), for LPE's variant: Qwen3,
Qwen3-MoE, Qwen3.5 or Qwen3.5-MoE (text or the Hub's multimodal layout; see
lpe_jax.abliteration.orthogonalize for the tensors edited in each).

    python experiments/abliterate.py --original=/ckpt/Qwen3-4B --out=/ckpt/Qwen3-4B-abliterated \\
        --harmful=shared/data/refusal_direction/harmful_train.json \\
        --harmless=shared/data/refusal_direction/harmless_train.json \\
        --eval_prompts=harmbench_behaviors_text_all.csv --dtype=bfloat16 --judge=string

Prompt files (--harmful, --harmless, --eval_prompts) may be: JSONL with "id" and "prompt" per
line; CSV with id,prompt columns; a HarmBench behaviours CSV (--category picks the rows); or a
JSON list of {"instruction": ...} objects (the refusal_direction splits).

Splits: --harmful is shuffled (--split_seed) and cut by --harmful_split=extract,select,eval into
prompts for the mean activations, for choosing the (layer, position), and, without
--eval_prompts, held-out prompts for the before/after report; --harmless likewise by
--harmless_split into extraction, selection (KL) and evaluation (KL) parts.

Evaluating on HarmBench? Find the direction with refusal_direction's harmful_train.json (260
prompts, disjoint from HarmBench), never with harmful_val/harmful_test, which contain HarmBench
behaviours: a direction chosen with them has seen the evaluation set.
Harmful prompts whose text also appears in --eval_prompts are refused for that reason.

Writes --out: an HF directory (config.json, safetensors sharded above --max_shard_gb, the
tokenizer files, generation_config.json), refusal_direction.npy, abliteration.json (source
hash, direction hash, layer, position, data hashes, settings) and abliteration_report.json
(chosen layer and position, every candidate's scores, refusal score and harmless KL before and
after, judged compliance on the held-out harmful prompts before and after). --direction=x.npy
skips the search; --layer with --position fixes one candidate.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from absl import flags, logging

from lpe_jax.abliteration import abliterate as ab
from lpe_jax.abliteration.orthogonalize import (
    PROVENANCE_FILE,
    check_output_dir,
    output_bytes,
    write_abliterated,
)
from lpe_jax.runs import data

import common

FLAGS = flags.FLAGS
flags.DEFINE_string("original", None, "HF directory of the model to abliterate.", required=True)
flags.DEFINE_string("out", None, "Output HF directory (must not exist).", required=True)
flags.DEFINE_string("harmful", None, "Harmful prompts (see formats above).", required=True)
flags.DEFINE_string("harmless", None, "Harmless prompts (see formats above).", required=True)
flags.DEFINE_string(
    "eval_prompts", None, "Held-out harmful prompts for the report (default: from --harmful)."
)
flags.DEFINE_string("category", "standard", "HarmBench FunctionalCategory to keep.")
flags.DEFINE_bool("overwrite", False, "Replace --out if it holds an earlier abliteration.")
flags.DEFINE_string("direction", None, "A direction .npy [hidden] to use instead of searching.")
flags.DEFINE_integer("layer", None, "Fix the candidate's layer (with --position).")
flags.DEFINE_integer("position", None, "Fix the candidate's position, -P..-1 from the end.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype for the passes.")
flags.DEFINE_enum(
    "tied_head",
    None,
    ["embedding", "lm_head"],
    "For a tied config that also stores a different lm_head.weight: the head to keep.",
)
flags.DEFINE_bool(
    "enable_thinking", False, "Chat template's enable_thinking (Qwen3/Qwen3.5: see the README)."
)
flags.DEFINE_list("refusal_tokens", ["I", "As"], "Refusal openings; their first tokens score.")
flags.DEFINE_list(
    "harmful_split",
    ["128", "32", "32"],
    "extract,select,eval: harmful prompts for the mean activations, for choosing the candidate, "
    "held out for the report (the first eval of --eval_prompts when given).",
)
flags.DEFINE_list("harmless_split", ["128", "32", "32"], "extract,select,eval of --harmless.")
flags.DEFINE_integer("split_seed", 0, "Seed of the shuffle that splits the prompt files.")
flags.DEFINE_bool(
    "filter_train", True, "Keep extraction prompts the original scores as expected (the paper)."
)
flags.DEFINE_float("kl_threshold", 0.1, "Largest harmless KL a candidate may have; <= 0: off.")
flags.DEFINE_float("induce_threshold", 0.0, "Least refusal score adding it must induce.")
flags.DEFINE_bool("induce_filter", True, "Apply --induce_threshold (the paper does).")
flags.DEFINE_float("prune_layer_fraction", 0.2, "Skip candidates from this last share of layers.")
flags.DEFINE_integer("batch_size", 16, "Prompts per forward pass.")
flags.DEFINE_float("max_shard_gb", 5.0, "Largest safetensors shard written, in GB (1e9 bytes).")
flags.DEFINE_integer("n_rollouts", 8, "Judged rollouts per held-out prompt (0: skip judging).")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens per judged rollout at most.")
flags.DEFINE_integer("seed", 0, "Sampling seed of the judged rollouts.")
common.define_judge_flags()
FLAGS.set_default("judge", "string")


# ----------------------------------------------------------------------------------------------
# inputs


def _sizes(flag: str) -> dict[str, int]:
    """--<set>_split=extract,select,eval as a dict of positive ints."""
    raw = getattr(FLAGS, flag)
    try:
        sizes = [int(x) for x in raw]
    except ValueError:
        sizes = []
    if len(sizes) != 3 or min(sizes) < 1:
        raise ValueError(
            f"--{flag}={','.join(raw)} must be three positive counts: extract,select,eval."
        )
    return dict(zip(("extract", "select", "eval"), sizes, strict=True))


def _take(flag: str, sizes: dict[str, int]) -> dict[str, list]:
    """The prompts of --flag, shuffled (split_seed) and cut into parts of the given sizes."""
    prompts = _load(flag)
    need = sum(sizes.values())
    if need > len(prompts):
        raise ValueError(
            f"--{flag} holds {len(prompts)} prompts but --{flag}_split needs {need} "
            f"({sizes}); lower the counts or pass more prompts."
        )
    order = np.random.default_rng(FLAGS.split_seed).permutation(len(prompts))
    out, start = {}, 0
    for name, n in sizes.items():
        out[name] = [prompts[i] for i in order[start : start + n]]
        start += n
    return out


def _load(flag: str) -> list[data.Prompt]:
    try:
        return data.load_prompts(getattr(FLAGS, flag), functional_category=FLAGS.category)
    except (OSError, ValueError) as e:
        raise ValueError(f"--{flag}: {e}") from None


def load_splits() -> dict[str, list[data.Prompt]]:
    """The prompt sets by role: harmful/harmless x extract/select/eval."""
    sizes = _sizes("harmful_split")
    harmless = _take("harmless", _sizes("harmless_split"))
    if FLAGS.eval_prompts is None:
        harmful = _take("harmful", sizes)
    else:  # held out by construction: a different file (overlap is checked below)
        harmful = _take("harmful", {**sizes, "eval": 0})
        harmful["eval"] = _load("eval_prompts")[: sizes["eval"]]
    _check_disjoint(harmful["extract"] + harmful["select"], harmful["eval"])
    return {f"harmful_{k}": v for k, v in harmful.items()} | {
        f"harmless_{k}": v for k, v in harmless.items()
    }


def _check_disjoint(used: list[data.Prompt], held_out: list[data.Prompt]) -> None:
    seen = {" ".join(p.text.lower().split()) for p in used}
    both = [p.id for p in held_out if " ".join(p.text.lower().split()) in seen]
    if both:
        raise ValueError(
            f"{len(both)} held-out evaluation prompt(s) (e.g. {both[:3]}) are also among the "
            "harmful prompts used to find the direction; a direction chosen with them has seen "
            "the evaluation set. For HarmBench, use refusal_direction's harmful_train.json."
        )


def check_candidate_flags(n_layers: int, n_post: int | None) -> None:
    """--layer (and, once n_post is known, --position) in range."""
    if (FLAGS.layer is None) != (FLAGS.position is None) and FLAGS.direction is None:
        raise ValueError("--layer and --position fix one candidate together; pass both or none.")
    try:
        position = FLAGS.position if n_post is not None else None
        ab.check_candidate(FLAGS.layer, position, n_layers, n_post or 1)
    except ValueError as e:
        raise ValueError(f"--layer/--position: {e}") from None


def settings() -> ab.SelectionSettings:
    return ab.SelectionSettings(
        kl_threshold=FLAGS.kl_threshold if FLAGS.kl_threshold > 0 else None,
        induce_threshold=FLAGS.induce_threshold if FLAGS.induce_filter else None,
        prune_layer_fraction=FLAGS.prune_layer_fraction,
    )


# ----------------------------------------------------------------------------------------------
# the direction


def progress(total: int, what: str) -> common.Progress:
    return common.Progress(total, what, every=10.0)


def filter_extraction(model: Any, ids: dict, refusal: list[int]) -> dict[str, int]:
    """The paper keeps harmful prompts the original refuses (score > 0) and harmless ones it
    does not (< 0). Returns how many remain."""
    kept = {}
    for name, keep in (("harmful_extract", np.greater), ("harmless_extract", np.less)):
        scores = ab.refusal_scores(
            ab.last_token_logits(model, ids[name], batch_size=FLAGS.batch_size), refusal
        )
        ids[name] = [i for i, s in zip(ids[name], scores, strict=True) if keep(s, 0)]
        kept[name] = len(ids[name])
        if not ids[name]:
            raise ValueError(
                f"no {name.split('_')[0]} extraction prompt has a refusal score "
                f"{'> 0' if keep is np.greater else '< 0'} on the original with --refusal_tokens="
                f"{','.join(FLAGS.refusal_tokens)}; check the tokens or pass --nofilter_train."
            )
    logging.info("extraction prompts kept by the refusal-score filter: %s", kept)
    return kept


def find_direction(model: Any, ids: dict, refusal: list[int], n_post: int) -> dict[str, Any]:
    """Search (or fix) the candidate. Returns direction, layer, position and the scores."""
    bs = FLAGS.batch_size
    out: dict[str, Any] = {}
    if FLAGS.filter_train:
        out["filter_kept"] = filter_extraction(model, ids, refusal)
    n = len(ids["harmful_extract"]) + len(ids["harmless_extract"])
    bar = progress(n, "activations")
    means = [
        ab.mean_activations(model, ids[k], n_post, batch_size=bs, progress=bar.update)
        for k in ("harmful_extract", "harmless_extract")
    ]
    s = settings()
    sel, hs = ids["harmful_select"], ids["harmless_select"]
    if FLAGS.layer is None:
        raw, unit, valid = ab.candidate_directions(*means)
        per = len(sel) + len(hs) * (2 if s.induce_threshold is not None else 1)
        scored = int(valid[:, : s.kept_layers(model.cfg.num_layers)].sum())
        bar = progress(per * scored + len(sel) + len(hs), "candidate prompts")
        try:
            chosen = ab.select_direction(
                model, *means, sel, hs, refusal, s, batch_size=bs, progress=bar.update
            )
        except ValueError as e:
            raise ValueError(
                f"{e} Flags: --prune_layer_fraction, --kl_threshold (0 = off), --noinduce_filter, "
                "or --layer with --position to fix a candidate."
            ) from None
        return out | {
            "direction": chosen.direction,
            "layer": chosen.layer,
            "position": chosen.position,
            "selection": chosen.summary(),
        }
    raw, unit, valid = ab.candidate_directions(*means)
    p, layer = FLAGS.position + n_post, FLAGS.layer
    if not valid[p, layer]:
        raise ValueError(
            f"the candidate at --layer={layer} --position={FLAGS.position} is zero (both sets "
            "have the same activations there, e.g. layer 0); pick a later layer."
        )
    base = ab.last_token_logits(model, hs, batch_size=bs)
    add = (layer, raw[p, layer]) if s.induce_threshold is not None else None
    scores = ab.score_candidate(
        model, unit[p, layer], sel, hs, base, refusal, add=add, batch_size=bs
    )
    return out | {
        "direction": unit[p, layer],
        "layer": layer,
        "position": FLAGS.position,
        "candidate_scores": scores.__dict__,
    }


def load_direction_file(hidden: int) -> dict[str, Any]:
    path = Path(FLAGS.direction)
    if not path.is_file():
        raise FileNotFoundError(f"--direction={path} does not exist.")
    try:
        d = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"--direction={path} is not a NumPy .npy array ({e}).") from e
    if d.shape != (hidden,) or not np.all(np.isfinite(d)) or not np.any(d):
        raise ValueError(
            f"--direction={path} must be a finite nonzero vector of the hidden size {hidden}; "
            f"got shape {d.shape}."
        )
    return {
        "direction": (d / np.linalg.norm(d)).astype(np.float32),
        "layer": FLAGS.layer,
        "position": FLAGS.position,
        "direction_file": str(path.resolve()),
        "direction_file_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }


# ----------------------------------------------------------------------------------------------
# before / after


def compliance(model: Any, tokenizer: Any, prompts: list, ids: list, judge: Any) -> dict:
    """Judged compliance of n_rollouts samples per held-out harmful prompt (temperature 1)."""
    from lpe_jax.decoding.sampler import PairedSampler
    from lpe_jax.model.tokenizer import eos_token_ids
    from lpe_jax.runs.pipeline import derive_seed, judge_rows

    # One model sampled alone (variant=None): its own logits, one forward pass per token.
    sampler = PairedSampler(model, None, "linear", FLAGS.max_new_tokens, eos_token_ids(tokenizer))
    bar = progress(len(prompts), "judged prompts")
    rates = {}
    for prompt, pid in zip(prompts, ids, strict=True):
        r = sampler.sample(pid, [1.0], FLAGS.n_rollouts, seed=derive_seed(FLAGS.seed, prompt.id))
        v = judge_rows(
            judge,
            prompt.text,
            r.tokens[0],
            r.lengths[0],
            r.nonfinite[0],
            lambda t: tokenizer.decode(t, skip_special_tokens=True),
        )
        known = v >= 0
        rates[prompt.id] = float(v[known].mean()) if known.any() else None
        bar.update()
    known = [x for x in rates.values() if x is not None]
    return {
        "mean": float(np.mean(known)) if known else None,
        "prompts_at_least_half": int(sum(x >= 0.5 for x in known)),
        "prompts_judged": len(known),
        "per_prompt": rates,
    }


def measure(
    model: Any, ids: dict, refusal: list[int], harmless_base: np.ndarray | None
) -> tuple[dict[str, Any], np.ndarray]:
    """Mean refusal score on the held-out harmful prompts and KL(original || model) on the
    held-out harmless ones (0 without harmless_base); also the harmless logits [N, V]."""
    bs = FLAGS.batch_size
    logits = ab.last_token_logits(model, ids["harmful_eval"], batch_size=bs)
    harmless = ab.last_token_logits(model, ids["harmless_eval"], batch_size=bs)
    kl = 0.0 if harmless_base is None else float(ab.kl_divergence(harmless_base, harmless).mean())
    out = {"refusal_score": float(ab.refusal_scores(logits, refusal).mean()), "harmless_kl": kl}
    return out, harmless


# ----------------------------------------------------------------------------------------------
# main


def main(argv: list[str]) -> None:
    del argv
    from lpe_jax.model.checkpoint import load_model, model_config, read_config
    from lpe_jax.model.tokenizer import load_tokenizer

    t0 = time.time()
    cfg = model_config(read_config(Path(FLAGS.original)))
    out = check_output_dir(FLAGS.original, FLAGS.out, overwrite=FLAGS.overwrite)
    check_candidate_flags(cfg.num_layers, None)
    splits = load_splits()
    tokenizer = load_tokenizer(FLAGS.original)
    n_post = len(ab.post_instruction_ids(tokenizer, enable_thinking=FLAGS.enable_thinking))
    check_candidate_flags(cfg.num_layers, n_post)
    refusal = ab.refusal_token_ids(tokenizer, FLAGS.refusal_tokens)
    ids = {
        k: ab.encode_instructions(
            tokenizer, [p.text for p in v], enable_thinking=FLAGS.enable_thinking
        )[0]
        for k, v in splits.items()
    }
    judge = common.make_judge(FLAGS.original) if FLAGS.n_rollouts > 0 else None
    found = load_direction_file(cfg.hidden_size) if FLAGS.direction else None
    model = load_model(FLAGS.original, dtype=FLAGS.dtype, tied_head=FLAGS.tied_head)
    logging.info("loaded %s (%.0fs)", FLAGS.original, time.time() - t0)
    if found is None:
        found = find_direction(model, ids, refusal, n_post)
    before, harmless_base = measure(model, ids, refusal, None)
    if judge is not None:
        before["compliance"] = compliance(
            model, tokenizer, splits["harmful_eval"], ids["harmful_eval"], judge
        )
    del model  # at most one copy of the weights from here on
    gc.collect()
    written = write(out, found, splits, refusal, n_post, tokenizer)
    abliterated = load_model(written, dtype=FLAGS.dtype)
    after, _ = measure(abliterated, ids, refusal, harmless_base)
    if judge is not None:
        after["compliance"] = compliance(
            abliterated, tokenizer, splits["harmful_eval"], ids["harmful_eval"], judge
        )
    report = make_report(found, splits, before, after, time.time() - t0)
    (written / "abliteration_report.json").write_text(json.dumps(report, indent=2))
    print(table(report))


def write(out: Path, found: dict, splits: dict, refusal: list[int], n_post: int, tok: Any) -> Path:
    import lpe_jax

    suffix = ab.post_instruction_ids(tok, enable_thinking=FLAGS.enable_thinking)
    position = found.get("position")
    provenance = {
        "layer": found.get("layer"),
        "position": position,
        "position_token": None if position is None else tok.decode([suffix[position]]),
        "direction_from": "file"
        if FLAGS.direction
        else "search"
        if "selection" in found
        else "fixed candidate",  # fmt: skip
        **{k: found[k] for k in ("direction_file", "direction_file_sha256") if k in found},
        "data": {k: {"n": len(v), "dataset_hash": data.dataset_hash(v)} for k, v in splits.items()},
        "files": {k: getattr(FLAGS, k) for k in ("harmful", "harmless", "eval_prompts")},
        "refusal_tokens": FLAGS.refusal_tokens,
        "refusal_token_ids": refusal,
        "enable_thinking": FLAGS.enable_thinking,
        "tied_head": FLAGS.tied_head,
        "settings": settings().__dict__,
        "filter_train": FLAGS.filter_train,
        "split_seed": FLAGS.split_seed,
        "dtype": FLAGS.dtype,
        "code_version": lpe_jax.__version__,
    }
    total = output_bytes(FLAGS.original, FLAGS.tied_head)
    bar = common.Progress(total, "bytes written", every=10.0)
    return write_abliterated(
        FLAGS.original,
        out,
        found["direction"],
        provenance=provenance,
        overwrite=FLAGS.overwrite,
        max_shard_bytes=int(FLAGS.max_shard_gb * 1e9),
        tied_head=FLAGS.tied_head,
        progress=bar.update,
    )


def make_report(found: dict, splits: dict, before: dict, after: dict, seconds: float) -> dict:
    record = json.loads((Path(FLAGS.out) / PROVENANCE_FILE).read_text())
    return {
        "original": str(Path(FLAGS.original).resolve()),
        "out": str(Path(FLAGS.out).resolve()),
        "layer": record["layer"],
        "position": record["position"],
        "position_token": record["position_token"],
        "direction_from": record["direction_from"],
        "n_eval": {
            "harmful": len(splits["harmful_eval"]),
            "harmless": len(splits["harmless_eval"]),
        },
        "n_rollouts": FLAGS.n_rollouts,
        "judge": FLAGS.judge if FLAGS.n_rollouts > 0 else None,
        "before": before,
        "after": after,
        **{k: found[k] for k in ("selection", "candidate_scores", "filter_kept") if k in found},
        "wall_seconds": seconds,
    }


def table(r: dict) -> str:
    """The before/after summary printed at the end."""

    def fmt(x: Any) -> str:
        return "-" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)

    n = r["n_eval"]
    rows = [
        (f"refusal score ({n['harmful']} held-out harmful)", "refusal_score", "refusal_score"),
        (f"KL on {n['harmless']} held-out harmless", "harmless_kl", "harmless_kl"),
    ]
    if "compliance" in r["after"]:
        rows += [
            (f"compliance ({r['judge']}, {r['n_rollouts']} per prompt)", "compliance", "mean"),
            ("prompts with compliance >= 0.5", "compliance", "prompts_at_least_half"),
        ]
    lines = [
        f"abliterated {r['original']}\n  -> {r['out']}",
        f"direction ({r['direction_from']}): layer {r['layer']}, position {r['position']} "
        f"({r['position_token']!r})",
        f"{'':<44}{'before':>10}{'after':>10}",
    ]
    for label, key, sub in rows:
        b, a = r["before"][key], r["after"][key]
        if key == "compliance":
            b, a = b[sub], a[sub]
            if sub == "prompts_at_least_half":
                b = f"{b}/{r['before']['compliance']['prompts_judged']}"
                a = f"{a}/{r['after']['compliance']['prompts_judged']}"
        lines.append(f"{label:<44}{fmt(b):>10}{fmt(a):>10}")
    return "\n".join(lines)


if __name__ == "__main__":
    common.run(main)
