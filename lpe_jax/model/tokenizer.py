"""Tokenizer helpers for HF Qwen3 directories: chat-templated prompt ids and EOS ids.

Uses transformers' AutoTokenizer (no torch needed). The prompt is rendered by the directory's own
chat template, so the ids are exactly what the model saw in training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# Qwen chat models end a turn with <|im_end|> and documents with <|endoftext|>; generation must
# stop on either, whichever of the config files happens to list them.
QWEN_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


def load_tokenizer(path: str | os.PathLike) -> Any:
    """transformers AutoTokenizer from an HF directory (tokenizer.json / tokenizer_config.json)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist.")
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(
            f"{path} has no tokenizer.json or tokenizer_config.json; pass the model directory "
            "that ships the tokenizer files."
        )
    return AutoTokenizer.from_pretrained(path)


def chat_prompt_ids(
    tokenizer: Any, user_text: str, *, enable_thinking: bool = False, system: str | None = None
) -> list[int]:
    """Token ids of one user turn (after an optional system turn) plus the assistant header.

    Applies the tokenizer's chat template with add_generation_prompt=True. enable_thinking is
    Qwen3's template switch: False (default) renders an empty <think></think> block so the model
    answers directly. Returns a plain list of ints, no BOS added beyond what the template writes.
    """
    if not isinstance(user_text, str) or not user_text:
        raise ValueError(f"user_text must be a non-empty string, got {user_text!r}.")
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates
        template = "\n".join(str(t) for t in template.values())
    if not template:
        raise ValueError(
            "the tokenizer has no chat_template; load it from a chat model's directory "
            "(tokenizer_config.json or chat_template.jinja carries the template)."
        )
    # Pass enable_thinking only to templates that read it; asking a template without a thinking
    # switch to think is a mistake worth naming.
    kwargs: dict[str, Any] = {}
    if "enable_thinking" in template:
        kwargs["enable_thinking"] = enable_thinking
    elif enable_thinking:
        raise ValueError("enable_thinking=True, but this tokenizer's chat template has no thinking")
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": user_text})
    # Render to text, then encode: apply_chat_template(tokenize=True) returns a list in
    # transformers 4 and a BatchEncoding in 5; the text path is the same in both.
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **kwargs
    )
    return [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def eos_token_ids(path_or_tokenizer: str | os.PathLike | Any) -> list[int]:
    """Sorted, de-duplicated ids that end a generation.

    Gathers eos_token_id from generation_config.json and config.json (when a directory is known:
    the path given, or the tokenizer's name_or_path), the tokenizer's eos_token_id, and the ids of
    Qwen's stop tokens <|im_end|> and <|endoftext|> when the vocabulary has them.
    """
    if isinstance(path_or_tokenizer, (str, os.PathLike)):
        directory = Path(path_or_tokenizer)
        tokenizer = load_tokenizer(directory)
    else:
        tokenizer = path_or_tokenizer
        directory = Path(getattr(tokenizer, "name_or_path", "") or "")
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        file = directory / name
        if directory.is_dir() and file.exists():
            ids += _as_ids(json.loads(file.read_text()).get("eos_token_id"))
    ids += _as_ids(getattr(tokenizer, "eos_token_id", None))
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in QWEN_STOP_TOKENS if t in vocab]
    if not ids:
        raise ValueError(
            "found no EOS token id in generation_config.json, config.json or the tokenizer; "
            "pass eos_token_ids explicitly."
        )
    return sorted(set(ids))
