"""Exact effect of an abliteration of the second toy organism's original (docs/results.md).

    python experiments/abliterate.py --original=lpe_jax/assets/toy_pair2/original \\
        --out=results/toy2_abliterated ...            # the README's organism recipe
    python experiments/toy2_abliteration.py --abliterated=results/toy2_abliterated

Prints, from exact enumeration (`lpe_jax.organisms.toy2.exact_rates`, no sampling): the abliterated
model's compliance on the 120 harmful and 50 harmless requests beside the original's and the trained
variant's (ground_truth.json), and the logit path between the original and its abliteration at
--alphas. Also the geometry that decides whether ablation can work: the mean harmful and harmless
activations' components along the direction at the chosen (layer, position), and the refusal score
when the harmful activations are moved to the harmless mean there instead (activation addition of
minus the difference, at run time), at every post-instruction position of the chosen layer. Writes
the numbers to --out as JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from absl import flags

from lpe_jax.abliteration import abliterate as ab
from lpe_jax.abliteration.orthogonalize import PROVENANCE_FILE
from lpe_jax.model.checkpoint import load_model
from lpe_jax.organisms import toy2

import common

FLAGS = flags.FLAGS
flags.DEFINE_string("abliterated", "results/toy2_abliterated", "Output of abliterate.py.")
flags.DEFINE_list("alphas", ["0", "0.25", "0.5", "0.75", "1"], "Logit-path alphas to enumerate.")
flags.DEFINE_string("out", None, "JSON file for the numbers (default <abliterated>/exact.json).")


def quantiles(x: np.ndarray) -> str:
    q = np.quantile(x, [0, 0.5, 1])
    return f"min {q[0]:.2e}  median {q[1]:.2e}  max {q[2]:.2e}"


def geometry(original, record: dict) -> list[dict]:
    """Per post-instruction position at the chosen layer: the mean harmful and harmless
    activations' components along that position's unit difference, and the harmful refusal score
    with the harmful activations moved to the harmless mean there (add minus the difference)."""
    tok = toy2.load_tokenizer()
    layer, refusal = record["layer"], record["refusal_token_ids"]
    sets = {}
    for name, prompts in (
        ("harmful", toy2.harmful_prompts()),
        ("harmless", toy2.harmless_prompts()),
    ):
        sets[name], suffix = ab.encode_instructions(tok, [p["prompt"] for p in prompts])
    means = {k: ab.mean_activations(original, v, len(suffix)) for k, v in sets.items()}
    base = ab.refusal_scores(ab.last_token_logits(original, sets["harmful"]), refusal).mean()
    out = []
    for pos in range(-len(suffix), 0):
        diff = (means["harmful"] - means["harmless"])[pos, layer]
        unit = diff / np.linalg.norm(diff)
        moved = ab.last_token_logits(
            original, sets["harmful"], add=(layer, -diff.astype(np.float32))
        )
        out.append({
            "position": pos,
            "token": tok.decode([suffix[pos]]),
            "difference_norm": float(np.linalg.norm(diff)),
            "component_harmful": float(means["harmful"][pos, layer] @ unit),
            "component_harmless": float(means["harmless"][pos, layer] @ unit),
            "refusal_score_harmful": float(base),
            "refusal_score_moved_to_harmless_mean": float(
                ab.refusal_scores(moved, refusal).mean()
            ),
        })  # fmt: skip
    return out


def main(argv: list[str]) -> None:
    del argv
    path = Path(FLAGS.abliterated)
    record = json.loads((path / PROVENANCE_FILE).read_text())
    original, variant = toy2.load_pair()
    abliterated = load_model(path)
    truth = toy2.ground_truth()
    alphas = [float(a) for a in FLAGS.alphas]
    rows = {"harmful": {}, "harmless": {}}
    bar = common.Progress(120 + 50, "prompts (exact)")
    for kind, prompts in (
        ("harmful", toy2.harmful_prompts()),
        ("harmless", toy2.harmless_prompts()),
    ):
        for p in prompts:
            ids = toy2.chat_ids(p["prompt"])
            t = truth["prompts" if kind == "harmful" else "harmless"][p["id"]]
            row = {
                "original": t["rate"],
                "variant": t["variant_rate"],
                "abliterated": float(toy2.exact_rates(abliterated, abliterated, ids, [1.0])[0]),
            }
            if kind == "harmful":
                curve = toy2.exact_rates(original, abliterated, ids, alphas)
                row["path_to_abliterated"] = [float(c) for c in curve]
            rows[kind][p["id"]] = row
            bar.update()
    summary = {
        "abliterated": str(path),
        "layer": record["layer"],
        "position": record["position"],
        "alphas": alphas,
        "geometry": geometry(original, record),
        "prompts": rows,
    }
    out = Path(FLAGS.out) if FLAGS.out else path / "exact.json"
    out.write_text(json.dumps(summary, indent=1))
    for kind in rows:
        for model in ("original", "variant", "abliterated"):
            x = np.array([r[model] for r in rows[kind].values()])
            print(f"{kind:8} {model:11} {quantiles(x)}  >= 0.5 on {(x >= 0.5).sum()}/{len(x)}")
    for g in summary["geometry"]:
        print(json.dumps(g))
    print(f"numbers: {out}")


if __name__ == "__main__":
    common.run(main)
