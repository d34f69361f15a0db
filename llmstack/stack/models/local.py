"""Local model directories and GGUF files: used as they are, after checking they look like a model (a
half-finished download or a missing weight shard is caught here, for local paths and for hub snapshots
alike; a GGUF file must have a readable GGUF header)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from llmstack.services.engines.gguf.files import is_gguf_path
from llmstack.services.engines.gguf.header import GGUFError, is_gguf_file, read_header
from llmstack.stack.models.errors import DownloadError, DownloadFailure

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_MARKER_FILES = ("config.json", "adapter_config.json", "model_index.json")
_PART_FILE = re.compile(r"\.\w+_\d+_\d+$")  # modelscope-hub's ranged-download parts: <file>_<start>_<end>


def looks_local(model: str) -> bool:
    if model.startswith(("/", "./", "../", "~")) or model in (".", "..") or is_gguf_path(model):
        return True
    return Path(model).is_dir()


def resolve_local(model: str) -> Path:
    path = Path(model).expanduser().resolve()
    if not path.exists():
        raise DownloadError(
            f"Local model path {path} does not exist. Check the path, or use a hub id such as "
            "'Qwen/Qwen2.5-0.5B-Instruct' to download it.",
            reason=DownloadFailure.LOCAL_PATH,
            model=model,
        )
    if not path.is_dir():
        if is_gguf_path(path) or is_gguf_file(path):  # a GGUF model is one file
            try:
                read_header(path)
            except GGUFError as exc:
                raise DownloadError(str(exc), reason=DownloadFailure.LOCAL_PATH, model=model) from exc
            return path
        raise DownloadError(
            f"Local model path {path} is a file but not a GGUF model file; point it at the model's directory "
            "(the folder holding config.json and the weights) or at a .gguf file.",
            reason=DownloadFailure.LOCAL_PATH,
            model=model,
        )
    problem = check_model_dir(path)
    if problem:
        raise DownloadError(
            f"Local model path {path} does not look like a model: {problem}.",
            reason=DownloadFailure.LOCAL_PATH,
            model=model,
        )
    return path


def check_model_dir(path: Path) -> str | None:
    """Return why ``path`` is not a usable model directory, or None when it is."""
    try:
        names = {p.name for p in path.iterdir()}
    except OSError as exc:
        return f"cannot list it ({exc})"
    partial = sorted(n for n in names if n.endswith(".incomplete") or _PART_FILE.search(n))
    if partial:
        return f"a download was interrupted ({', '.join(partial[:3])} left behind)"
    if not any(m in names for m in _MARKER_FILES) and not any(n.endswith(_WEIGHT_SUFFIXES) for n in names):
        return "no config.json and no weight files (*.safetensors, *.bin, *.gguf) in it"
    for index in sorted(n for n in names if n.endswith(".index.json")):
        shards = _index_shards(path / index)
        missing = sorted(s for s in shards if not (path / s).exists())
        if missing:
            return f"{index} lists weight shards that are missing: {', '.join(missing[:3])}"
    return None


def _index_shards(index: Path) -> set[str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
    except (OSError, ValueError, AttributeError):
        return set()
    return {str(v) for v in weight_map.values()} if isinstance(weight_map, dict) else set()
