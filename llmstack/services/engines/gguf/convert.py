"""A GGUF file as a plain Hugging Face checkpoint, converted once and kept in llmstack's cache.

transformers loads a GGUF file by dequantising it, which takes about a minute for Gemma 3 270M on two
cores (most of it building the 262k-token tokenizer and parsing the metadata); loading the same weights
from safetensors takes seconds.  So the first start converts (model.safetensors in the chosen dtype,
tokenizer, config) into::

    <cache>/gguf/<file stem>-<hash of its path>-<dtype>/     cache: $LLMSTACK_CACHE, else ~/.cache/llmstack
        config.json  generation_config.json  model.safetensors  tokenizer.json  tokenizer_config.json
        llmstack-gguf.json      the sidecar: source path, size, mtime, sha256, dtype, what converted it

and later starts use it while the source file's size and mtime (or, when only the mtime changed, its
sha256) still match.  The tokenizer keeps what the file says and transformers' conversion forgets: the
`tokenizer.ggml.add_bos_token`/`add_eos_token` flags and the file's `tokenizer.chat_template`.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path

from pydantic import BaseModel, ValidationError

from llmstack.common.cache import cache_root
from llmstack.services.engines.gguf.header import GGUFError, GGUFHeader, read_header
from llmstack.services.engines.gguf.support import check_servable

log = logging.getLogger("llmstack.gguf")

FORMAT = 1  # bump when the converted layout changes: older copies are then converted again
SIDECAR = "llmstack-gguf.json"
_NEEDED = ("config.json", "model.safetensors", "tokenizer_config.json")
DTYPES = ("float32", "float16", "bfloat16")


class ConvertedFrom(BaseModel):
    """The sidecar: which file a converted checkpoint came from, and how."""

    format: int
    source: str
    size: int
    mtime_ns: int
    sha256: str
    dtype: str
    architecture: str
    quantization: str
    transformers: str
    seconds: float


def converted_dir(gguf: Path, dtype: str, root: Path | None = None) -> Path:
    """Where the conversion of `gguf` in `dtype` lives (whether or not it exists yet)."""
    source = Path(gguf).expanduser().resolve()
    key = hashlib.sha256(str(source).encode()).hexdigest()[:12]
    return (root or cache_root()) / "gguf" / f"{source.stem}-{key}-{dtype}"


def find_converted(gguf: Path, dtype: str, root: Path | None = None) -> Path | None:
    """The cached conversion of `gguf` in `dtype` when it is complete and still matches the file."""
    target = converted_dir(gguf, dtype, root)
    sidecar = _read_sidecar(target)
    if sidecar is None or sidecar.format != FORMAT or sidecar.dtype != dtype:
        return None
    if any(not (target / name).is_file() for name in _NEEDED):
        return None
    stat = Path(gguf).expanduser().resolve().stat()
    if sidecar.size != stat.st_size:
        return None
    if sidecar.mtime_ns != stat.st_mtime_ns:  # touched or copied: the same bytes still count
        if file_sha256(gguf) != sidecar.sha256:
            return None
        _write_sidecar(target, sidecar.model_copy(update={"mtime_ns": stat.st_mtime_ns}))
    return target


def convert_gguf(gguf: str | Path, dtype: str = "float32", root: Path | None = None) -> Path:
    """A checkpoint directory for `gguf` in `dtype`: the cached conversion, else one made now (logged with
    its progress).  Concurrent callers (replicas starting together) convert once: the others wait."""
    if dtype not in DTYPES:
        raise GGUFError(f"cannot convert a GGUF file to dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    path = Path(gguf).expanduser().resolve()
    header = read_header(path)
    check_servable(header, "transformers")
    found = find_converted(path, dtype, root)
    if found is not None:
        log.info("using the converted copy of %s in %s", path.name, found)
        return found
    from filelock import FileLock

    target = converted_dir(path, dtype, root)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        found = find_converted(path, dtype, root)
        if found is not None:
            return found
        _convert(header, dtype, target)
    return target


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _convert(header: GGUFHeader, dtype: str, target: Path) -> None:
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = header.path
    where, name = str(path.parent), path.name
    started = time.perf_counter()
    log.info(
        "converting %s (%s, %s, %.0f MB) to a %s checkpoint in %s: once, the next start loads that "
        "(about a minute per GB of GGUF here)",
        name, header.architecture, header.quantization, header.size / 1e6, dtype, target,
    )  # fmt: skip
    log.info("conversion 1/4: reading the model configuration")
    config = AutoConfig.from_pretrained(where, gguf_file=name)
    log.info("conversion 2/4: building the tokenizer from the file's vocabulary")
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    _keep_tokenizer_metadata(tokenizer, header)
    log.info("conversion 3/4: dequantising the weights to %s", dtype)
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, config=config, dtype=getattr(torch, dtype))
    # loaded from GGUF, the model is flagged as quantised and refuses save_pretrained; its weights are
    # plain tensors of `dtype` by now, so it is saved as the plain checkpoint it is
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    log.info("conversion 4/4: writing model.safetensors")
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    del model
    stat = path.stat()
    _write_sidecar(
        partial,
        ConvertedFrom(
            format=FORMAT,
            source=str(path),
            size=stat.st_size,
            mtime_ns=stat.st_mtime_ns,
            sha256=file_sha256(path),
            dtype=dtype,
            architecture=header.architecture,
            quantization=header.quantization,
            transformers=transformers.__version__,
            seconds=round(time.perf_counter() - started, 1),
        ),
    )
    shutil.rmtree(target, ignore_errors=True)  # an outdated conversion
    partial.rename(target)
    log.info("converted %s in %.0f s", name, time.perf_counter() - started)


def _keep_tokenizer_metadata(tokenizer: object, header: GGUFHeader) -> None:
    """What the file says about its tokenizer that transformers' conversion drops."""
    for flag in ("add_bos_token", "add_eos_token"):
        value = getattr(header, flag)
        if value is not None:
            setattr(tokenizer, flag, value)  # without <bos>, Gemma writes garbage
    if header.chat_template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = header.chat_template  # type: ignore[attr-defined]


def _read_sidecar(target: Path) -> ConvertedFrom | None:
    try:
        return ConvertedFrom.model_validate_json((target / SIDECAR).read_text(encoding="utf-8"))
    except (OSError, ValidationError):
        return None


def _write_sidecar(target: Path, sidecar: ConvertedFrom) -> None:
    tmp = target / (SIDECAR + ".tmp")
    tmp.write_text(sidecar.model_dump_json(indent=2), encoding="utf-8")
    tmp.replace(target / SIDECAR)
