"""Model resolution: local paths, cache hits with no network, and fast, helpful failures.

The hubs are unreachable from this machine, so the cache-hit paths run against caches laid out exactly as
modelscope 1.40 / huggingface_hub lay them out, and the unreachable path runs for real (no mocks of the hub
libraries). A tiny in-process HTTP server speaking ModelScope's legacy file API exercises the real download
path (modelscope's own client, our progress callbacks, error translation) end to end.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from llmstack.stack.models import (
    DownloadError,
    DownloadFailure,
    hub_endpoints,
    modelscope_cache_path,
    probe_hub,
    resolve_model,
)

MODEL_ID = "Qwen/Qwen2.5-0.5B-Instruct"
HF_SHA = "7ae557604adf67be50417f59c2c2f167def9a775"
UNCACHED_ID = "llmstack-tests/definitely-not-cached-0.1B"


@pytest.fixture(autouse=True)
def _hub_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pin the hub env so a developer's MODELSCOPE_ENDPOINT or HF_ENDPOINT cannot change the outcome."""
    for var in ("MODELSCOPE_ENDPOINT", "MODELSCOPE_DOMAIN", "MODELSCOPE_CACHE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MODELSCOPE_HOME", str(tmp_path / "modelscope-home"))


@pytest.fixture(scope="module", autouse=True)
def _import_hub_libraries() -> None:
    """Import the hub clients once, so timing assertions measure resolution, not a ~1 s import."""
    import huggingface_hub  # noqa: F401
    import modelscope  # noqa: F401


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Fail any attempt to resolve or connect to a non-loopback address, proving a path is offline."""
    attempts: list[object] = []
    real_connect = socket.socket.connect
    real_getaddrinfo = socket.getaddrinfo

    def guarded_getaddrinfo(host: object, *args: object, **kwargs: object) -> object:
        if host not in ("127.0.0.1", "localhost", "::1"):
            attempts.append(host)
            raise OSError(f"test forbids network: getaddrinfo({host!r})")
        return real_getaddrinfo(host, *args, **kwargs)  # type: ignore[arg-type]

    def guarded_connect(self: socket.socket, address: object) -> None:
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "localhost", "::1"):
            attempts.append(address)
            raise OSError(f"test forbids network: connect({address!r})")
        real_connect(self, address)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    return attempts


def _write_fake_model(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 896}))
    (directory / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ----------------------------------------------------------------------------------------------------------
# ModelScope cache hits
# ----------------------------------------------------------------------------------------------------------
def test_modelscope_cache_path_matches_modelscope_layout(tmp_path: Path) -> None:
    expected = tmp_path / "models" / "Qwen--Qwen2.5-0.5B-Instruct" / "snapshots" / "master"
    assert modelscope_cache_path(MODEL_ID, tmp_path) == expected
    assert modelscope_cache_path(MODEL_ID, tmp_path, revision="v1.0").name == "v1.0"


def test_modelscope_cache_path_defaults_to_modelscope_cache_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "env-cache"))
    assert modelscope_cache_path(MODEL_ID) == (
        tmp_path / "env-cache" / "models" / "Qwen--Qwen2.5-0.5B-Instruct" / "snapshots" / "master"
    )


@pytest.mark.parametrize("offline", [False, True])
def test_modelscope_cache_hit_needs_no_network(tmp_path: Path, no_network: list[object], offline: bool) -> None:
    snapshot = tmp_path / "models" / "Qwen--Qwen2.5-0.5B-Instruct" / "snapshots" / "master"
    _write_fake_model(snapshot)

    start = time.monotonic()
    path = resolve_model(MODEL_ID, cache_dir=tmp_path, offline=offline, progress=False)
    elapsed = time.monotonic() - start

    assert path == snapshot
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    assert no_network == []
    assert elapsed < 1.0, f"cache hit took {elapsed:.2f} s"


def test_modelscope_cache_hit_from_env_cache_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[object]
) -> None:
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path))
    _write_fake_model(modelscope_cache_path(MODEL_ID))
    assert resolve_model(MODEL_ID) == modelscope_cache_path(MODEL_ID)
    assert no_network == []


def test_modelscope_cache_hit_at_pinned_revision(tmp_path: Path, no_network: list[object]) -> None:
    _write_fake_model(modelscope_cache_path(MODEL_ID, tmp_path, revision="v1.0"))
    path = resolve_model(MODEL_ID, cache_dir=tmp_path, revision="v1.0", offline=True)
    assert path == modelscope_cache_path(MODEL_ID, tmp_path, revision="v1.0")

    with pytest.raises(DownloadError) as info:
        resolve_model(MODEL_ID, cache_dir=tmp_path, revision="v2.0", offline=True)
    assert info.value.reason is DownloadFailure.NOT_CACHED
    assert no_network == []


def test_modelscope_legacy_cache_layout_is_reused(tmp_path: Path, no_network: list[object]) -> None:
    """Caches written by modelscope < 1.38 (dots spelled ``___``) are still found."""
    legacy = tmp_path / "models" / "Qwen" / "Qwen2___5-0___5B-Instruct"
    _write_fake_model(legacy)
    assert resolve_model(MODEL_ID, cache_dir=tmp_path, offline=True) == legacy
    assert no_network == []


def test_interrupted_download_is_not_a_cache_hit(tmp_path: Path, no_network: list[object]) -> None:
    snapshot = modelscope_cache_path(MODEL_ID, tmp_path)
    _write_fake_model(snapshot)
    (snapshot / "model.safetensors.incomplete").write_bytes(b"half")
    with pytest.raises(DownloadError) as info:
        resolve_model(MODEL_ID, cache_dir=tmp_path, offline=True)
    assert info.value.reason is DownloadFailure.INCOMPLETE
    assert "interrupted" in str(info.value)


def test_missing_index_shard_is_not_a_cache_hit(tmp_path: Path) -> None:
    snapshot = modelscope_cache_path(MODEL_ID, tmp_path)
    _write_fake_model(snapshot)
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (snapshot / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (snapshot / "model-00001-of-00002.safetensors").write_bytes(b"1")
    with pytest.raises(DownloadError) as info:
        resolve_model(MODEL_ID, cache_dir=tmp_path, offline=True)
    assert "model-00002-of-00002.safetensors" in str(info.value)


def test_offline_and_not_cached_says_what_to_do(tmp_path: Path, no_network: list[object]) -> None:
    with pytest.raises(DownloadError) as info:
        resolve_model(UNCACHED_ID, cache_dir=tmp_path, offline=True)
    message = str(info.value)
    assert info.value.reason is DownloadFailure.NOT_CACHED
    assert "Offline mode" in message and "llmstack pull" in message
    assert str(modelscope_cache_path(UNCACHED_ID, tmp_path)) in message
    assert no_network == []


def test_malformed_modelscope_id(tmp_path: Path) -> None:
    with pytest.raises(DownloadError) as info:
        resolve_model("just-a-name", cache_dir=tmp_path)
    assert info.value.reason is DownloadFailure.INVALID_ID


# ----------------------------------------------------------------------------------------------------------
# Unreachable hub: real behaviour, no mocks
# ----------------------------------------------------------------------------------------------------------
def _assert_remedies(message: str, mirror_env: str) -> None:
    assert "local model directory" in message
    assert "llmstack pull" in message and "cache" in message
    assert mirror_env in message and "endpoint=" in message
    assert "offline" in message


@pytest.fixture
def blackhole() -> Iterator[str]:
    """An endpoint that drops connection attempts, as a firewalled hub does: a loopback listener whose accept
    queue is full, so the kernel ignores further SYNs and a connect times out (a closed port would refuse at
    once).  Real sockets: whether the real hubs answer from this machine does not matter."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(3):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        fillers.append(sock)
    time.sleep(0.1)
    endpoint = f"http://127.0.0.1:{port}"
    assert probe_hub((endpoint,)) is not None, "the loopback blackhole accepted a connection"
    try:
        yield endpoint
    finally:
        for sock in [*fillers, server]:
            sock.close()


