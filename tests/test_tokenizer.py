"""Chat-template prompt ids and EOS ids on a tiny Qwen3-style tokenizer."""

import json
import shutil

import pytest

from lpe_jax.model.tokenizer import chat_prompt_ids, eos_token_ids, load_tokenizer


def test_chat_prompt_ids_follow_the_template(hf_tokenizer_dir):
    tok = load_tokenizer(hf_tokenizer_dir)
    ids = chat_prompt_ids(tok, "w1 w2")
    nl = "\n"
    assert tok.convert_ids_to_tokens(ids) == [
        *["<|im_start|>", "user", nl, "w1", "w2", "<|im_end|>", nl],
        *["<|im_start|>", "assistant", nl, "<think>", nl, nl, "</think>", nl, nl],
    ]
    thinking = chat_prompt_ids(tok, "w1 w2", enable_thinking=True)
    assert ids[: len(thinking)] == thinking and len(ids) > len(thinking)
    with_system = chat_prompt_ids(tok, "w1 w2", system="w3")
    assert tok.convert_ids_to_tokens(with_system)[:6] == [
        "<|im_start|>",
        "system",
        nl,
        "w3",
        "<|im_end|>",
        nl,
    ]
    assert all(isinstance(i, int) for i in ids)


def test_eos_ids_from_generation_config_and_tokenizer(hf_tokenizer_dir):
    tok = load_tokenizer(hf_tokenizer_dir)
    want = sorted(
        {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}
    )
    assert eos_token_ids(hf_tokenizer_dir) == want
    assert eos_token_ids(tok) == want


def test_tokenizer_bad_input(hf_tokenizer_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    tok = load_tokenizer(hf_tokenizer_dir)
    with pytest.raises(ValueError, match="non-empty string"):
        chat_prompt_ids(tok, "")
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat_template"):
        chat_prompt_ids(tok, "w1")
    # generation_config.json with a different list is honoured (union with the tokenizer's).
    other = shutil.copytree(hf_tokenizer_dir, tmp_path / "tok")
    (other / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert 7 in eos_token_ids(other)


def test_thinking_switch_only_where_the_template_has_one(hf_tokenizer_dir) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    ids = chat_prompt_ids(tok, "w1 w2")
    expected = "<|im_start|>user\nw1 w2<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert ids == tok.encode(expected, add_special_tokens=False)
    thinking = chat_prompt_ids(tok, "w1 w2", enable_thinking=True)
    assert thinking == ids[: len(thinking)] and len(thinking) < len(ids)

    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %} assistant"
    assert chat_prompt_ids(tok, "w3") == tok.encode("w3 assistant", add_special_tokens=False)
    with pytest.raises(ValueError, match="no thinking"):
        chat_prompt_ids(tok, "w3", enable_thinking=True)
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat_template"):
        chat_prompt_ids(tok, "w3")
