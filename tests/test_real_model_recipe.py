"""The README's real-model recipe, run as written on stand-in checkpoints (one slow e2e test).

Two tiny Qwen3 checkpoints at Qwen3's real vocabulary (151,936) carry the real Qwen3 tokenizer
files from ../shared/data/qwen3_tokenizer (copied into tmp_path, never into the repository), and
an OpenAI-compatible stub judge listens on 127.0.0.1. The bash block of the README's "Real
models" section is read from README.md itself, so the test breaks when the README drifts; only
paths and sizes are changed (by substitution, each of which must find its text) before its
commands run: estimate -> sample -> judge -> sample the truth -> judge -> evaluate.

The checkpoints are built so that the path is what LPE expects and the labels are known: the
attention and MLP outputs are scaled down and every embedding shares one large direction, so the
last hidden state is nearly the same in every context and lm_head sets the next-token
distribution directly. Each step the original emits <|im_end|> or <|endoftext|> (both EOS ids),
"Sure" with probability 0.05, or any other token; the variant emits "Sure" with probability 0.97.
With 2 new tokens a reply then contains "Sure" with probability 0.05 at alpha = 1, 0.45 at 0.6,
0.98 at 0. The stub decides by the request: for "sure" prompts a reply complies when it contains
"Sure", "refuse" prompts never comply, the "comply" prompt always does (so it fails the screen).
Whether a "sure" prompt passes a one-rollout screen and shows a compliant rollout among 100 is
random (0.95 and 0.995); the seeds are fixed, and the assertions compare the evaluation with the
verdicts actually stored.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shlex
import shutil
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from script_main import run_main

from lpe_jax.evaluation import report
from lpe_jax.model.checkpoint import config_to_hf
from lpe_jax.model.qwen3 import Qwen3Config
from lpe_jax.runs.data import load_prompts
from lpe_jax.runs.store import RolloutStore

ROOT = Path(__file__).resolve().parents[1]
# CI keeps shared data beside the repository (<repo>/../shared); LPE_SHARED_DATA overrides it.
SHARED = Path(os.environ.get("LPE_SHARED_DATA", ROOT.parent / "shared" / "data"))
TOKENIZER = SHARED / "qwen3_tokenizer"
HARMBENCH = SHARED / "harmbench" / "harmbench_behaviors_text_all.csv"

VOCAB = 151_936
IM_END, END_OF_TEXT = 151_645, 151_643
# Roles of the first six standard HarmBench behaviours, by position.
ROLES = ["sure", "comply", "sure", "refuse", "sure", "refuse"]

# README text -> what the test runs instead: paths, sizes, the local judge server.
ALPHAS = ",".join(f"{a:g}" for a in np.round(np.arange(0, 1.0001, 0.05), 2))
SIZES = {
    "--max_new_tokens=512": "--max_new_tokens=2",
    "--n_fit=100": "--n_fit=13",
    f"--alphas={ALPHAS}": "--alphas=0,0.25,0.5,0.75,1",
    "--rollouts=1000": "--rollouts=23",
    "--rollouts=100000": "--rollouts=100",
}
# Sizes the README leaves at their defaults, shrunk per script. Chunks of 16 rows (and their
# remainders, bucketed to 8 or 16) give every script the same two compiled decode loops, which
# the persistent compilation cache then shares between processes: compiling dominates here.
EXTRA = {
    "estimate.py": ["--limit=2", "--max_rows=16"],
    "sample.py": ["--limit=6", "--max_rows=16"],
    "evaluate.py": ["--screen_n=1", "--n_sims=20", "--n_fits=13"],
}

pytestmark = pytest.mark.skipif(
    not (TOKENIZER / "tokenizer.json").is_file() or not HARMBENCH.is_file(),
    reason=f"shared data absent: the Qwen3 tokenizer ({TOKENIZER}) and HarmBench CSV ({HARMBENCH})",
)


def write_checkpoint(path: Path, probs: dict[int, float], seed: int) -> Path:
    """A tiny Qwen3 (vocab 151,936) whose next token is drawn from nearly the same distribution in
    every context: `probs` for the listed ids, the remaining mass spread evenly over the rest."""
    from safetensors.numpy import save_file

    cfg = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        intermediate_size=32,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    h = cfg.hidden_size
    rng = np.random.default_rng(seed)

    def linear(out_dim: int, in_dim: int, scale: float = 1.0) -> np.ndarray:
        return (scale * rng.normal(size=(out_dim, in_dim)) / np.sqrt(in_dim)).astype(np.float32)

    # One large shared direction u = e_0: after the final RMSNorm the hidden state is ~sqrt(h)*u,
    # so lm_head row v = logit_v * u / sqrt(h) gives logit_v in every context.
    embed = 0.01 * rng.normal(size=(VOCAB, h))
    embed[:, 0] += 10.0
    logits = np.full(VOCAB, np.log((1.0 - sum(probs.values())) / (VOCAB - len(probs))))
    for token, p in probs.items():
        logits[token] = np.log(p)
    head = np.zeros((VOCAB, h))
    head[:, 0] = logits / np.sqrt(h)
    q, kv, f = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    pre = "model.layers.0."
    tensors = {
        "model.embed_tokens.weight": embed.astype(np.float32),
        "model.norm.weight": np.ones(h, np.float32),
        "lm_head.weight": head.astype(np.float32),
        pre + "input_layernorm.weight": np.ones(h, np.float32),
        pre + "post_attention_layernorm.weight": np.ones(h, np.float32),
        pre + "self_attn.q_proj.weight": linear(q, h),
        pre + "self_attn.k_proj.weight": linear(kv, h),
        pre + "self_attn.v_proj.weight": linear(kv, h),
        pre + "self_attn.o_proj.weight": linear(h, q, 1e-3),  # outputs scaled down: the
        pre + "self_attn.q_norm.weight": np.ones(cfg.head_dim, np.float32),
        pre + "self_attn.k_norm.weight": np.ones(cfg.head_dim, np.float32),
        pre + "mlp.gate_proj.weight": linear(f, h),
        pre + "mlp.up_proj.weight": linear(f, h),
        pre + "mlp.down_proj.weight": linear(h, f, 1e-3),  # residual stays the embedding
    }
    path.mkdir(parents=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    # Qwen3-4B's own settings: config EOS <|im_end|>, generation EOS both ids.
    config = {**config_to_hf(cfg, "float32"), "bos_token_id": END_OF_TEXT, "eos_token_id": IM_END}
    (path / "config.json").write_text(json.dumps(config))
    gen = {"bos_token_id": END_OF_TEXT, "eos_token_id": [IM_END, END_OF_TEXT], "pad_token_id": 0}
    (path / "generation_config.json").write_text(json.dumps(gen))
    for file in TOKENIZER.iterdir():
        if file.suffix in (".json", ".txt"):
            shutil.copy(file, path / file.name)
    return path


class StubJudge:
    """An OpenAI-compatible /v1/chat/completions server answering the rubric by rule."""

    def __init__(self, roles: dict[str, str]) -> None:
        self.requests = 0
        self.authorized = 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests += 1
                stub.authorized += "Authorization" in self.headers
                text = body["messages"][0]["content"]
                request = re.search(r"<request>\n(.*?)\n</request>", text, re.S).group(1)
                reply = re.search(r"<reply>\n(.*?)\n</reply>", text, re.S).group(1)
                role = roles[request]
                complied = role == "comply" or (role == "sure" and "Sure" in reply)
                answer = f"refused: {int(not complied)}\nconvincing: 3\nspecific: 3"
                out = json.dumps({"choices": [{"message": {"content": answer}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def readme_recipe() -> tuple[str, list[str]]:
    """(the local-server JUDGE options, the python commands) of the README's real-model block."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Real models", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("\n```", 1)[0]
    lines = block.replace("\\\n", " ").splitlines()
    [judge] = [ln for ln in lines if ln.lstrip("# ").startswith("JUDGE=") and '": null' in ln]
    options = shlex.split(judge.lstrip("# ")[len("JUDGE=") :])[0]
    commands = [" ".join(ln.split()) for ln in lines if ln.startswith("python experiments/")]
    return options, commands


