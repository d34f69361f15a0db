"""A GGUF file's metadata, read without touching its tensors.

Layout (GGUF v2/v3, little-endian)::

    "GGUF" | version u32 | tensor count u64 | metadata count u64
    metadata:  key (u64 length + UTF-8) | value type u32 | value
    tensors:   name | dimension count u32 | dimensions u64... | ggml type u32 | data offset u64

Strings are a u64 length and UTF-8 bytes; arrays an element type u32, a u64 count and the elements.  The
file is memory-mapped and only the metadata pages are read, so a multi-gigabyte file costs milliseconds;
the 262k-entry vocabulary of Gemma is walked (skipped) unless `vocab=True` asks for it.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any

MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_FIXED = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_VOCAB_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type")
CONTROL_TOKEN = 3  # tokenizer.ggml.token_type of special tokens such as <bos>, <end_of_turn>


class GGUFError(ValueError):
    """A file that is not a readable GGUF model; the message names the file and the problem."""


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # in ggml order (fastest-moving dimension first)
    ggml_type: int


@dataclass
class GGUFHeader:
    """What a GGUF file says about itself.  `metadata` holds every key; arrays of strings that were not
    asked for are kept as their length."""

    path: Path
    size: int
    version: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensor] = field(default_factory=list)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    @property
    def name(self) -> str:
        return str(self.metadata.get("general.name") or self.path.stem)

    @property
    def context_length(self) -> int | None:
        value = self.metadata.get(f"{self.architecture}.context_length")
        return int(value) if isinstance(value, int) else None

    @property
    def parameters(self) -> int:
        return sum(prod(t.shape) for t in self.tensors)

    @property
    def quantization(self) -> str:
        """The file type llama.cpp names it by (`Q4_K_M`, `F16`, ...), else the tensor types it holds."""
        import gguf

        file_type = self.metadata.get("general.file_type")
        if isinstance(file_type, int):
            try:
                return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_")
            except ValueError:
                pass
        return "+".join(sorted(self.tensor_types())) or "unknown"

    def tensor_types(self) -> dict[str, int]:
        """How many tensors of each ggml type (`{"Q4_K": 27, "F32": 109, ...}`)."""
        import gguf

        counts: dict[str, int] = {}
        for t in self.tensors:
            try:
                name = gguf.GGMLQuantizationType(t.ggml_type).name
            except ValueError:
                name = f"type{t.ggml_type}"
            counts[name] = counts.get(name, 0) + 1
        return counts

    # -- tokenizer facts ------------------------------------------------------------------------------
    def _token_id(self, key: str) -> int | None:
        value = self.metadata.get(f"tokenizer.ggml.{key}")
        return int(value) if isinstance(value, int) else None

    @property
    def bos_token_id(self) -> int | None:
        return self._token_id("bos_token_id")

    @property
    def eos_token_id(self) -> int | None:
        return self._token_id("eos_token_id")

    @property
    def add_bos_token(self) -> bool | None:
        value = self.metadata.get("tokenizer.ggml.add_bos_token")
        return bool(value) if value is not None else None

    @property
    def add_eos_token(self) -> bool | None:
        value = self.metadata.get("tokenizer.ggml.add_eos_token")
        return bool(value) if value is not None else None

    @property
    def chat_template(self) -> str | None:
        value = self.metadata.get("tokenizer.chat_template")
        return value if isinstance(value, str) and value.strip() else None

    @property
    def tokens(self) -> list[str] | None:
        """The vocabulary, when it was read (`read_header(..., vocab=True)`)."""
        value = self.metadata.get("tokenizer.ggml.tokens")
        return value if isinstance(value, list) else None

    def token(self, token_id: int | None) -> str | None:
        tokens = self.tokens
        if token_id is None or tokens is None or not 0 <= token_id < len(tokens):
            return None
        return tokens[token_id]

    def control_tokens(self) -> dict[str, int]:
        """Special tokens (`<bos>`, `<end_of_turn>`, `<|im_end|>`...) by text, when the vocabulary was read."""
        tokens, types = self.tokens, self.metadata.get("tokenizer.ggml.token_type")
        if tokens is None or not isinstance(types, list):
            return {}
        return {t: i for i, (t, kind) in enumerate(zip(tokens, types, strict=False)) if kind == CONTROL_TOKEN}


def is_gguf_file(path: Path) -> bool:
    """True when `path` is a file that starts with the GGUF magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def read_header(path: str | Path, *, vocab: bool = False) -> GGUFHeader:
    """Parse the metadata and tensor table of a GGUF file; raises `GGUFError` for anything else."""
    path = Path(path).expanduser()
    if not path.exists():
        raise GGUFError(f"GGUF file {path} does not exist; check the path (or the gguf_file pattern).")
    if not path.is_file():
        raise GGUFError(f"{path} is not a file; a GGUF model is a single .gguf file.")
    try:
        with open(path, "rb") as f:
            size = path.stat().st_size
            if size < 24:
                raise GGUFError(f"{path} is not a GGUF file: it is only {size} bytes long.")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
                return _parse(path, size, blob, vocab)
    except OSError as exc:
        raise GGUFError(f"cannot read {path}: {exc}") from exc


