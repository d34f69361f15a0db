"""Reading reasoning out of streamed text (`<think>` blocks), however the text is split; no model needed."""

from __future__ import annotations

import pytest

from llmstack.services.worker.reasoning import ThinkReader, prompt_opens_reasoning, reader_for


def run(reader: ThinkReader, text: str, step: int) -> tuple[str, str]:
    """Feed `text` in pieces of `step` characters; the joined reasoning and answer."""
    reasoning, answer = [], []
    for i in range(0, len(text), step):
        r, a = reader.feed(text[i : i + step])
        reasoning.append(r)
        answer.append(a)
    r, a = reader.finish()
    return "".join(reasoning) + r, "".join(answer) + a


STEPS = [1, 2, 3, 5, 8, 1000]


@pytest.mark.parametrize("step", STEPS)
def test_a_leading_block_is_reasoning(step: int) -> None:
    text = "<think>\nThe user greets me.\nI greet back.\n</think>\n\nHello there!"
    assert run(ThinkReader(), text, step) == ("The user greets me.\nI greet back.", "Hello there!")


@pytest.mark.parametrize("step", STEPS)
def test_no_block_is_all_answer(step: int) -> None:
    text = "  Hello <think>not reasoning</think> there"
    assert run(ThinkReader(), text, step) == ("", text)


@pytest.mark.parametrize("step", STEPS)
def test_tags_split_across_chunks_never_leak(step: int) -> None:
    reader = ThinkReader()
    shown = []
    text = "<think>a < b and </th is not a tag</think>answer with <thi and </think>"
    for i in range(0, len(text), step):
        shown.append(reader.feed(text[i : i + step]))
    shown.append(reader.finish())
    reasoning = "".join(r for r, _ in shown)
    answer = "".join(a for _, a in shown)
    assert reasoning == "a < b and </th is not a tag"
    assert answer == "answer with <thi and </think>"  # after the block, tags are plain text
    assert all(THINK not in r for r, _ in shown for THINK in ("<think>", "</think>"))


@pytest.mark.parametrize("step", STEPS)
def test_cut_off_inside_the_block_is_all_reasoning(step: int) -> None:
    assert run(ThinkReader(), "<think>\nstill thinking about </th", step) == ("still thinking about </th", "")


@pytest.mark.parametrize("step", STEPS)
def test_started_by_the_prompt(step: int) -> None:
    """deepseek_r1, or a prompt ending in `<think>`: the output begins inside the block."""
    assert run(ThinkReader(starts_thinking=True), "plan it\n</think>\n\nDone.", step) == ("plan it", "Done.")
    # an explicit opening tag right away is dropped
    assert run(ThinkReader(starts_thinking=True), "<think>\nplan</think>Done.", step) == ("plan", "Done.")


def test_only_whitespace_or_a_partial_tag_is_answer_at_the_end() -> None:
    assert run(ThinkReader(), "\n\n", 1) == ("", "\n\n")
    assert run(ThinkReader(), "<thi", 1) == ("", "<thi")


def test_parsers_by_name() -> None:
    assert reader_for(None) is None and reader_for("") is None
    assert reader_for("deepseek_r1").thinking
    assert not reader_for("qwen3", "<|im_start|>assistant\n").thinking
    assert reader_for("qwen3", "<|im_start|>assistant\n<think>\n").thinking
    assert not prompt_opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    with pytest.raises(ValueError, match="qwen3"):
        reader_for("nope")
