"""Flags and wiring shared by the experiment scripts (absl lives here, never in the library).

Every script defaults to the embedded toy model organism (lpe_jax/assets/toy_pair) and runs on
any pair of local HF Qwen3 directories with --original/--variant/--prompts/--judge.

Every script starts with ``common.run(main)`` instead of ``app.run(main)``: input paths named by
flags are checked first, and an error from bad input (ValueError, OSError, TimeoutError) prints
one line naming the problem and the fix, with the traceback only under ``--traceback``.
"""

from __future__ import annotations

import hashlib
import json
import logging as pylogging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from absl import app, flags, logging

# transformers prints "PyTorch was not found..." on import when torch is absent (the scripts need
# only its tokenizers); that notice is an advisory warning, which this variable turns off.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from lpe_jax.organisms import toy
from lpe_jax.runs import data

FLAGS = flags.FLAGS
flags.DEFINE_bool(
    "traceback", False, "On an input error, print the full traceback, not only its one line."
)

# Errors a user fixes by changing an input; anything else is a bug and keeps its traceback.
INPUT_ERRORS = (ValueError, OSError, TimeoutError)

# Flag -> (must be a directory?, what it should point at): checked before any work.
_INPUT_PATHS = {
    "original": (True, "the original model's HF directory (config.json, safetensors, tokenizer)"),
    "variant": (True, "the variant's HF directory (config.json, safetensors, tokenizer)"),
    "prompts": (False, "a prompts file (JSONL/CSV with id and prompt, or a HarmBench CSV)"),
    "run": (True, "a run directory written by sample.py"),
    "truth_run": (True, "a judged run directory sampled at alpha = 1"),
    "bank": (False, "a RolloutBank .npz"),
    "truth": (False, "a ground-truth JSON {prompt_id: [k, n]}"),
    "direction": (False, "a refusal direction .npy (abliterate.py writes refusal_direction.npy)"),
}


def check_input_paths() -> None:
    """Raise ValueError naming the flag when a path flag of this script points at nothing."""
    for name, (is_dir, what) in _INPUT_PATHS.items():
        if name not in FLAGS or FLAGS[name].value is None:
            continue
        path = Path(FLAGS[name].value)
        exists = path.is_dir() if is_dir else path.is_file()
        if not exists:
            kind = "directory" if is_dir else "file"
            raise ValueError(f"--{name}={path}: no such {kind}; point --{name} at {what}")
        if name in ("original", "variant") and not (path / "config.json").is_file():
            raise ValueError(f"--{name}={path} has no config.json; point --{name} at {what}")


