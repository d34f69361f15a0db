"""What the agent-API tests (Responses, Anthropic Messages, the Agents SDK, reasoning) share: the
conversations a tiny model is trained on, written as the worker renders them, and the target they run
against (a worker with the trained model, behind an API server; one per engine)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import openai
from agents import function_tool

from tests.support.api_depth import TOOLS
from tests.support.tiny_model import Conversation, build_tool_caller

MODEL = "agent-tiny"

#: Schemas of OpenAI's OpenAPI document for each Responses stream event type.
EVENT_SCHEMAS = {
    "response.created": "ResponseCreatedEvent",
    "response.in_progress": "ResponseInProgressEvent",
    "response.completed": "ResponseCompletedEvent",
    "response.incomplete": "ResponseIncompleteEvent",
    "response.failed": "ResponseFailedEvent",
    "error": "ResponseErrorEvent",
    "response.output_item.added": "ResponseOutputItemAddedEvent",
    "response.output_item.done": "ResponseOutputItemDoneEvent",
    "response.content_part.added": "ResponseContentPartAddedEvent",
    "response.content_part.done": "ResponseContentPartDoneEvent",
    "response.output_text.delta": "ResponseTextDeltaEvent",
    "response.output_text.done": "ResponseTextDoneEvent",
    "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
    "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
    "response.reasoning_text.delta": "ResponseReasoningTextDeltaEvent",
    "response.reasoning_text.done": "ResponseReasoningTextDoneEvent",
}

# -- a function call, then the answer once the tool said what it found --------------------------------------
PARIS = "What is the weather in Paris?"
PARIS_ARGS = {"city": "Paris", "unit": "celsius"}
PARIS_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
PARIS_TEXT = "Let me check.\n"
PARIS_RESULT = "sunny, 22 C"
PARIS_ANSWER = "It is sunny and 22 C in Paris."


def paris_turns(call_id: str = "call_1") -> list[dict[str, Any]]:
    """The second turn's template messages: the question, the call (after some text), its result."""
    call = {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": PARIS_ARGS}}
    return [
        {"role": "user", "content": PARIS},
        {"role": "assistant", "content": PARIS_TEXT, "tool_calls": [call]},
        {"role": "tool", "content": PARIS_RESULT, "tool_call_id": call_id, "name": "get_weather"},
    ]


# -- reasoning: a <think> block before the answer, and before a call ----------------------------------------
OSLO = "Is it cold in Oslo?"
OSLO_REASONING = "Oslo is in Norway. It is winter there."
OSLO_ANSWER = "Yes, it is cold in Oslo."
SUM = "Add 2 and 3."
SUM_REASONING = "The user wants a sum: the add tool does that."
SUM_CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'


# -- the Agents SDK's one-tool agent ------------------------------------------------------------------------
@function_tool
def get_weather(city: str) -> str:
    """Current weather for a city."""
    return "rainy, 18 C"


AGENT_INSTRUCTIONS = "You answer weather questions with the get_weather tool."
TOKYO = "Weather in Tokyo?"
TOKYO_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tokyo"}}\n</tool_call>'
TOKYO_ANSWER = "It is rainy in Tokyo."


def agent_tools() -> list[dict[str, Any]]:
    """The agent's tool as the API server hands it to the worker (Responses function tool -> chat tool)."""
    function = {
        "name": get_weather.name,
        "description": get_weather.description,
        "parameters": get_weather.params_json_schema,
    }
    return [{"type": "function", "function": function}]


def agent_turns(call_id: str) -> list[dict[str, Any]]:
    call = {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}}
    return [
        {"role": "system", "content": AGENT_INSTRUCTIONS},
        {"role": "user", "content": TOKYO},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "rainy, 18 C", "tool_call_id": call_id, "name": "get_weather"},
    ]


def conversations() -> list[Conversation]:
    """Everything the agent model is trained to say (the chat template renders no call ids)."""
    return [
        Conversation([{"role": "user", "content": PARIS}], PARIS_TEXT + PARIS_CALL, TOOLS),
        Conversation(paris_turns(), PARIS_ANSWER, TOOLS),
        Conversation([{"role": "user", "content": OSLO}], f"<think>\n{OSLO_REASONING}\n</think>\n\n{OSLO_ANSWER}"),
        Conversation([{"role": "user", "content": SUM}], f"<think>\n{SUM_REASONING}\n</think>\n\n{SUM_CALL}", TOOLS),
        Conversation(agent_turns("c")[:2], TOKYO_CALL, agent_tools()),
        Conversation(agent_turns("c"), TOKYO_ANSWER, agent_tools()),
    ]


def build_agent_model(dest: Path) -> Path:
    return build_tool_caller(dest, conversations())  # type: ignore[arg-type]


@dataclass
class AgentTarget:
    """The trained model behind an API server: what the engine-neutral agent-API tests run against."""

    api_url: str
    model: str = MODEL

    @property
    def base_url(self) -> str:
        return f"{self.api_url}/v1"

    @property
    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key="none", _strict_response_validation=True, max_retries=0)

    @property
    def anthropic(self) -> anthropic.Anthropic:
        return anthropic.Anthropic(
            base_url=self.api_url, api_key="none", _strict_response_validation=True, max_retries=0
        )
