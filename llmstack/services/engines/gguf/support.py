"""Which GGUF architectures llmstack can serve, checked from the file's header before anything loads.

Both engines serve a GGUF file through transformers' GGUF loader (the vLLM engine serves the converted
checkpoint, see `convert`), so an architecture transformers cannot read is refused for both, and so is one
that is not a text-generation model (T5, BERT-style encoders).
"""

from __future__ import annotations

from llmstack.services.engines.gguf.header import GGUFError, GGUFHeader

# llama.cpp's architecture names where transformers spells them differently
_TRANSFORMERS_NAMES = {
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gpt-oss": "gpt_oss",
    "minimax-m2": "minimax_m2",
    "t5encoder": "t5",
}
_NOT_GENERATIVE = {"t5", "t5encoder", "umt5", "bert", "nomic-bert", "jina-bert-v2", "clip"}


def transformers_gguf_architectures() -> set[str]:
    """The llama.cpp architecture names the installed transformers can load from GGUF."""
    names: set[str] = set()
    try:
        from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

        names |= set(GGUF_CONFIG_MAPPING) - {"general", "tokenizer"}
    except ImportError:
        pass
    try:  # transformers >= 5.19 also loads some architectures through a second, packed-weights path
        from transformers.integrations.gguf import GGUF_ARCHS

        names |= set(GGUF_ARCHS)
    except ImportError:
        pass
    return names


def check_servable(header: GGUFHeader, backend: str) -> None:
    """Raise `GGUFError` when `backend` cannot serve this file's architecture, naming what would work."""
    arch = header.architecture
    if arch in _NOT_GENERATIVE:
        raise GGUFError(
            f"{header.path} holds a {arch} model, which is not a text-generation model; llmstack serves chat "
            "and completion models from GGUF files (for embeddings use a Hugging Face model directory)."
        )
    known = transformers_gguf_architectures()
    if _TRANSFORMERS_NAMES.get(arch, arch) not in known:
        engine = "the vLLM engine (which serves the converted checkpoint)" if backend == "vllm" else "transformers"
        raise GGUFError(
            f"{header.path} holds a {arch!r} model, and {engine} cannot load that architecture from GGUF "
            f"(the installed transformers reads: {', '.join(sorted(known))}). Use the model's Hugging Face "
            "checkpoint (a directory with config.json and *.safetensors) instead, or a newer transformers."
        )