class _NoTpuProbeNotice(pylogging.Filter):
    """Drops JAX's "Unable to initialize backend 'tpu'" record: absl shows INFO records, and on
    every machine without a TPU jax logs that line while probing backends (not an error)."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unable to initialize backend 'tpu'")


def run(main: Callable[[list[str]], Any]) -> None:
    """``app.run(main)`` that checks input paths first and reports input errors in one line.

    The flags this module declared for the script (--original, --variant, --prompts, --judge,
    ... as the script asked for them) become key flags of the script, so its ``--help`` lists
    them beside its own (absl lists only the main module's flags there).
    """
    for flag in FLAGS.get_key_flags_for_module(sys.modules[__name__]):
        FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    pylogging.getLogger("jax._src.xla_bridge").addFilter(_NoTpuProbeNotice())

    def checked(argv: list[str]) -> Any:
        try:
            check_input_paths()
            return main(argv)
        except INPUT_ERRORS as e:
            if FLAGS.traceback:
                raise
            # The first line is the error; a listing may follow (e.g. evaluate.py's prompts).
            head, *listing = str(e).split("\n")
            script = Path(sys.argv[0]).name
            line = f"{script}: error: {head} (--traceback shows where)"
            print("\n".join([line, *listing]), file=sys.stderr)
            sys.exit(1)

    app.run(checked)


def define_model_flags() -> None:
    o, v = toy.TOY_DIR / "original", toy.TOY_DIR / "variant"
    flags.DEFINE_string("original", str(o), "HF directory of the original model (alpha = 1).")
    flags.DEFINE_string("variant", str(v), "HF directory of the less-safe variant (alpha = 0).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.")
    flags.DEFINE_string("params_cache", None, "Directory caching converted params (orbax).")
    flags.DEFINE_string(
        "path",
        "linear",
        "Path shape name (lpe_jax.decoding.paths registry), or 'direction': the original with a "
        "fraction 1 - alpha of --direction projected out of its residual stream (one model; "
        "--variant is not loaded, and importance sampling is left out: no endpoint log-probs).",
    )
    flags.DEFINE_string(
        "direction",
        None,
        "With --path=direction: the refusal direction, a .npy float vector [hidden_size] "
        "(abliterate.py writes refusal_direction.npy).",
    )
    flags.DEFINE_integer("max_new_tokens", 32, "Generated tokens per rollout at most.")
    flags.DEFINE_float("temperature", 1.0, "Sampling temperature (the paper: 1).")
    flags.DEFINE_integer(
        "max_rows",
        None,
        "Engine slots: rows decoded side by side in one compiled step (default: from free memory).",
    )
    flags.DEFINE_integer(
        "refills_per_step",
        None,
        "Engine: most finished slots that take a new row per step (default: max(8, slots / 16), "
        "raised to ~1.5 slots / mean answer tokens once the answers' length is known).",
        lower_bound=1,
    )
    flags.DEFINE_bool("enable_thinking", False, "Qwen3 chat template: let the model think first.")
    flags.DEFINE_enum(
        "tied_head",
        None,
        ["embedding", "lm_head"],
        "For a checkpoint whose config ties the embeddings but that stores a different "
        "lm_head.weight: use the embedding (transformers 4) or lm_head.weight (transformers 5) "
        "as the output head. Unset, such a checkpoint is refused.",
    )
    flags.DEFINE_string(
        "mesh",
        None,
        "Device mesh rows,tensor,experts (e.g. 2,4,1; product = the local device count): rows "
        "split the engine's slots; tensor splits attention heads, K/V heads, MLP and vocabulary; "
        "experts a MoE's experts. Unset: every device on rows, both models whole on each. Rows "
        "do not depend on it (tokens equal; log-probs to float32 rounding).",
    )
    flags.DEFINE_enum(
        "variant_low_rank",
        "off",
        ["auto", "off"],
        "auto: hold the variant as the original's weights plus low-rank deltas where the "
        "difference allows (an abliteration: rank 1 per residual writer), halving weight memory; "
        "the variant is read tensor by tensor (never whole beside the original), both models' "
        "rows decode as one batch through one weight copy, the plan is logged and a variant "
        "with no shared or low-rank matrix is loaded whole. Exact to float32 rounding; in "
        "bfloat16 rollouts differ from 'off' by rounding.",
    )


def define_prompt_flags() -> None:
    flags.DEFINE_string(
        "prompts",
        str(toy.TOY_DIR / "prompts.jsonl"),
        "Prompts: JSONL/CSV with id and prompt, or a HarmBench behaviours CSV.",
    )
    flags.DEFINE_string("category", "standard", "HarmBench FunctionalCategory to keep.")
    flags.DEFINE_integer("limit", None, "Use only the first N prompts.")
    flags.DEFINE_integer("seed", 0, "Run seed; every rollout's key derives from it.")


def define_judge_flags() -> None:
    flags.DEFINE_string(
        "judge", "toy", "Judge kind: toy (the organism's rule), rubric, string, local, rule."
    )
    flags.DEFINE_string(
        "judge_options",
        "{}",
        'JSON object of judge options, e.g. \'{"base_url": "http://127.0.0.1:8000/v1", '
        '"model": "m", "cache_path": "judge_cache.sqlite"}\'.',
    )


def define_distributed_flags() -> None:
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host runs).")
    flags.DEFINE_integer("num_processes", 1, "Processes in a multi-host run.")
    flags.DEFINE_integer("process_id", 0, "This process's index in a multi-host run.")


def init_distributed() -> tuple[int, int]:
    """Start jax.distributed when asked; returns (process_id, num_processes).

    Each process takes every num_processes-th prompt and writes its own files into the shared
    output directory (which must be on a filesystem all hosts see); process 0 gathers.
    """
    if FLAGS.num_processes <= 1:
        return 0, 1
    if not FLAGS.coordinator_address:
        raise ValueError("--num_processes > 1 needs --coordinator_address host:port")
    import jax

    jax.distributed.initialize(
        FLAGS.coordinator_address, num_processes=FLAGS.num_processes, process_id=FLAGS.process_id
    )
    return jax.process_index(), jax.process_count()


def load_prompts() -> list[data.Prompt]:
    prompts = data.load_prompts(FLAGS.prompts, functional_category=FLAGS.category)
    return prompts[: FLAGS.limit] if FLAGS.limit else prompts


def make_judge(original_dir: str) -> Any:
    """The judge named by --judge/--judge_options, for rollouts of the model in original_dir."""
    from lpe_jax.judges import make_judge as _make

    try:
        options = json.loads(FLAGS.judge_options)
    except json.JSONDecodeError as e:
        raise ValueError(f"--judge_options is not a JSON object: {e}") from e
    if FLAGS.judge == "toy":
        if options:
            raise ValueError("--judge=toy takes no --judge_options")
        if not toy.is_toy_original(original_dir):
            raise ValueError(
                "--judge=toy is the toy organism's rule and means nothing for other models; pass "
                "--judge=rubric|string|local|rule with --judge_options (see docs/judges.md)."
            )
        return _make("rule", predicate=toy.toy_complied, name="toy")
    return _make(FLAGS.judge, **options)


DIRECTION = "direction"


def direction_path() -> bool:
    """Whether --path=direction; checks that --direction is given exactly with it."""
    if FLAGS.path == DIRECTION and not FLAGS.direction:
        raise ValueError("--path=direction needs --direction=<refusal direction .npy>")
    if FLAGS.path != DIRECTION and FLAGS.direction:
        raise ValueError(
            f"--direction is used only with --path=direction (got --path={FLAGS.path})"
        )
    return FLAGS.path == DIRECTION


def path_shape() -> str:
    """The engine's path shape name: --path, or "linear" on the direction path (one model: the
    shape then sets only the alpha domain)."""
    return "linear" if direction_path() else FLAGS.path


def load_direction(path: str, hidden_size: int) -> np.ndarray:
    """The --direction file as float32 [hidden_size], or a ValueError naming the problem."""
    try:
        r = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"--direction={path}: cannot read it as a .npy array ({e})") from e
    r = np.asarray(r).squeeze()
    if r.shape != (hidden_size,) or not np.issubdtype(r.dtype, np.floating):
        raise ValueError(
            f"--direction={path} holds a {r.dtype} array of shape {np.shape(r)}; the model needs "
            f"a float vector [{hidden_size}] (abliterate.py writes refusal_direction.npy)"
        )
    if not np.isfinite(r).all() or not np.any(r):
        raise ValueError(f"--direction={path} is zero or not finite; it must be a direction")
    return r.astype(np.float32)


def load_pair() -> Any:
    """The model pair of --original/--variant (--dtype, --params_cache, --tied_head), placed on
    the --mesh by the sharding rules as it is read (`load_model(mesh=)`); with
    --variant_low_rank=auto the variant as low-rank deltas on the original, read tensor by
    tensor (`load_low_rank_variant`, which ignores --params_cache for the variant; plan logged);
    with --path=direction, the original wrapped as the direction path's one model
    (`directional`) and no variant."""

    from lpe_jax.runs.pipeline import load_pair as _load

    if direction_path():
        if FLAGS.variant_low_rank != "off":
            raise ValueError("--variant_low_rank applies to a variant; --path=direction has none")
        return _load_direction_pair()
    loader = None
    if FLAGS.variant_low_rank == "auto":
        from lpe_jax.model.low_rank import load_low_rank_variant

        def loader(original: Any) -> Any:
            # Streamed: the variant's tensors are compared one at a time, never all resident.
            variant, plan = load_low_rank_variant(
                original, FLAGS.variant, FLAGS.dtype, tied_head=FLAGS.tied_head
            )
            logging.info("%s", plan.summary())
            return variant

    mesh = load_mesh() if loader is None else None
    refuse_weights_past_memory(mesh, whole_variant=loader is None)
    return _load(
        FLAGS.original,
        FLAGS.variant,
        dtype=FLAGS.dtype,
        cache_dir=FLAGS.params_cache,
        tied_head=FLAGS.tied_head,
        variant_loader=loader,
        # each model loaded straight onto the --mesh by the sharding rules (never whole on one
        # device); the low-rank loader compares the variant with the original whole
        mesh=mesh,
    )


def refuse_weights_past_memory(mesh: Any, whole_variant: bool = True) -> None:
    """Before any weight is read: refuse a pair whose weights alone (from the config.json files,
    --dtype, placed on `mesh` by the sharding rules; None: one device) exceed a device's memory,
    with the numbers, instead of failing part-way through the load. whole_variant False (a
    low-rank variant, mostly the original's arrays): the original alone is counted. The full plan
    (slots, prompt table, a low-rank variant's own arrays) is checked once the models are loaded
    (`check_memory_plan`). Backends that report no memory limit (CPU) are not checked."""
    import jax

    from lpe_jax.decoding import memory
    from lpe_jax.model.checkpoint import model_config, read_config

    device = jax.local_devices()[0] if mesh is None else mesh.devices.flat[0]
    limit = memory.device_limit_bytes(device)
    if limit is None:
        return
    shape = (1, 1, 1) if mesh is None else tuple(mesh.devices.shape)
    per_model = [
        memory.param_bytes_per_device(model_config(read_config(Path(d))), FLAGS.dtype, shape)
        for d in (FLAGS.original, FLAGS.variant)[: 2 if whole_variant else 1]
    ]
    if sum(per_model) > limit:
        each = " + ".join(memory.format_bytes(b) for b in per_model)
        raise ValueError(
            f"the pair's weights alone take {each} per device on mesh {shape} "
            f"(rows, tensor, experts), {FLAGS.dtype}, more than a device's "
            f"{memory.format_bytes(limit)}; nothing was read. Spread the weights over more "
            "devices (a larger tensor or experts size in --mesh), use --dtype=bfloat16, or hold "
            "the variant as low-rank deltas (--variant_low_rank=auto)."
        )


def load_mesh() -> Any:
    """The --mesh over the local devices (unset: every device on rows); `load_model` checks it
    against each model before reading. None on one device (the plain one-device load)."""
    import jax

    from lpe_jax.decoding import sharding

    devices = jax.local_devices()
    return None if len(devices) == 1 else sharding.pair_mesh(mesh_shape(), devices)


def _load_direction_pair() -> Any:
    from lpe_jax.abliteration.direction_path import directional
    from lpe_jax.model.checkpoint import load_model
    from lpe_jax.model.tokenizer import eos_token_ids, load_tokenizer
    from lpe_jax.runs.pipeline import ModelPair

    model = load_model(
        FLAGS.original, dtype=FLAGS.dtype, cache_dir=FLAGS.params_cache, tied_head=FLAGS.tied_head
    )
    direction = load_direction(FLAGS.direction, model.cfg.hidden_size)
    tokenizer = load_tokenizer(FLAGS.original)
    return ModelPair(
        original=directional(model, direction),
        variant=None,
        tokenizer=tokenizer,
        eos_token_ids=tuple(sorted(set(eos_token_ids(tokenizer)))),
        original_dir=Path(FLAGS.original),
        variant_dir=Path(FLAGS.original),
        cache_dir=None if FLAGS.params_cache is None else Path(FLAGS.params_cache),
    )


def max_prompt_len(pair: Any, prompts: list[Any]) -> int:
    """The longest prompt of the whole run, in tokens: every process, and every rerun of a resumed
    run, plans its engine for the same prompt length, so the shapes, and with them the float
    rounding of the rows' log-probs, do not depend on which prompts a process has left to do."""
    return max(len(prompt_ids(pair, p.text)) for p in prompts)


def mesh_shape() -> tuple[int, int, int] | None:
    """--mesh as (rows, tensor, experts); None when unset (every local device on rows)."""
    from lpe_jax.decoding import sharding

    return None if FLAGS.mesh is None else sharding.parse_mesh_shape(FLAGS.mesh)


def _weights_per_device(pair: Any, shape: tuple[int, int, int]) -> int | None:
    """Both models' parameter bytes per device with a low-rank variant (--variant_low_rank=auto):
    the original's, plus the variant's own arrays (factors, tensors kept whole) as the mesh's
    rules place them; None otherwise (memory.plan_mesh counts both models from their configs)."""
    if FLAGS.variant_low_rank != "auto" or pair.variant is None:
        return None
    from lpe_jax.decoding import memory

    return memory.low_rank_param_bytes_per_device(pair.original, pair.variant, shape)


def check_memory_plan(pair: Any, max_prompt_len: int, steps_per_call: int) -> None:
    """Refuse, before the engine spreads the weights over the mesh, a mesh on which both models'
    weights (and --max_rows slots when set) exceed a device's memory, with the numbers; the
    engine sizes unset slots from what is left."""
    import jax

    from lpe_jax.decoding import memory, sharding
    from lpe_jax.decoding.engine_device import ATTENTION_BLOCK
    from lpe_jax.decoding.rollouts import prompt_bucket

    devices = jax.local_devices()
    shape = mesh_shape() or (len(devices), 1, 1)
    v = pair.variant
    sharding.check_mesh(shape, len(devices), [m.cfg for m in (pair.original, v) if m is not None])
    plan = memory.plan_mesh(
        pair.original.cfg, None if v is None else v.cfg, pair.original.dtype,
        pair.original.dtype if v is None else v.dtype, shape, FLAGS.max_rows or 0, 0,
        FLAGS.max_new_tokens, prompt_bucket(max_prompt_len), steps_per_call, ATTENTION_BLOCK,
        _weights_per_device(pair, shape),
    )  # fmt: skip
    limit = memory.device_limit_bytes(devices[0])
    if not plan.fits(limit):
        raise ValueError(
            f"{plan.summary(limit)}: does not fit a device. Spread the weights over more devices "
            "(a larger tensor or experts size in --mesh), lower --max_rows, or use bfloat16."
        )


def make_engine(pair: Any, max_prompt_len: int, path: str | None = None, **kw: Any) -> Any:
    """The rollout engine on both models (``path`` or --path, --max_new_tokens, --temperature,
    --max_rows, --refills_per_step, --mesh), memory planned for prompts of up to max_prompt_len
    tokens (kw: RolloutEngine's). Logs the per-device memory plan; refuses one that does not
    fit."""
    import jax

    from lpe_jax.decoding import memory
    from lpe_jax.decoding.engine import RolloutEngine

    check_memory_plan(pair, max_prompt_len, kw.get("steps_per_call", 16))
    engine = RolloutEngine(
        pair.original,
        pair.variant,
        path or path_shape(),
        FLAGS.max_new_tokens,
        pair.eos_token_ids,
        temperature=FLAGS.temperature,
        slots=FLAGS.max_rows,
        refills_per_step=FLAGS.refills_per_step,
        max_prompt_len=max_prompt_len,
        mesh_shape=mesh_shape(),
        **kw,
    )
    plan = engine.memory_plan(_weights_per_device(pair, engine.mesh_shape))
    limit = memory.device_limit_bytes(jax.local_devices()[0])
    logging.info("%s", plan.summary(limit))
    if not plan.fits(limit):
        raise ValueError(f"{plan.summary(limit)}: does not fit a device; lower --max_rows.")
    return engine


def make_scheduler(engine: Any, judge: Any = None, decode: Any = None, **kw: Any) -> Any:
    """A Scheduler on `engine` (kw: max_jobs, on_outcome, ... of lpe_jax.runs.scheduler.Scheduler).

    Rows in flight (submitted, not yet judged) are bounded by four times the engine's slots:
    enough that the device keeps decoding while the judge works through earlier rows.
    """
    from lpe_jax.runs.scheduler import Scheduler

    block = min(64, engine.slots)
    return Scheduler(
        engine,
        judge=judge,
        decode=decode,
        block_rows=block,
        max_inflight_rows=max(4 * engine.slots, block),
        **kw,
    )


def prompt_ids(pair: Any, text: str) -> list[int]:
    from lpe_jax.model.tokenizer import chat_prompt_ids

    return chat_prompt_ids(pair.tokenizer, text, enable_thinking=FLAGS.enable_thinking)


def sampling_manifest(pair: Any, prompts: list[data.Prompt]) -> dict[str, Any]:
    """What determines the rollouts of a run: a different value means a different run."""
    import lpe_jax

    models = pair.fingerprint()
    if pair.variant is None:  # the direction path: one model and a direction, no variant
        models["direction"] = str(Path(FLAGS.direction).resolve())
        models["direction_hash"] = hashlib.sha256(Path(FLAGS.direction).read_bytes()).hexdigest()
    return {
        **models,
        "dtype": FLAGS.dtype,
        "path": FLAGS.path,
        "max_new_tokens": FLAGS.max_new_tokens,
        "temperature": FLAGS.temperature,
        "eos_token_ids": list(pair.eos_token_ids),
        "enable_thinking": FLAGS.enable_thinking,
        "seed": FLAGS.seed,
        "prompts": str(Path(FLAGS.prompts).resolve()),
        "category": FLAGS.category,  # judge.py reloads the same prompts with it
        "dataset_hash": data.dataset_hash(prompts),
        "n_prompts": len(prompts),
        "code_version": lpe_jax.__version__,
        # Recorded only when set, so runs sampled before the flag existed keep their manifest.
        **({"tied_head": FLAGS.tied_head} if FLAGS.tied_head else {}),
        **({"variant_low_rank": "auto"} if FLAGS.variant_low_rank == "auto" else {}),
        **({"mesh": ",".join(map(str, mesh_shape()))} if FLAGS.mesh else {}),
    }


class Progress:
    """Logs `done/total`, rate and ETA at most every `every` seconds (and at the end)."""

    def __init__(self, total: int, what: str, every: float = 5.0):
        self.total, self.what, self.every = total, what, every
        self.start = self.last = time.time()
        self.done = 0

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.time()
        if now - self.last < self.every and self.done < self.total:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        logging.info(
            "%s %d/%d  %.2f/s  elapsed %.0fs  ETA %.0fs",
            self.what,
            self.done,
            self.total,
            rate,
            now - self.start,
            eta,
        )