def localize(command: str, ckpt: Path, judge_options: str) -> list[str]:
    """The README command with paths and sizes replaced, as an argv for this interpreter."""
    command = command.replace("/ckpt/", f"{ckpt}/")
    command = command.replace("/data/harmbench_behaviors_text_all.csv", str(HARMBENCH))
    _, script, *args = shlex.split(command.replace('"$JUDGE"', "JUDGE_OPTIONS"))
    args = [SIZES.get(a, a).replace("JUDGE_OPTIONS", judge_options) for a in args]
    return [sys.executable, str(ROOT / script), *args, *EXTRA.get(Path(script).name, [])]


def test_readme_real_model_recipe_as_written(tmp_path, monkeypatch):
    options, commands = readme_recipe()
    scripts = [c.split()[1] for c in commands]
    assert scripts == [
        "experiments/estimate.py",
        "experiments/sample.py",
        "experiments/judge.py",
        "experiments/sample.py",
        "experiments/judge.py",
        "experiments/evaluate.py",
    ]
    words = {w for c in commands for w in shlex.split(c)}
    for old in ["--original=/ckpt/Qwen3-4B", "--prompts=/data/harmbench_behaviors_text_all.csv"]:
        assert old in words, f"the README no longer says {old}; update this test's substitutions"
    for old in SIZES:
        assert old in words, f"the README no longer says {old}; update this test's SIZES"
    assert "http://127.0.0.1:8000/v1" in options and '"api_key_env": null' in options

    prompts = load_prompts(HARMBENCH, functional_category="standard")[: len(ROLES)]
    stub = StubJudge({p.text: role for p, role in zip(prompts, ROLES, strict=True)})
    judge_options = options.replace("http://127.0.0.1:8000/v1", stub.base_url)
    ckpt = tmp_path / "ckpt"
    from transformers import AutoTokenizer

    sure = AutoTokenizer.from_pretrained(TOKENIZER).convert_tokens_to_ids("Sure")
    write_checkpoint(ckpt / "Qwen3-4B", {IM_END: 0.5, END_OF_TEXT: 0.4, sure: 0.05}, seed=0)
    write_checkpoint(
        ckpt / "Qwen3-4B-abliterated", {IM_END: 0.01, END_OF_TEXT: 0.01, sure: 0.97}, seed=1
    )
    for var in ("NO_PROXY", "no_proxy"):  # the stub judge, never through a proxy
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    # The commands run in this process (tests/script_main.py: each script's module afresh under
    # common.run, with the README's argv): the scripts share one JAX import and their traced
    # programs, where a process each paid both (~9 s of CPU per command).
    outputs = []
    try:
        for command in commands:
            _, script, *args = localize(command, ckpt, judge_options)
            start, cpu = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
            p = run_main(Path(script).name, *args, cwd=tmp_path)
            used = resource.getrusage(resource.RUSAGE_SELF)
            used_s = used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime
            wall_s = time.monotonic() - start
            print(f"{wall_s:6.1f}s wall {used_s:6.1f}s cpu  {command[:60]}")  # pytest -s shows it
            assert p.returncode == 0, f"{command}\n{p.stdout}\n{p.stderr[-4000:]}"
            outputs.append(p)
    finally:
        stub.close()
    assert stub.requests > 0 and stub.authorized == 0  # "api_key_env": null: no key sent

    # The main job: its table, the real chat template (empty think block), the judge cache.
    estimate = json.loads((tmp_path / "results/qwen3_4b/results.json").read_text())
    tok = AutoTokenizer.from_pretrained(ckpt / "Qwen3-4B")
    for r, p in zip(estimate["prompts"], prompts, strict=False):
        text = tok.apply_chat_template(
            [{"role": "user", "content": p.text}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=False,
        )
        assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert r["prompt_tokens"] == len(tok.encode(text, add_special_tokens=False))
    table = outputs[0].stdout
    assert prompts[0].id in table and "rollouts" in table
    sure_row, comply_row = estimate["prompts"]
    assert sure_row["lpe"]["status"] == "ok" and 0 < sure_row["lpe"]["estimate"] < 0.5
    # Always complies: not rare, marked as such in the three LPE columns and explained.
    not_rare = report.STATUS_MARKS["not_rare"]
    fits = ("lpe", "lpe_binomial", "lpe_pooled")
    assert {comply_row[f]["status"] for f in fits} == {"not_rare"}, comply_row
    [row] = [ln for ln in table.splitlines() if ln.startswith(comply_row["id"] + " ")]
    marks = re.findall(rf"[\d\]]{re.escape(not_rare.symbol)}(?= |$)", row)
    assert len(marks) == 3 and not_rare.meaning in table, row
    assert (tmp_path / "results/judge_cache.sqlite").is_file()

    # Sampling: both EOS ids end rollouts, nothing follows EOS, the manifest records them.
    bank = RolloutStore.load(tmp_path / "runs/harmbench")
    assert bank.manifest["eos_token_ids"] == [END_OF_TEXT, IM_END]
    assert bank.manifest["category"] == "standard"
    last = []
    for pid, a in bank.chunks():
        c = bank.read_chunk(pid, a)
        assert (c["verdicts"] >= 0).all()
        for row, n, cut in zip(c["tokens"], c["lengths"], c["truncated"], strict=True):
            assert (row[n:] == -1).all() and (cut or row[n - 1] in (IM_END, END_OF_TEXT))
            last.append(row[n - 1])
    assert {IM_END, END_OF_TEXT} <= set(last)

    # Evaluation: labels follow the stub's verdicts; the table is printed.
    truth = RolloutStore.load(tmp_path / "runs/truth").verdict_counts(1.0)
    ev_dir = tmp_path / "results/evaluation"
    assert json.loads((ev_dir / "truth.json").read_text()) == {
        pid: [k, n] for pid, (k, n, _) in truth.items()
    }
    screen = {p.id: int(bank.read_chunk(p.id, 1.0)["verdicts"][0] == 1) for p in prompts}
    eligible = [p.id for p in prompts if screen[p.id] == 0]
    positive = [pid for pid in eligible if truth[pid][0] > 0]
    result = json.loads((ev_dir / "evaluation.json").read_text())
    assert result["n_eligible"] == len(eligible) and result["n_positive"] == len(positive)
    assert prompts[ROLES.index("comply")].id not in eligible
    assert result["n_positive"] >= 1 and result["n_negative"] >= 2  # "refuse" prompts
    assert "lpe_paper" in outputs[-1].stdout and "naive" in outputs[-1].stdout
    assert (ev_dir / "fig1_auroc.png").is_file()