def _parse(path: Path, size: int, blob: mmap.mmap, vocab: bool) -> GGUFHeader:
    magic = bytes(blob[:4])
    if magic != MAGIC:
        raise GGUFError(
            f"{path} is not a GGUF file: it starts with {magic!r}, a GGUF file starts with b'GGUF'. "
            "Point the model at a .gguf file (llama.cpp's format) or at a Hugging Face model directory."
        )
    version, tensor_count, kv_count = struct.unpack_from("<IQQ", blob, 4)
    if version not in _VERSIONS:
        raise GGUFError(f"{path} is GGUF version {version}; llmstack reads versions 2 and 3 (re-export it).")
    reader = _Reader(blob, 24, path)
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = reader.string()
        metadata[key] = reader.value(reader.u32(), keep=vocab and key in _VOCAB_KEYS)
    tensors = []
    for _ in range(tensor_count):
        name = reader.string()
        dims = reader.unpack(f"<{reader.u32()}Q")
        ggml_type = reader.u32()
        reader.unpack("<Q")  # data offset: not needed without the tensors
        tensors.append(GGUFTensor(name, tuple(int(d) for d in dims), ggml_type))
    if "general.architecture" not in metadata:
        raise GGUFError(f"{path} has no general.architecture in its metadata; it is not a model file.")
    return GGUFHeader(path=path, size=size, version=version, metadata=metadata, tensors=tensors)


class _Reader:
    def __init__(self, blob: mmap.mmap, pos: int, path: Path) -> None:
        self.blob, self.pos, self.path = blob, pos, path

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        try:
            values = struct.unpack_from(fmt, self.blob, self.pos)
        except struct.error:
            raise GGUFError(f"{self.path} is truncated or damaged (its metadata ends early).") from None
        self.pos += struct.calcsize(fmt)
        return values

    def u32(self) -> int:
        return int(self.unpack("<I")[0])

    def string(self) -> str:
        (length,) = self.unpack("<Q")
        end = self.pos + length
        if end > len(self.blob):
            raise GGUFError(f"{self.path} is truncated or damaged (a string runs past the end of the file).")
        text = self.blob[self.pos : end].decode("utf-8", errors="replace")
        self.pos = end
        return text

    def value(self, kind: int, keep: bool = False) -> Any:
        if kind in _FIXED:
            return self.unpack(_FIXED[kind])[0]
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise GGUFError(f"{self.path} holds a metadata value of unknown type {kind}; it may be damaged.")
        element, count = self.unpack("<IQ")
        if element in _FIXED:
            if not keep and count > 64:  # long numeric arrays (scores, token types) as their length
                self.pos += struct.calcsize(_FIXED[element]) * count
                return count
            return list(self.unpack(f"<{count}{_FIXED[element][1:]}"))
        if element == _STRING:
            if keep:
                return [self.string() for _ in range(count)]
            for _ in range(count):  # variable length: walk it
                (length,) = self.unpack("<Q")
                self.pos += length
            return count
        return [self.value(element) for _ in range(count)]
