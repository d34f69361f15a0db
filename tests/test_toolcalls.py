"""Reading tool calls out of streamed text, and the grammars that force them; no model needed."""

from __future__ import annotations

import json

import jsonschema
import pytest

from llmstack.common.wire import ToolSpec
from llmstack.services.engines.text.templates import tools_as_text
from llmstack.services.worker.toolcalls import (
    HermesReader,
    NamedCallReader,
    RequiredCallsReader,
    forced_structure,
    reader_for,
)
from tests.support.api_depth import ADD, TOOLS, WEATHER


def spec(choice: str = "auto", name: str | None = None, parallel: bool = True) -> ToolSpec:
    return ToolSpec(tools=TOOLS, choice=choice, name=name, parallel=parallel)  # type: ignore[arg-type]


def run(reader, text: str, step: int, reason: str = "stop"):
    """Feed `text` in pieces of `step` characters; the joined content, whole calls and finish reason."""
    content, deltas = [], []
    for i in range(0, len(text), step):
        c, d = reader.feed(text[i : i + step])
        content.append(c)
        deltas += d
    c, d, finish = reader.finish(reason)
    content.append(c)
    deltas += d
    calls: dict[int, dict] = {}
    for d in deltas:
        call = calls.setdefault(d["index"], {"id": d.get("id"), "name": None, "arguments": ""})
        call["name"] = d["function"].get("name") or call["name"]
        call["arguments"] += d["function"].get("arguments", "")
    return "".join(content), [calls[i] for i in sorted(calls)], finish


TEXT = (
    'Let me look. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
    '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
)


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_hermes_reader_finds_calls_however_the_text_is_split(step: int) -> None:
    content, calls, finish = run(HermesReader(spec()), TEXT, step)
    assert content == "Let me look. "
    assert [c["name"] for c in calls] == ["get_weather", "add"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "unit": "celsius"}
    assert json.loads(calls[1]["arguments"]) == {"a": 1, "b": 2}
    assert all(c["id"].startswith("call_") for c in calls) and calls[0]["id"] != calls[1]["id"]
    assert finish == "tool_calls"


@pytest.mark.parametrize("step", [1, 4])
def test_hermes_reader_leaves_plain_text_alone(step: int) -> None:
    text = "a < b and <tool is not a call; <tool_call>not json</tool_call> <tool_ca"
    content, calls, finish = run(HermesReader(spec()), text, step)
    assert content == text and calls == [] and finish == "stop"


def test_hermes_reader_ignores_unknown_functions_and_accepts_an_unclosed_last_call() -> None:
    content, calls, _ = run(HermesReader(spec()), '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', 3)
    assert calls == [] and "rm_rf" in content
    content, calls, finish = run(HermesReader(spec()), '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}', 5)
    assert [c["name"] for c in calls] == ["add"] and content == "" and finish == "tool_calls"
    _, _, finish = run(HermesReader(spec()), "<tool_call>{", 1, reason="length")
    assert finish == "length"


def test_named_reader_streams_arguments() -> None:
    reader = NamedCallReader(spec("function", "get_weather"))
    content, calls, finish = run(reader, '{"city": "Oslo", "unit": "celsius"}', 4)
    assert content == "" and finish == "tool_calls"
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"])["city"] == "Oslo"


REQUIRED = '[{"name": "add", "arguments": {"a": 3, "b": 4}}, {"name": "get_weather", "arguments": {"city": "X", "unit": "celsius"}}]'


def test_required_reader_reads_the_array() -> None:
    _, calls, finish = run(RequiredCallsReader(spec("required")), REQUIRED, 9)
    assert [c["name"] for c in calls] == ["add", "get_weather"] and finish == "tool_calls"
    content, calls, _ = run(RequiredCallsReader(spec("required")), "not an array", 9)
    assert content == "not an array" and calls == []


