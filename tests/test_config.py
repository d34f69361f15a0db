"""stack.toml validation through the real CLI: every bad file fails before anything starts, with a
message naming the file, the key and the problem; an occupied port fails `up` naming the port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from llmstack.stack.config import load_config
from tests.support.procs import DEFAULT_ENV, REPO_ROOT, free_port

GOOD_MODEL = '[[models]]\nmodel = "test-org/tiny-chat"\ndevice = "cpu"\n'

# (id, stack.toml text, fragments the error must contain)
BAD_CONFIGS: list[tuple[str, str, list[str]]] = [
    ("unknown-key", "[api]\nportt = 8000\n", ["api.portt", "unknown key", "allowed here:", "port"]),
    ("unknown-section", "[modelz]\nx = 1\n", ["modelz", "unknown key", "models"]),
    ("wrong-type", '[api]\nport = "8000"\n', ["api.port", "valid integer", "'8000'"]),
    ("bad-enum", GOOD_MODEL.replace('"cpu"', '"tpu"'), ["models[0].device", "'auto', 'cpu', 'cuda' or 'mps'"]),
    ("bad-port", "[api]\nport = 70000\n", ["api.port", "less than or equal to 65535", "70000"]),
    ("port-clash", "[api]\nport = 21001\n", ["port 21001 is used by both controller and api"]),
    (
        "cpu-offloading-without-8bit",
        GOOD_MODEL + "cpu_offloading = true\n",
        ["models[0]", "cpu_offloading needs load_8bit = true"],
    ),
    (
        "duplicate-model-names",
        GOOD_MODEL + 'names = ["m"]\n' + GOOD_MODEL + 'names = ["m"]\n',
        ["model name 'm' is served by models[0] and models[1]"],
    ),
    ("bad-toml", "[api\nport = 1\n", ["not valid TOML"]),
    ("replicas-with-fixed-port", GOOD_MODEL + "replicas = 2\nport = 22000\n", ["replicas > 1 cannot share one"]),
    ("missing-model", "[[models]]\ndevice = 'cpu'\n", ["models[0].model", "Field required"]),
    ("bad-dispatch", '[controller]\ndispatch_method = "random"\n', ["controller.dispatch_method", "'lottery'"]),
    ("engine-args-without-vllm", GOOD_MODEL + "[models.engine_args]\nx = 1\n", ["engine_args only apply"]),
    ("vllm-with-8bit", GOOD_MODEL + 'backend = "vllm"\nload_8bit = true\n', ["load_8bit is a transformers option"]),
    (
        "bad-gguf-pattern",
        GOOD_MODEL + 'gguf_file = "q4_k_m"\n',
        ["models[0].gguf_file", "must end in .gguf", "'*q4_k_m.gguf'"],
    ),
    ("bad-reasoning-parser", GOOD_MODEL + 'reasoning_parser = "think"\n', ["models[0].reasoning_parser", "'qwen3'"]),
    ("bad-template", GOOD_MODEL + 'conv_template = "nope"\n', ["unknown conversation template 'nope'", "chatml"]),
    ("bad-controller-address", '[controller]\naddress = "10.0.0.5:21001"\n', ["controller.address", "http(s) URL"]),
    ("bad-login", '[webui]\nauth = ["admin"]\n', ["webui.auth", 'look like "user:password"']),
    ("bad-stack-name", '[stack]\nname = "my stack"\n', ["stack.name", "pattern"]),
    ("backoff-order", "[stack]\nrestart_backoff = 10\nrestart_backoff_max = 1\n", ["restart_backoff must not"]),
]


def _cli(*args: str, home: Path, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **DEFAULT_ENV, "HOME": str(home), "COLUMNS": "200"}
    env.pop("LLMSTACK_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "llmstack", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )


@pytest.mark.parametrize("command", ["config check", "up"])
@pytest.mark.parametrize(("name", "text", "fragments"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_fails_before_start(
    tmp_path: Path, command: str, name: str, text: str, fragments: list[str]
) -> None:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    result = _cli(*command.split(), "-c", str(path), home=tmp_path / "home")
    assert result.returncode == 2, result.stdout + result.stderr
    message = " ".join(result.stderr.split())  # rich may wrap long lines
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {result.stderr}"
    assert not (tmp_path / "home" / ".llmstack").exists()  # nothing was started, not even a run directory


def test_model_keys_become_worker_flags() -> None:
    from llmstack.stack.config import parse_config

    cfg = parse_config({"models": [{"model": "m", "reasoning_parser": "qwen3"}, {"model": "n"}]})
    first, second = (m.args("/p", 1, "http://c") for m in cfg.models)
    assert first[first.index("--reasoning-parser") + 1] == "qwen3"
    assert "--reasoning-parser" not in second  # none by default


def test_the_api_server_keeps_stored_responses_in_the_run_directory(tmp_path: Path) -> None:
    from llmstack.stack.config import parse_config
    from llmstack.stack.plan import build_specs

    cfg = parse_config({"stack": {"run_dir": str(tmp_path / "run")}, "api": {"response_retention": 50}})
    (api,) = build_specs(cfg, ["api"], None)
    assert api.argv[api.argv.index("--state-dir") + 1] == str(tmp_path / "run")
    assert api.argv[api.argv.index("--response-retention") + 1] == "50"


def test_missing_file_is_named(tmp_path: Path) -> None:
    for command in (["config", "check"], ["up"], ["pull"]):
        result = _cli(*command, "-c", str(tmp_path / "nope.toml"), home=tmp_path)
        assert result.returncode == 2
        assert f"{tmp_path / 'nope.toml'}: no such file" in " ".join(result.stderr.split())


def test_default_config_is_stack_toml_in_the_current_directory(tmp_path: Path) -> None:
    result = _cli("config", "check", home=tmp_path, cwd=tmp_path)
    assert result.returncode == 2 and "stack.toml: no such file" in result.stderr


def test_only_a_disabled_role_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text("[webui]\nenabled = false\n")
    result = _cli("up", "-c", str(path), "--only", "webui", home=tmp_path)
    assert result.returncode == 2 and "--only webui: [webui] enabled = false" in result.stderr


def test_config_check_prints_resolved_config_with_ports_and_masked_secrets(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(
        '[stack]\ncluster_token = "tok-s3cr3t"\nrun_dir = "state"\n'
        '[api]\napi_keys = ["sk-s3cr3t"]\n[webui]\nauth = ["ann:pw-s3cr3t"]\n'
        + GOOD_MODEL
        + "replicas = 2\n"
        + GOOD_MODEL.replace("tiny-chat", "other")
        + 'port = 21003\nnames = ["o"]\n'
    )
    result = _cli("config", "check", "-c", str(path), "--json", home=tmp_path)
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    ports = {s["name"]: s["port"] for s in resolved["services"]}
    # 21003 is taken by the fixed port, so the replicas get 21002 and 21004
    assert ports == {
        "controller": 21001,
        "worker-tiny-chat-0": 21002,
        "worker-tiny-chat-1": 21004,
        "worker-o": 21003,
        "api": 8000,
        "webui": 7860,
    }
    assert resolved["run_dir"] == str(tmp_path / "state")
    assert "s3cr3t" not in result.stdout
    human = _cli("config", "check", "-c", str(path), home=tmp_path)
    assert human.returncode == 0 and "is valid" in human.stdout and "worker-tiny-chat-1" in human.stdout
    assert "s3cr3t" not in human.stdout


@pytest.mark.parametrize("path", ["stack.toml", *sorted(p.name for p in (REPO_ROOT / "examples").glob("*.toml"))])
def test_shipped_configs_validate(path: str) -> None:
    file = REPO_ROOT / path if path == "stack.toml" else REPO_ROOT / "examples" / path
    cfg = load_config(file)
    assert cfg.models, f"{path} serves no model"
    assert file.read_text().startswith("#"), f"{path} needs a comment header saying when to use it"


def test_examples_cover_the_documented_setups() -> None:
    names = {p.name for p in (REPO_ROOT / "examples").glob("*.toml")}
    assert {
        "baichuan2-13b-8bit.toml",
        "baichuan2-13b-vllm.toml",
        "two-models.toml",
        "remote-worker.toml",
        "offline-local.toml",
    } <= names
    tutorial = load_config(REPO_ROOT / "examples" / "baichuan2-13b-8bit.toml").models[0]
    assert tutorial.model == "baichuan-inc/Baichuan2-13B-Chat" and tutorial.load_8bit and tutorial.trust_remote_code
    assert tutorial.names == ["Baichuan2-13B-Chat"]
    vllm = load_config(REPO_ROOT / "examples" / "baichuan2-13b-vllm.toml").models[0]
    assert vllm.backend == "vllm" and {"gpu_memory_utilization", "max_model_len"} <= set(vllm.engine_args)
    remote = load_config(REPO_ROOT / "examples" / "remote-worker.toml")
    assert remote.controller.address and not remote.controller.local
    root = load_config(REPO_ROOT / "stack.toml")
    assert root.models[0].model == "Qwen/Qwen2.5-0.5B-Instruct" and root.models[0].source == "modelscope"
    assert root.webui.enabled and root.api.host == "127.0.0.1" and root.controller.host == "127.0.0.1"


def _stack_file(tmp_path: Path, model_dir: Path, **ports: int) -> Path:
    path = tmp_path / "stack.toml"
    path.write_text(
        f'[stack]\nname = "portcheck"\nrun_dir = "run"\n'
        f"[controller]\nport = {ports['controller']}\n"
        f'[[models]]\nmodel = "{model_dir}"\nsource = "local"\ndevice = "cpu"\nport = {ports["worker"]}\n'
        f"[api]\nport = {ports['api']}\n[webui]\nenabled = false\n"
    )
    return path


@pytest.mark.parametrize("busy", ["api", "worker", "controller"])
def test_occupied_port_fails_up_naming_port_and_service(tmp_path: Path, tiny_model_dir: Path, busy: str) -> None:
    ports = {"controller": free_port(), "worker": free_port(), "api": free_port()}
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", ports[busy]))
        blocker.listen()
        path = _stack_file(tmp_path, tiny_model_dir, **ports)
        result = _cli("up", "-c", str(path), "--detach", home=tmp_path)
    service = "worker-" + tiny_model_dir.name if busy == "worker" else busy
    assert result.returncode == 3, result.stdout + result.stderr
    message = " ".join(result.stderr.split())
    assert f"port {ports[busy]} ({service}) is already in use" in message
    assert not (tmp_path / "run" / "state.json").exists()  # nothing was started


def test_missing_local_model_fails_up_before_start(tmp_path: Path) -> None:
    ports = {"controller": free_port(), "worker": free_port(), "api": free_port()}
    path = _stack_file(tmp_path, tmp_path / "no-such-model", **ports)
    result = _cli("up", "-c", str(path), "--detach", home=tmp_path)
    assert result.returncode == 1
    assert "no-such-model does not exist" in " ".join(result.stderr.split())
    assert not (tmp_path / "run" / "state.json").exists()


def test_exposed_services_are_warned_about_loudly(tmp_path: Path, tiny_model_dir: Path) -> None:
    ports = {"controller": free_port(), "worker": free_port(), "api": free_port()}
    path = _stack_file(tmp_path, tiny_model_dir, **ports)
    text = path.read_text().replace(f"[api]\nport = {ports['api']}", f'[api]\nhost = "0.0.0.0"\nport = {ports["api"]}')
    text = text.replace('device = "cpu"', 'device = "cpu"\nhost = "0.0.0.0"\nworker_address = "http://10.1.1.1:1"')
    path.write_text(text)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:  # stops `up` right after the warnings
        blocker.bind(("127.0.0.1", ports["controller"]))
        blocker.listen()
        result = _cli("up", "-c", str(path), "--detach", home=tmp_path)
    assert result.returncode == 3
    message = " ".join(result.stderr.split())
    assert "exposed without protection" in message
    assert f"api listens on 0.0.0.0:{ports['api']} without API keys" in message
    assert "workers do not authenticate requests" in message
    assert "controller listens" not in message  # loopback, and a cluster token is generated anyway
