"""Time and peak memory of abliterating a Qwen3-shaped checkpoint of random weights on this host.

    python experiments/benchmark_abliterate.py --preset=qwen3_4b --workdir=/tmp/abl_bench

1. Writes a random bf16 checkpoint of the preset tensor by tensor (the whole model is never in
   memory), sharded like the real ones, with the tokenizer files of --tokenizer.
2. Runs experiments/abliterate.py on it with one fixed (layer, position) candidate, a few
   prompts and no judged rollouts, polling the child's /proc/<pid>/status for its peak
   anonymous and file-backed resident memory; getrusage gives its peak RSS.
3. Prints wall time, peak memory and the checkpoint size; deletes --workdir unless --keep.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import ml_dtypes
import numpy as np
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lpe_jax.model import qwen3  # noqa: E402
from lpe_jax.model.checkpoint import config_to_hf, weight_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "qwen3_4b", list(qwen3.PRESETS), "Model shape (qwen3.PRESETS).")
flags.DEFINE_string("workdir", None, "Scratch directory (must not exist).", required=True)
flags.DEFINE_string("tokenizer", str(SHARED / "qwen3_tokenizer"), "Tokenizer files to ship.")
flags.DEFINE_string("harmful", str(SHARED / "refusal_direction" / "harmful_train.json"), "")
flags.DEFINE_string("harmless", str(SHARED / "refusal_direction" / "harmless_train.json"), "")
flags.DEFINE_integer("n_prompts", 4, "Prompts per set for extraction (half for select/eval).")
flags.DEFINE_integer("layer", None, "Candidate layer (default: the middle one).")
flags.DEFINE_integer("position", -1, "Candidate position.")
flags.DEFINE_integer("batch_size", 4, "Prompts per forward pass.")
flags.DEFINE_bool("keep", False, "Keep the workdir (checkpoints) afterwards.")

_BLOCK = 1 << 24  # values drawn at once


def write_random_checkpoint(cfg: qwen3.Qwen3Config, path: Path, shard_bytes: int = 5 * 10**9):
    """bf16 safetensors of N(0, 0.02) matrices and unit norms, written tensor by tensor."""
    path.mkdir(parents=True)
    bf16, rng = np.dtype(ml_dtypes.bfloat16), np.random.default_rng(0)
    names = sorted(weight_table(cfg))
    shapes = {n: weight_table(cfg)[n][1] for n in names}
    shards, size = [[]], 0
    for n in names:
        nbytes = int(np.prod(shapes[n])) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards, size = [*shards, []], 0
        shards[-1].append(n)
        size += nbytes
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, group in zip(files, shards, strict=True):
        header, offset = {}, 0
        for n in group:
            nbytes = int(np.prod(shapes[n])) * 2
            header[n] = {
                "dtype": "BF16",
                "shape": list(shapes[n]),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        with open(path / file, "wb") as fh:
            fh.write(len(blob).to_bytes(8, "little") + blob)
            for n in group:
                total = int(np.prod(shapes[n]))
                if len(shapes[n]) == 1:
                    fh.write(np.ones(total, bf16).tobytes())
                    continue
                for lo in range(0, total, _BLOCK):
                    z = rng.standard_normal(min(_BLOCK, total - lo), dtype=np.float32) * 0.02
                    fh.write(z.astype(bf16).tobytes())
    weight_map = {n: f for f, g in zip(files, shards, strict=True) for n in g}
    index = {"metadata": {"total_size": sum(int(np.prod(s)) * 2 for s in shapes.values())}}
    (path / "model.safetensors.index.json").write_text(
        json.dumps({**index, "weight_map": weight_map})
    )
    (path / "config.json").write_text(json.dumps(config_to_hf(cfg, "bfloat16"), indent=2))
    for f in Path(FLAGS.tokenizer).iterdir():
        if f.suffix in (".json", ".txt", ".jinja"):
            shutil.copy2(f, path / f.name)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def run_abliterate(src: Path, out: Path, cfg: qwen3.Qwen3Config) -> dict[str, float]:
    """Run the script; returns wall seconds and peak memory in GiB."""
    n = FLAGS.n_prompts
    args = [
        f"--original={src}", f"--out={out}", f"--harmful={FLAGS.harmful}",
        f"--harmless={FLAGS.harmless}", f"--harmful_split={n},{max(1, n // 2)},{max(1, n // 2)}",
        f"--harmless_split={n},{max(1, n // 2)},{max(1, n // 2)}",
        f"--layer={FLAGS.layer or cfg.num_layers // 2}",
        f"--position={FLAGS.position}", "--nofilter_train", "--noinduce_filter",
        "--n_rollouts=0", "--dtype=bfloat16", f"--batch_size={FLAGS.batch_size}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.time()
    child = subprocess.Popen(
        [sys.executable, str(ROOT / "experiments" / "abliterate.py"), *args], env=env
    )
    peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}

    def poll() -> None:
        while child.poll() is None:
            for k, v in _status_kb(child.pid).items():
                peak[k] = max(peak[k], v)
            time.sleep(0.2)

    watcher = threading.Thread(target=poll)
    watcher.start()
    rc = child.wait()
    watcher.join()
    if rc != 0:
        raise RuntimeError(f"abliterate.py failed with exit code {rc}")
    gib = 1 / 2**20
    return {
        "wall_s": time.time() - t0,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * gib,
        "peak_anon_gib": peak["RssAnon"] * gib,
        "peak_file_gib": peak["RssFile"] * gib,
    }


def main(argv: list[str]) -> None:
    del argv
    work = Path(FLAGS.workdir)
    if work.exists():
        raise ValueError(f"--workdir={work} exists; pass a new directory (it is deleted after).")
    cfg = qwen3.PRESETS[FLAGS.preset]
    try:
        t0 = time.time()
        write_random_checkpoint(cfg, work / "original")
        size = sum(f.stat().st_size for f in (work / "original").glob("*.safetensors"))
        print(f"wrote {size / 1e9:.2f} GB random {FLAGS.preset} in {time.time() - t0:.0f}s")
        res = run_abliterate(work / "original", work / "abliterated", cfg)
        out = sum(f.stat().st_size for f in (work / "abliterated").glob("*.safetensors"))
        print(
            f"\n{FLAGS.preset}: source {size / 1e9:.2f} GB bf16, abliterated {out / 1e9:.2f} GB; "
            f"wall {res['wall_s']:.0f} s; peak RSS {res['peak_rss_gib']:.2f} GiB "
            f"(anonymous {res['peak_anon_gib']:.2f}, file-backed {res['peak_file_gib']:.2f})"
        )
        print(json.dumps({"preset": FLAGS.preset, "source_bytes": size, **res}))
    finally:
        if not FLAGS.keep and work.exists():
            shutil.rmtree(work)


if __name__ == "__main__":
    app.run(main)