@pytest.mark.parametrize(
    ("upto", "names", "last_arguments"),
    [
        ("[{", ["get_weather"], ""),  # not even the name: the first tool it can be
        ('"ad', ["add"], ""),  # the tool the partial name can only be
        ('"a": 3', ["add"], '{"a": 3'),  # inside the arguments: as far as they got
        ('"b": 4}', ["add"], '{"a": 3, "b": 4}'),  # the item's own `}` missing
        ("}},", ["add"], '{"a": 3, "b": 4}'),  # between two calls: the whole one only
        ('}}, {"na', ["add", "get_weather"], ""),
        ('"ci', ["add", "get_weather"], '{"ci'),
    ],
)
def test_required_reader_cut_off_by_max_tokens_still_returns_calls(
    upto: str, names: list[str], last_arguments: str
) -> None:
    """tool_choice required: a client that forced a call gets one, never half a JSON array as content."""
    text = REQUIRED[: REQUIRED.index(upto) + len(upto)]
    content, calls, finish = run(RequiredCallsReader(spec("required")), text, 9, reason="length")
    assert content == "" and finish == "length"
    assert [c["name"] for c in calls] == names, text
    assert calls[-1]["arguments"] == last_arguments
    if len(calls) == 2:
        assert json.loads(calls[0]["arguments"]) == {"a": 3, "b": 4}


def test_forced_structures_accept_exactly_valid_calls() -> None:
    named = forced_structure(spec("function", "add"))
    assert named is not None and named.json_schema == ADD["function"]["parameters"]
    required = forced_structure(spec("required", parallel=False))
    assert required is not None and required.json_schema is not None
    schema = required.json_schema
    jsonschema.validate([{"name": "add", "arguments": {"a": 1, "b": 2}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "add", "arguments": {"a": "x", "b": 2}}], schema)
    with pytest.raises(jsonschema.ValidationError):  # parallel calls off: one call at most
        jsonschema.validate([{"name": "add", "arguments": {"a": 1, "b": 2}}] * 2, schema)
    assert forced_structure(spec("auto")) is None and reader_for(spec("none")) is None


def test_templates_without_tools_get_them_as_text() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "X"}}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "windy"},
    ]
    out = tools_as_text(messages, [WEATHER])
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.") and "<tools>" in out[0]["content"]
    assert '"get_weather"' in out[0]["content"]
    assert out[2] == {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "X"}}\n</tool_call>',
    }
    assert out[3]["role"] == "user" and out[3]["content"].count("<tool_response>") == 2  # parallel results: one turn
    assert len(out) == 4


def test_merging_queued_output_keeps_logprobs_and_tool_calls() -> None:
    from llmstack.services.api.upstream import _merge_text_events
    from llmstack.services.engines.base import Chunk

    lp = [{"token": "a", "logprob": -1.0, "bytes": [97], "top_logprobs": []}]
    joined = Chunk("a", 1, None, lp, [{"token": "p"}]).then(Chunk("b", 1, "stop", lp))
    assert (joined.text, joined.tokens, joined.finish_reason) == ("ab", 2, "stop")
    assert joined.logprobs == lp + lp and joined.prompt_logprobs == [{"token": "p"}]
    events = [
        {"index": 0, "text": "a", "tokens": 1, "logprobs": lp},
        {"index": 0, "text": "b", "tokens": 1, "logprobs": lp},
        {"index": 0, "text": "", "tokens": 1, "tool_calls": [{"index": 0, "function": {"arguments": "{"}}]},
        {"index": 0, "text": "", "tokens": 1, "tool_calls": [{"index": 0, "function": {"arguments": "}"}}]},
        {"index": 1, "text": "c", "tokens": 1, "finish_reason": "stop"},
        {"usage": {"prompt_tokens": 1, "completion_tokens": 5}},
    ]
    merged = _merge_text_events([dict(e) for e in events])
    assert merged[0] == {"index": 0, "text": "ab", "tokens": 2, "logprobs": lp + lp}
    assert merged[1:3] == events[2:4]  # tool-call deltas stay one event each
    assert merged[3:] == events[4:]
    thinking = [
        {"index": 0, "text": "", "tokens": 1, "reasoning": "hm"},
        {"index": 0, "text": "A", "tokens": 1, "reasoning": "m."},
        {"index": 0, "text": "B", "tokens": 1, "finish_reason": "stop", "stop_sequence": "##"},
    ]
    assert _merge_text_events([dict(e) for e in thinking]) == [
        {"index": 0, "text": "AB", "tokens": 3, "reasoning": "hmm.", "finish_reason": "stop", "stop_sequence": "##"}
    ]
    later = [{"index": 0, "text": "A", "tokens": 1}, {"index": 0, "text": "", "tokens": 1, "reasoning": "r"}]
    assert _merge_text_events([dict(e) for e in later]) == later  # reasoning after text keeps its place
