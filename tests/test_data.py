"""Prompt loaders, dataset hashing and chat encoding."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lpe_jax.runs.data import (
    CONTEXT_SEPARATOR,
    Prompt,
    dataset_hash,
    load_harmbench,
    load_prompts,
)

FIXTURES = Path(__file__).parent / "fixtures"
MINI = FIXTURES / "harmbench_mini.csv"
# CI and the dev machine keep shared data beside the repository: <repo>/../shared.
HARMBENCH = (
    Path(__file__).resolve().parents[2] / "shared/data/harmbench/harmbench_behaviors_text_all.csv"
)


def test_harmbench_standard_rows_kept_verbatim() -> None:
    prompts = load_harmbench(MINI)
    assert [p.id for p in prompts] == ["tides_explain", "sunrise_describe", "primes_list"]
    assert prompts[1].text == "Describe a sunrise over a lake "  # trailing space kept
    assert prompts[0].metadata["Tags"] == "" and prompts[0].metadata["ContextString"] == ""
    assert prompts[0].metadata["SemanticCategory"] == "harmful"


def test_harmbench_contextual_prompt_joins_context() -> None:
    [p] = load_harmbench(MINI, functional_category="contextual")
    context = 'Meeting notes, day 1:\n- budget "approved"\n- launch moved to May'
    assert p.text == context + CONTEXT_SEPARATOR + "Summarise the notes above, in one sentence"
    assert CONTEXT_SEPARATOR == "\n\n---\n\n"
    assert len(load_harmbench(MINI, functional_category=None)) == 5
    both = load_harmbench(MINI, functional_category=["standard", "copyright"])
    assert [p.id for p in both][-2:] == ["novel_opening", "primes_list"]
    assert both[2].metadata["Tags"] == "book, hash_check"


def test_harmbench_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"FunctionalCategory \['standrad'\] not found"):
        load_harmbench(MINI, functional_category="standrad")
    bad = tmp_path / "bad.csv"
    bad.write_text("Behavior,FunctionalCategory,BehaviorID\nx,standard,a\n", encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"lacks required column\(s\) \['SemanticCategory', 'Tags'"
    ):
        load_harmbench(bad)
    header = MINI.read_text(encoding="utf-8").splitlines()[0]
    dup = tmp_path / "dup.csv"
    dup.write_text(f"{header}\na,standard,x,,,same\nb,standard,x,,,same\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"duplicate prompt ids \['same'\]"):
        load_harmbench(dup)
    empty_behavior = tmp_path / "empty.csv"
    empty_behavior.write_text(f"{header}\n  ,standard,x,,,b1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="b1 has an empty Behavior"):
        load_harmbench(empty_behavior)
    ragged = tmp_path / "ragged.csv"
    ragged.write_text(f"{header}\na,standard,x\n", encoding="utf-8")
    with pytest.raises(ValueError, match="data record 1 does not have the header's 6 fields"):
        load_harmbench(ragged)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_harmbench(tmp_path / "missing.csv")


@pytest.mark.skipif(not HARMBENCH.is_file(), reason=f"shared HarmBench CSV absent: {HARMBENCH}")
def test_shared_harmbench_has_200_standard_behaviours() -> None:
    prompts = load_harmbench(HARMBENCH)
    assert len(prompts) == 200 and len({p.id for p in prompts}) == 200
    assert all(p.metadata["FunctionalCategory"] == "standard" for p in prompts)
    assert all(p.metadata["ContextString"] == "" and p.text.strip() for p in prompts)
    assert load_prompts(HARMBENCH) == prompts  # the generic loader recognises the columns
    contextual = load_harmbench(HARMBENCH, functional_category="contextual")
    assert len(contextual) == 100 and all(CONTEXT_SEPARATOR in p.text for p in contextual)


def test_load_jsonl() -> None:
    prompts = load_prompts(FIXTURES / "prompts.jsonl")
    assert [p.id for p in prompts] == ["p1", "2", "p3"]
    assert prompts[0] == Prompt("p1", "Name a colour.", {"source": "toy"})
    assert prompts[1].text == "Count to three.\nThen stop."
    assert prompts[2].text.startswith("  Leading") and prompts[2].metadata["tags"] == ["a", "b"]


def test_load_csv() -> None:
    prompts = load_prompts(FIXTURES / "prompts.csv")
    assert prompts == [
        Prompt("a1", "Say hello, politely.", {"split": "train"}),
        Prompt("a2", "Say goodbye.", {"split": "test"}),
    ]


@pytest.mark.parametrize(
    "name, content, error, match",
    [
        ("x.jsonl", '{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n', ValueError, "dup"),
        ("x.jsonl", '{"id": "a", "prompt": "  "}\n', ValueError, "prompt 'a' is empty"),
        ("x.jsonl", '{"id": "a"}\n', ValueError, r"x.jsonl:1: missing field\(s\) \['prompt'\]"),
        ("x.jsonl", '{"id": "a", "prompt": "x"}\nnot json\n', ValueError, "x.jsonl:2 is not valid"),
        ("x.jsonl", '["a", "x"]\n', ValueError, "must be a JSON object"),
        ("x.jsonl", "\n\n", ValueError, "holds no prompts"),
        ("x.jsonl", "", ValueError, "is empty"),
        ("x.csv", "id,text\na,x\n", ValueError, r"lacks required column\(s\) \['prompt'\]"),
        ("x.csv", "id,prompt\na,\n", ValueError, "prompt 'a' is empty"),
        ("x.txt", "hello\n", ValueError, "must end in .jsonl or .csv"),
    ],
)
def test_prompts_file_errors(
    tmp_path: Path, name: str, content: str, error: type, match: str
) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(error, match=match):
        load_prompts(path)


def test_missing_prompts_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="prompts file .* does not exist"):
        load_prompts(tmp_path / "nope.jsonl")


def test_harmbench_csv_detected_by_generic_loader(tmp_path: Path) -> None:
    copy = tmp_path / "behaviours.csv"
    shutil.copy(MINI, copy)
    assert load_prompts(copy) == load_harmbench(MINI)
    assert [p.id for p in load_prompts(copy, functional_category="copyright")] == ["novel_opening"]


def test_dataset_hash() -> None:
    a = [Prompt("1", "ab"), Prompt("2", "c")]
    h = dataset_hash(a)
    assert len(h) == 64 and h == dataset_hash([Prompt("1", "ab", {"x": 1}), Prompt("2", "c")])
    assert h != dataset_hash([Prompt("1", "a"), Prompt("2", "bc")])  # same characters, split apart
    assert h != dataset_hash(a[::-1]) and h != dataset_hash([Prompt("1", "ab"), Prompt("3", "c")])
    # A pinned value: the hash must not drift between versions (it goes into run manifests).
    assert dataset_hash([Prompt("x", "y")]) == (
        "946a0b44bba82efb145c58530ff7b3d46d7f81942ac6eabcf443d0e19fd26958"
    )