def test_unreachable_modelscope_fails_fast_with_remedies(
    tmp_path: Path, blackhole: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", blackhole)  # the hub as configured, behind a firewall
    assert hub_endpoints("modelscope") == (blackhole,)
    start = time.monotonic()
    with pytest.raises(DownloadError) as info:
        resolve_model(UNCACHED_ID, cache_dir=tmp_path)
    elapsed = time.monotonic() - start

    assert info.value.reason is DownloadFailure.UNREACHABLE
    assert elapsed < 5.0, f"took {elapsed:.1f} s to report an unreachable hub"
    message = str(info.value)
    assert "Cannot reach the ModelScope hub" in message
    _assert_remedies(message, "MODELSCOPE_ENDPOINT (or MODELSCOPE_DOMAIN)")


@pytest.mark.parametrize("source", ["modelscope", "huggingface"])
def test_unreachable_mirror_endpoint_fails_fast(tmp_path: Path, source: str) -> None:
    """A dead mirror (connection refused) must not sit in the hub client's retry loop (~22 s for ModelScope)."""
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    with pytest.raises(DownloadError) as info:
        resolve_model(UNCACHED_ID, source=source, cache_dir=tmp_path, endpoint=endpoint)  # type: ignore[arg-type]
    assert time.monotonic() - start < 5.0
    assert info.value.reason is DownloadFailure.UNREACHABLE
    assert endpoint in str(info.value)


def test_unreachable_huggingface_fails_fast_with_remedies(
    tmp_path: Path, blackhole: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", blackhole)
    assert hub_endpoints("huggingface") == (blackhole,)
    start = time.monotonic()
    with pytest.raises(DownloadError) as info:
        resolve_model(UNCACHED_ID, source="huggingface", cache_dir=tmp_path)
    assert time.monotonic() - start < 5.0
    assert info.value.reason is DownloadFailure.UNREACHABLE
    _assert_remedies(str(info.value), "HF_ENDPOINT")


def test_modelscope_endpoint_env_is_what_gets_probed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELSCOPE_DOMAIN", "mirror.example.org")
    assert hub_endpoints("modelscope") == ("https://mirror.example.org",)
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", "http://ms.internal:8080/")
    assert hub_endpoints("modelscope") == ("http://ms.internal:8080",)
    assert hub_endpoints("modelscope", "https://explicit") == ("https://explicit",)


# ----------------------------------------------------------------------------------------------------------
# Local paths
# ----------------------------------------------------------------------------------------------------------
def test_local_path_is_returned(tmp_path: Path, no_network: list[object]) -> None:
    model_dir = tmp_path / "my-model"
    _write_fake_model(model_dir)
    assert resolve_model(str(model_dir)) == model_dir.resolve()
    assert resolve_model(str(model_dir), source="huggingface", offline=True) == model_dir.resolve()
    assert no_network == []


def test_relative_and_home_paths_are_expanded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[object]
) -> None:
    _write_fake_model(tmp_path / "models" / "tiny")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_model("./models/tiny") == (tmp_path / "models" / "tiny").resolve()
    assert resolve_model("~/models/tiny") == (tmp_path / "models" / "tiny").resolve()
    assert resolve_model("models/tiny") == (tmp_path / "models" / "tiny").resolve()  # existing dir


def test_missing_local_path_is_a_clear_error(tmp_path: Path, no_network: list[object]) -> None:
    missing = tmp_path / "nowhere" / "model"
    with pytest.raises(DownloadError) as info:
        resolve_model(str(missing))
    assert info.value.reason is DownloadFailure.LOCAL_PATH
    assert str(missing) in str(info.value) and "does not exist" in str(info.value)
    assert no_network == []


def test_local_dir_without_model_files_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(DownloadError) as info:
        resolve_model(str(tmp_path))
    assert info.value.reason is DownloadFailure.LOCAL_PATH
    assert "config.json" in str(info.value)


def test_local_dir_with_only_weights_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    assert resolve_model(str(tmp_path)) == tmp_path.resolve()


# ----------------------------------------------------------------------------------------------------------
# Hugging Face cache hits
# ----------------------------------------------------------------------------------------------------------
def _hf_cache(root: Path, repo_id: str = MODEL_ID, sha: str = HF_SHA) -> Path:
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / sha
    _write_fake_model(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    return snapshot


@pytest.mark.parametrize("offline", [False, True])
def test_huggingface_cache_hit_needs_no_network(tmp_path: Path, no_network: list[object], offline: bool) -> None:
    snapshot = _hf_cache(tmp_path)
    start = time.monotonic()
    path = resolve_model(MODEL_ID, source="huggingface", cache_dir=tmp_path, offline=offline, progress=False)
    assert time.monotonic() - start < 1.0
    assert path == snapshot
    assert no_network == []


def test_huggingface_cache_hit_by_commit(tmp_path: Path, no_network: list[object]) -> None:
    snapshot = _hf_cache(tmp_path)
    assert resolve_model(MODEL_ID, source="huggingface", cache_dir=tmp_path, revision=HF_SHA) == snapshot


def test_huggingface_offline_not_cached(tmp_path: Path, no_network: list[object]) -> None:
    with pytest.raises(DownloadError) as info:
        resolve_model(UNCACHED_ID, source="huggingface", cache_dir=tmp_path, offline=True)
    assert info.value.reason is DownloadFailure.NOT_CACHED
    assert "HF_ENDPOINT" in str(info.value)
    assert no_network == []


# ----------------------------------------------------------------------------------------------------------
# The real ModelScope download path, against a local server speaking ModelScope's file API
# ----------------------------------------------------------------------------------------------------------
FAKE_FILES = {
    "config.json": b'{"model_type": "llama"}',
    "tokenizer.json": b'{"version": "1.0"}',
    "model.safetensors": bytes(range(256)) * 1200,
}
GGUF_FILES = {  # a GGUF repository: one file per quantisation
    "README.md": b"# tiny GGUF",
    "tiny-Q4_K_M.gguf": b"GGUF" + bytes(range(256)) * 40,
    "tiny-Q8_0.gguf": b"GGUF" + bytes(range(256)) * 80,
}
FAKE_REPOS = {"acme/tiny": FAKE_FILES, "acme/tiny-GGUF": GGUF_FILES}


class _FakeModelScope(BaseHTTPRequestHandler):
    """Serves repos 'acme/tiny' and 'acme/tiny-GGUF' with the two endpoints modelscope-hub's downloader
    uses; 404 otherwise."""

    requests: list[str] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        url = urlparse(self.path)
        self.requests.append(url.path)
        query = parse_qs(url.query)
        repo = url.path.removeprefix("/api/v1/models/").removesuffix("/files").removesuffix("/repo")
        served = FAKE_REPOS.get(repo, {})
        if served and url.path.endswith("/repo/files"):
            files = [
                {"Path": name, "Name": name, "Size": len(data), "Sha256": hashlib.sha256(data).hexdigest()}
                | {"Type": "blob"}
                for name, data in served.items()
            ]
            self._send(200, json.dumps({"Code": 200, "Success": True, "Data": {"Files": files}}).encode())
        elif served and url.path.endswith("/repo") and query.get("FilePath", [""])[0] in served:
            self.requests.append(query["FilePath"][0])
            self._send(200, served[query["FilePath"][0]], content_type="application/octet-stream")
        else:
            body = {"Code": 10010205001, "Success": False, "Message": "model not exist"}
            self._send(404, json.dumps(body).encode())

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def fake_modelscope() -> Iterator[str]:
    _FakeModelScope.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeModelScope)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("progress", [True, False])
def test_modelscope_download_then_cache_hit(tmp_path: Path, fake_modelscope: str, progress: bool) -> None:
    path = resolve_model("acme/tiny", cache_dir=tmp_path, endpoint=fake_modelscope, progress=progress)
    assert path == modelscope_cache_path("acme/tiny", tmp_path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == FAKE_FILES

    served = len(_FakeModelScope.requests)
    assert resolve_model("acme/tiny", cache_dir=tmp_path, endpoint=fake_modelscope) == path
    assert len(_FakeModelScope.requests) == served, "a cached model must start with no hub request"


def test_modelscope_endpoint_env_is_honoured_after_first_use(
    tmp_path: Path, fake_modelscope: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """modelscope-hub reads MODELSCOPE_ENDPOINT once per process; we read it per call and pass it on."""
    resolve_model("acme/tiny", cache_dir=tmp_path / "first", endpoint=fake_modelscope, progress=False)
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", fake_modelscope)
    path = resolve_model("acme/tiny", cache_dir=tmp_path / "second", progress=False)
    assert (path / "config.json").read_bytes() == FAKE_FILES["config.json"]


def test_refresh_rechecks_the_hub_but_keeps_cached_files(tmp_path: Path, fake_modelscope: str) -> None:
    path = resolve_model("acme/tiny", cache_dir=tmp_path, endpoint=fake_modelscope, progress=False)
    _FakeModelScope.requests.clear()
    again = resolve_model("acme/tiny", cache_dir=tmp_path, endpoint=fake_modelscope, progress=False, refresh=True)
    assert again == path
    assert "/api/v1/models/acme/tiny/repo/files" in _FakeModelScope.requests  # listed again
    assert "/api/v1/models/acme/tiny/repo" not in _FakeModelScope.requests  # no file fetched twice


def test_probe_is_bounded_by_its_timeout() -> None:
    start = time.monotonic()
    why = probe_hub(("http://192.0.2.1",), timeout=0.5)  # TEST-NET-1: never routed
    assert why is not None and "192.0.2.1" in why
    assert time.monotonic() - start < 2.0


def test_modelscope_unknown_model_is_not_found(tmp_path: Path, fake_modelscope: str) -> None:
    start = time.monotonic()
    with pytest.raises(DownloadError) as info:
        resolve_model("acme/no-such-model", cache_dir=tmp_path, endpoint=fake_modelscope, progress=False)
    assert time.monotonic() - start < 5.0
    assert info.value.reason is DownloadFailure.NOT_FOUND
    assert "acme/no-such-model" in str(info.value) and "spelling" in str(info.value)


def test_progress_callbacks_survive_threads(capsys: pytest.CaptureFixture[str]) -> None:
    """The rich display is fed from modelscope-hub's worker threads, and tqdm redraws stay off the screen."""
    import sys

    from llmstack.stack.models.progress import modelscope_progress

    original = sys.stderr
    with modelscope_progress("acme/tiny", enabled=True) as callbacks:
        assert callbacks is not None
        (callback_cls,) = callbacks

        def fetch(name: str) -> None:
            callback = callback_cls(name, 1000)
            for _ in range(10):
                callback.update(100)
            callback.end()
            callback.end()  # modelscope-hub may end a callback twice on its fallback path

        workers = [threading.Thread(target=fetch, args=(f"shard-{i}.safetensors",)) for i in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        sys.stderr.write("\rDownloading:  50%|#####     | 1/2\r")
        sys.stderr.write("a real warning\n")
    assert sys.stderr is original
    err = capsys.readouterr().err
    assert "a real warning" in err
    assert "Downloading:  50%" not in err


def test_a_gguf_pattern_downloads_that_one_file(tmp_path: Path, fake_modelscope: str) -> None:
    path = resolve_model(
        "acme/tiny-GGUF", cache_dir=tmp_path, endpoint=fake_modelscope, progress=False, gguf_file="*q4_k_m.gguf"
    )
    assert path == modelscope_cache_path("acme/tiny-GGUF", tmp_path) / "tiny-Q4_K_M.gguf"
    assert path.read_bytes() == GGUF_FILES["tiny-Q4_K_M.gguf"]
    assert "tiny-Q4_K_M.gguf" in _FakeModelScope.requests and "tiny-Q8_0.gguf" not in _FakeModelScope.requests
    assert not (path.parent / "tiny-Q8_0.gguf").exists()
    # the next start finds it in the cache: no hub request at all, even offline
    _FakeModelScope.requests.clear()
    again = resolve_model("acme/tiny-GGUF", cache_dir=tmp_path, endpoint=fake_modelscope, gguf_file="*Q4_K_M.gguf")
    assert again == path and _FakeModelScope.requests == []
    offline = resolve_model("acme/tiny-GGUF", cache_dir=tmp_path, offline=True, gguf_file="tiny-Q4_K_M.gguf")
    assert offline == path


def test_a_gguf_pattern_that_matches_none_or_several_downloads_nothing(tmp_path: Path, fake_modelscope: str) -> None:
    from llmstack.services.engines.gguf.header import GGUFError

    for pattern, message in (("*.gguf", "matches 2 files in ModelScope repository acme/tiny-GGUF"),
                             ("*q5_k_m.gguf", "matches no file in ModelScope repository acme/tiny-GGUF")):  # fmt: skip
        with pytest.raises(GGUFError, match=message):
            resolve_model("acme/tiny-GGUF", cache_dir=tmp_path, endpoint=fake_modelscope, gguf_file=pattern)
    assert not [r for r in _FakeModelScope.requests if r.endswith(".gguf")]
    with pytest.raises(DownloadError) as info:
        resolve_model("acme/tiny-GGUF", cache_dir=tmp_path / "empty", offline=True, gguf_file="*q4_k_m.gguf")
    assert info.value.reason == DownloadFailure.NOT_CACHED
