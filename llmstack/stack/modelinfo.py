"""What each model of a stack will load, for `llmstack config check`: found without downloading anything
and without loading weights (a GGUF file's header; a directory's config.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from llmstack.services.engines.gguf.describe import GGUFSummary, describe_gguf
from llmstack.services.engines.gguf.files import is_gguf_path
from llmstack.services.engines.gguf.header import GGUFError
from llmstack.services.engines.text.templates import guess_template
from llmstack.stack.config import ModelSection, StackConfig
from llmstack.stack.plan import resolve_entry


class ModelReport(BaseModel):
    model: str
    names: list[str]
    backend: str
    path: str | None = None  # what the worker gets as --model-path; None while not downloaded
    state: str  # "ready", "not downloaded" or "unusable"
    detail: str | None = None
    gguf: GGUFSummary | None = None
    architecture: str | None = None  # of a checkpoint directory
    template: str | None = None
    stop_token_ids: list[int] | None = None


def describe_models(cfg: StackConfig) -> list[ModelReport]:
    return [describe_model(cfg, m) for m in cfg.models]


def describe_model(cfg: StackConfig, m: ModelSection) -> ModelReport:
    from llmstack.stack.models import DownloadError, DownloadFailure

    report = ModelReport(model=m.model, names=m.served_names, backend=m.backend, state="ready")
    try:
        path = resolve_entry(cfg, m, offline=True, refresh=False)
    except DownloadError as exc:
        waiting = exc.reason in (DownloadFailure.NOT_CACHED, DownloadFailure.UNREACHABLE)
        state = "not downloaded" if waiting else "unusable"
        hint = "run `llmstack pull` to download it" if waiting else str(exc).splitlines()[0]
        return report.model_copy(update={"state": state, "detail": hint})
    except GGUFError as exc:
        return report.model_copy(update={"state": "unusable", "detail": str(exc)})
    report.path = str(path)
    if is_gguf_path(path):
        summary = describe_gguf(path, m.conv_template, m.backend)
        report.gguf = summary
        report.architecture, report.template = summary.architecture, summary.template
        report.stop_token_ids = sorted(set(summary.stop_tokens.values()))
        if summary.problem:
            report.state, report.detail = "unusable", summary.problem
        return report
    return _describe_directory(report, path, m)


def _describe_directory(report: ModelReport, path: Path, m: ModelSection) -> ModelReport:
    config = _json(path / "config.json")
    generation = _json(path / "generation_config.json")
    tokenizer = _json(path / "tokenizer_config.json")
    report.architecture = ", ".join(config.get("architectures") or []) or config.get("model_type")
    own = tokenizer.get("chat_template") or (path / "chat_template.jinja").is_file()
    if m.conv_template or own:
        report.template = m.conv_template or "the tokenizer's own"
    else:
        report.template = f"{guess_template(str(path), m.model)} (no template in the tokenizer: guessed from its name)"
    eos = generation.get("eos_token_id", config.get("eos_token_id"))
    report.stop_token_ids = sorted(eos if isinstance(eos, list) else [eos]) if eos is not None else None
    return report


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def model_lines(report: ModelReport) -> list[tuple[str, str]]:
    """(label, text) lines for people: what the worker will load."""
    lines: list[tuple[str, str]] = []
    if report.detail and report.state != "unusable":
        lines.append(("note", report.detail))
    g = report.gguf
    if g is not None:
        lines.append(("file", f"{g.file} ({g.size_bytes / 1e6:.0f} MB, GGUF {g.quantization})"))
        context = f", context {g.context_length}" if g.context_length else ""
        lines.append(("architecture", f"{g.architecture} ({g.name}, {g.parameters / 1e6:.0f}M parameters{context})"))
        lines.append(("template", f"{g.template} ({g.template_source})"))
        lines.append(("stop tokens", ", ".join(f"{t} ({i})" for t, i in g.stop_tokens.items()) or "-"))
        if g.add_bos_token is not None:
            lines.append(("bos", f"add_bos_token = {str(g.add_bos_token).lower()} (from the file)"))
    elif report.path:
        lines.append(("directory", report.path))
        lines.append(("architecture", report.architecture or "unknown (no config.json)"))
        lines.append(("template", report.template or "-"))
        eos = report.stop_token_ids
        lines.append(("eos ids", ", ".join(map(str, eos)) if eos else "-"))
    return lines
