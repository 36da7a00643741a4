"""The direction path vs the logit path on the second toy organism (docs/results.md).

    python experiments/toy2_direction_path.py \\
        --direction=results/toy2_abliterated/refusal_direction.npy

Both paths join the organism's original (alpha = 1) and its abliteration along `--direction`
(alpha = 0): the logit path mixes the two models' logits, alpha l_o + (1 - alpha) l_a; the
direction path is one model, the original with a fraction 1 - alpha of the direction projected out
of its residual stream (`lpe_jax.abliteration.direction_path`). Prints, per prompt:
- both exact compliance curves r(alpha) (enumeration, no sampling: M(alpha) is the original
  orthogonalized at strength 1 - alpha, tested equal), and where a line through log10 r at alpha
  0 and 0.5 lands at alpha = 1 against the truth r(1) (how straight each curve is);
- for --check_prompt, the direction path's sampled rate at each alpha (RolloutEngine, the rule
  over tokens) beside its exact rate: the engine draws from M(alpha);
- rollouts/s and tokens/s of both paths on the engine (same blocks, slots and steps per call;
  compilation excluded: each engine runs the same shapes once before it is timed).
Writes the numbers to --out as JSON when given.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from absl import flags
from scipy import stats

from lpe_jax.abliteration.direction_path import DirectionalQwen3
from lpe_jax.abliteration.orthogonalize import orthogonalize_model
from lpe_jax.decoding.engine import RolloutEngine, RowBlock
from lpe_jax.organisms import toy2

import common

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "direction",
    "results/toy2_abliterated/refusal_direction.npy",
    "The refusal direction [96] (.npy; abliterate.py writes it beside the abliterated model).",
)
flags.DEFINE_list(
    "prompt_ids", ["h065", "h001", "h083", "ok00"], "Prompt ids (harmful or harmless)."
)
flags.DEFINE_list("alphas", ["0", "0.25", "0.5", "0.75", "1"], "Alphas of the exact curves.")
flags.DEFINE_string("check_prompt", "ok00", "Prompt whose direction-path draws are checked.")
flags.DEFINE_integer("check_rows", 512, "Rollouts per alpha for the sampling check.")
flags.DEFINE_integer("bench_rows", 256, "Rollouts per (prompt, alpha) for the throughput runs.")
flags.DEFINE_integer("max_new_tokens", 24, "Tokens per rollout (the rule settles within 18).")
flags.DEFINE_integer("slots", 64, "Engine slots.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("out", None, "JSON file for the numbers (optional).")


def prompt_texts(ids: list[str]) -> dict[str, str]:
    every = {p["id"]: p["prompt"] for p in toy2.harmful_prompts() + toy2.harmless_prompts()}
    missing = [i for i in ids if i not in every]
    if missing:
        raise ValueError(
            f"--prompt_ids: unknown ids {missing}; harmful are h000.., harmless ok00.."
        )
    return {i: every[i] for i in ids}


def exact_curves(original, direction, ids: np.ndarray, alphas: list[float]) -> dict:
    abliterated = orthogonalize_model(original, direction)
    logit = toy2.exact_rates(original, abliterated, ids, alphas)
    direct = []
    for a in alphas:
        m = orthogonalize_model(original, direction, strength=1.0 - a)
        direct.append(float(toy2.exact_rates(m, m, ids, [1.0])[0]))
    return {"logit": [float(r) for r in logit], "direction": direct}


def chord_error(alphas: list[float], rates: list[float]) -> float:
    """Decades between r(1) and the line through log10 r at alpha 0 and 0.5, at alpha 1."""
    at = {a: np.log10(r) for a, r in zip(alphas, rates, strict=True)}
    return float(2 * at[0.5] - at[0.0] - at[1.0])


def engine_for(path: str, original, direction) -> RolloutEngine:
    eos = list(toy2.EOS_TOKEN_IDS)
    if path == "direction":
        model, variant = DirectionalQwen3.wrap(original, direction), None
    else:
        model, variant = original, orthogonalize_model(original, direction)
    return RolloutEngine(
        model, variant, "linear", FLAGS.max_new_tokens, eos, slots=FLAGS.slots, max_prompts=32
    )


def draw(engine: RolloutEngine, texts: dict[str, str], alphas: list[float], rows: int, seed: int):
    for pid, text in texts.items():
        for a in alphas:
            engine.submit(RowBlock(pid, toy2.chat_ids(text), a, seed, 0, rows, tag=(pid, a)))
    return {r.block.tag: r.rollouts for r in engine.run()}


def sampling_check(
    original, direction, text: str, alphas: list[float], exact: list[float]
) -> list[dict]:
    """The direction path's draws at each alpha (rule over tokens) against M(alpha)'s exact rate:
    k, n, 95% interval and the two-sided binomial p-value of the exact rate."""
    engine = engine_for("direction", original, direction)
    got = draw(engine, {"p": text}, alphas, FLAGS.check_rows, FLAGS.seed)
    rule = toy2.TokenRule()
    out = []
    for a, r in zip(alphas, exact, strict=True):
        k = int(sum(rule.complied(row) for row in got[("p", a)].tokens[0]))
        test = stats.binomtest(k, FLAGS.check_rows, r)
        ci = test.proportion_ci(0.95)
        out.append({"alpha": a, "k": k, "n": FLAGS.check_rows, "exact": r, "p": test.pvalue})
        out[-1]["ci"] = [ci.low, ci.high]
    return out


def throughput(original, direction, texts: dict[str, str], alphas: list[float]) -> dict:
    out = {}
    for path in ("logit", "direction"):
        engine = engine_for(path, original, direction)
        draw(engine, texts, alphas, FLAGS.bench_rows, FLAGS.seed + 1)  # compile + warm-up
        prefills = engine.stats.prefills  # prompts stay resident: the timed runs prefill none
        best = None
        for rep in range(2):
            before = dict(vars(engine.stats))
            start = time.perf_counter()
            got = draw(engine, texts, alphas, FLAGS.bench_rows, FLAGS.seed + 2 + rep)
            secs = time.perf_counter() - start
            rows = sum(r.tokens.shape[1] for r in got.values())
            tokens = engine.stats.tokens - before["tokens"]
            run = {"seconds": secs, "rollouts_per_s": rows / secs, "tokens_per_s": tokens / secs}
            run["prefills"] = prefills
            best = run if best is None or secs < best["seconds"] else best
        out[path] = best
    return out


def main(argv: list[str]) -> None:
    del argv
    path = Path(FLAGS.direction)
    if not path.is_file():
        raise ValueError(f"--direction {path} does not exist; run the README's organism recipe.")
    direction = np.load(path)
    original, _ = toy2.load_pair()
    alphas = [float(a) for a in FLAGS.alphas]
    if 0.0 not in alphas or 0.5 not in alphas or 1.0 not in alphas:
        raise ValueError("--alphas must include 0, 0.5 and 1 (the chord check uses them).")
    texts = prompt_texts(FLAGS.prompt_ids)
    curves = {}
    print("exact r(alpha): logit path | direction path (alpha = 0: abliterated, 1: original)")
    print("prompt  " + "  ".join(f"{a:^19g}" for a in alphas) + "  chord error (decades)")
    for pid, text in texts.items():
        c = exact_curves(original, direction, toy2.chat_ids(text), alphas)
        c["chord"] = {k: chord_error(alphas, c[k]) for k in ("logit", "direction")}
        curves[pid] = c
        cells = "  ".join(
            f"{lo:.2e}|{d:.2e}" for lo, d in zip(c["logit"], c["direction"], strict=True)
        )
        print(f"{pid:6}  {cells}  {c['chord']['logit']:+.3f} | {c['chord']['direction']:+.3f}")
    check_text = prompt_texts([FLAGS.check_prompt])[FLAGS.check_prompt]
    exact = exact_curves(original, direction, toy2.chat_ids(check_text), alphas)["direction"]
    check = sampling_check(original, direction, check_text, alphas, exact)
    print(f"direction path draws on {FLAGS.check_prompt} ({FLAGS.check_rows} per alpha):")
    for c in check:
        print(
            f"  alpha {c['alpha']:g}: sampled {c['k'] / c['n']:.3f} "
            f"[{c['ci'][0]:.3f}, {c['ci'][1]:.3f}]  exact {c['exact']:.3f}  p = {c['p']:.3f}"
        )
    least = min(c["p"] for c in check) * len(check)
    print(f"  smallest p x {len(check)} alphas (Bonferroni): {least:.3f}")
    speed = throughput(original, direction, texts, alphas)
    for name, s in speed.items():
        print(
            f"{name:9} path: {s['rollouts_per_s']:.1f} rollouts/s, {s['tokens_per_s']:.0f} "
            f"tokens/s ({s['seconds']:.2f} s, {s['prefills']} prefills)"
        )
    ratio = speed["direction"]["tokens_per_s"] / speed["logit"]["tokens_per_s"]
    print(f"direction / logit tokens/s: {ratio:.2f}")
    if FLAGS.out:
        summary = {"alphas": alphas, "curves": curves, "check": check, "throughput": speed}
        Path(FLAGS.out).write_text(json.dumps(summary, indent=1))
        print(f"numbers: {FLAGS.out}")


if __name__ == "__main__":
    common.run(main)
