"""Shared test settings and fixtures.

JAX runs on CPU in tests. `hf_checkpoint` builds tiny random Hugging Face Qwen3 checkpoints
(see tests/hf_fixtures.py); torch is imported only when a test asks for one.
"""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

_XLA_CACHE_VARS = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
}
_created_xla_cache: str | None = None


def pytest_configure(config: pytest.Config) -> None:
    """The scripts the tests launch (about 30 processes) compile the same small programs again
    and again; a persistent XLA cache shared by every process of this run saves ~10 s of CPU per
    launch. Set after jax was imported here, it reaches the subprocesses and the pytest-xdist
    workers (which import jax after inheriting it), not a plain single-process run. Compilation
    counts stay exact: the cache starts empty each run, and the tests that count compilations use
    shapes no other test compiles. A user's own JAX_COMPILATION_CACHE_DIR is kept."""
    global _created_xla_cache
    if getattr(config.option, "dist", "no") == "loadfile":
        # xdist's controller schedules files in the workers' collection order (see SLOWEST_FILES)
        config.option.loadscopereorder = False
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    _created_xla_cache = tempfile.mkdtemp(prefix="lpe_jax_test_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _created_xla_cache
    os.environ.update(_XLA_CACHE_VARS)


# The files that take longest (wall seconds on an idle 2-core box; docs/benchmarks.md "Stop 25:
# test time", reordered from the merged tree's full-run profile), longest first. `make test` runs
# whole files per worker (`--dist loadfile`) and pytest-xdist hands them out in collection order,
# after reordering them by their number of tests unless told not to: that put these few-test
# files last, where one of them could still run on one worker for minutes after the other had
# run out of files. Handing out the longest first (xdist's reordering off, pytest_configure) lets
# the many short files fill in behind them. Files not listed keep their usual order after these.
SLOWEST_FILES = (
    "test_mesh.py",
    "test_readme.py",
    "test_experiments_estimate.py",
    "test_real_model_recipe.py",
    "test_notebooks.py",
    "test_bf16.py",
    "test_qwen35_checkpoint.py",
    "test_engine.py",
    "test_qwen3_moe.py",
    "test_low_rank.py",
    "test_experiments.py",
    "test_judge_failure.py",
    "test_abliterate_hybrid.py",
    "test_abliterate_script.py",
    "test_bf16_qwen35.py",
    "test_sampler_determinism.py",
    "test_toy.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept within


def pytest_unconfigure(config: pytest.Config) -> None:
    if _created_xla_cache is not None:
        shutil.rmtree(_created_xla_cache, ignore_errors=True)


@pytest.fixture(scope="module")
def highest_matmul_precision():
    """jax_default_matmul_precision='highest' for a module's tests, restored afterwards."""
    old = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", "highest")
    yield
    jax.config.update("jax_default_matmul_precision", old)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """Factory: `hf_checkpoint(**kwargs) -> Path` of a saved random HF Qwen3ForCausalLM.

    kwargs are those of `hf_fixtures.make_hf_checkpoint` (vocab_size=96, hidden_size=64,
    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, tie_word_embeddings=False,
    storage_dtype='float32', max_shard_size=None, seed=0, ...). Checkpoints are built once per
    session per distinct kwargs and must be treated as read-only.
    """
    from hf_fixtures import make_hf_checkpoint

    built: dict[tuple, Path] = {}

    def make(**kwargs: Any) -> Path:
        key = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
        if key not in built:
            built[key] = make_hf_checkpoint(tmp_path_factory.mktemp("hf_qwen3"), **kwargs)
        return built[key]

    return make


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with a tiny Qwen3-style tokenizer (chat template, <|im_end|> as eos) and a
    generation_config.json listing eos ids [2, 0] (<|im_end|>, <|endoftext|>)."""
    from hf_fixtures import make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("hf_tok"), generation_eos=[2, 0])
