"""Shared test settings and fixtures.

JAX runs on CPU in tests. `hf_checkpoint` builds tiny random Hugging Face Qwen3 checkpoints
(see tests/hf_fixtures.py); torch is imported only when a test asks for one.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402


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
