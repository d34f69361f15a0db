"""GGUF files: the header reader (metadata without tensors) and choosing one file by pattern."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from llmstack.services.engines.gguf.files import check_pattern, match_gguf, pick_gguf_file
from llmstack.services.engines.gguf.header import GGUFError, is_gguf_file, read_header
from tests.support.gguf_files import TOY_TEMPLATE, write_gguf
from tests.support.real_model import gemma_gguf


def test_header_of_the_real_gemma_file_is_cheap_and_complete() -> None:
    path = gemma_gguf()
    started = time.perf_counter()
    header = read_header(path)
    assert time.perf_counter() - started < 2.0  # metadata only: the 253 MB of tensors are not read
    assert header.architecture == "gemma3"
    assert header.name == "Gemma 3 270m"
    assert header.quantization == "Q4_K_M"
    assert header.tensor_types() == {"F32": 109, "Q8_0": 10, "Q5_0": 81, "Q4_K": 27, "Q6_K": 9}
    assert header.parameters == 268_098_176
    assert header.size == path.stat().st_size
    assert header.context_length == 32768
    assert (header.bos_token_id, header.eos_token_id, header.add_bos_token) == (2, 1, True)
    assert header.chat_template is None  # a base model: no template in the file
    assert header.tokens is None  # the vocabulary is skipped unless asked for
    with_vocab = read_header(path, vocab=True)
    assert with_vocab.token(1) == "<eos>"
    assert with_vocab.control_tokens()["<end_of_turn>"] == 106


def test_header_of_a_written_file(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "toy.gguf", arch="llama", name="toy")
    header = read_header(path, vocab=True)
    assert (header.architecture, header.name, header.quantization) == ("llama", "toy", "Q4_K_M")
    assert header.chat_template == TOY_TEMPLATE
    assert header.control_tokens() == {"<s>": 1, "</s>": 2, "<|turn|>": 3, "<|done|>": 4}
    assert [(t.name, t.shape) for t in header.tensors] == [("token_embd.weight", (8, 7))]


def test_files_that_are_not_gguf_get_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="does not exist"):
        read_header(tmp_path / "missing.gguf")
    fake = tmp_path / "fake.gguf"
    fake.write_text('{"this is": "JSON, not a GGUF file"}')
    assert not is_gguf_file(fake)
    with pytest.raises(GGUFError, match=r"is not a GGUF file: it starts with b'\{\"th'"):
        read_header(fake)
    with pytest.raises(GGUFError, match="not a file"):
        read_header(tmp_path)
    whole = write_gguf(tmp_path / "whole.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:200])
    with pytest.raises(GGUFError, match="truncated or damaged"):
        read_header(cut)


def test_a_pattern_picks_exactly_one_file(tmp_path: Path) -> None:
    names = ["model-Q4_K_M.gguf", "model-Q8_0.gguf", "sub/model-F16.gguf", "README.md"]
    assert match_gguf(names, "*q4_k_m.gguf", "repo") == "model-Q4_K_M.gguf"  # case does not matter
    assert match_gguf(names, "*f16.gguf", "repo") == "sub/model-F16.gguf"  # bare names match too
    assert match_gguf(names, "model-Q8_0.gguf", "repo") == "model-Q8_0.gguf"
    with pytest.raises(GGUFError, match=r"matches no file in repo; its \.gguf files are: model-Q4_K_M"):
        match_gguf(names, "*q5_k_m.gguf", "repo")
    with pytest.raises(GGUFError, match="matches 3 files in repo: .*narrower pattern"):
        match_gguf(names, "*.gguf", "repo")
    with pytest.raises(GGUFError, match="holds no .gguf files at all"):
        match_gguf(["config.json"], "*.gguf", "repo")
    with pytest.raises(GGUFError, match="gguf-split"):
        match_gguf(["m-00001-of-00002.gguf", "m-00002-of-00002.gguf"], "m-*.gguf", "repo")
    for name in names[:3]:
        write_gguf(tmp_path / name)
    assert pick_gguf_file(tmp_path, "*Q8_0*.gguf") == tmp_path / "model-Q8_0.gguf"
    with pytest.raises(ValueError, match="must end in .gguf"):
        check_pattern("q4_k_m")


def test_a_converted_copy_is_used_while_it_matches_its_source(tmp_path: Path) -> None:
    from llmstack.services.engines.gguf.convert import (
        FORMAT,
        SIDECAR,
        ConvertedFrom,
        converted_dir,
        file_sha256,
        find_converted,
    )

    source = write_gguf(tmp_path / "toy.gguf")
    root = tmp_path / "cache"
    target = converted_dir(source, "float32", root)
    assert target.parent == root / "gguf" and target.name.startswith("toy-") and target.name.endswith("-float32")
    assert find_converted(source, "float32", root) is None  # nothing converted yet
    target.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (target / name).write_text("{}")
    stat = source.stat()
    sidecar = ConvertedFrom(
        format=FORMAT, source=str(source), size=stat.st_size, mtime_ns=stat.st_mtime_ns,
        sha256=file_sha256(source), dtype="float32", architecture="llama", quantization="Q4_K_M",
        transformers="5", seconds=1.0,
    )  # fmt: skip
    (target / SIDECAR).write_text(sidecar.model_dump_json())
    assert find_converted(source, "float32", root) == target
    assert find_converted(source, "bfloat16", root) is None  # another dtype is another copy
    # touched (or copied) but the same bytes: still used, and the sidecar learns the new mtime
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert find_converted(source, "float32", root) == target
    assert ConvertedFrom.model_validate_json((target / SIDECAR).read_text()).mtime_ns == stat.st_mtime_ns + 10**9
    # changed bytes: converted again
    source.write_bytes(source.read_bytes() + b"\0")
    assert find_converted(source, "float32", root) is None


def test_what_config_check_shows_follows_the_files_own_template(tmp_path: Path) -> None:
    from llmstack.services.engines.gguf.describe import describe_gguf

    own = describe_gguf(write_gguf(tmp_path / "own.gguf"))  # its tokenizer.chat_template ends turns with <|done|>
    assert (own.template, own.template_source) == ("file", "the file's tokenizer.chat_template")
    assert own.stop_tokens == {"</s>": 2, "<|done|>": 4}
    bare = describe_gguf(write_gguf(tmp_path / "Llama-3.2-1B-Instruct-Q4_K_M.gguf", chat_template=None))
    assert (bare.template, bare.template_source) == ("llama-3", "no template in the file: guessed from its name")
    assert bare.stop_tokens == {"</s>": 2}  # the toy vocabulary has no <|eot_id|>
    assert describe_gguf(write_gguf(tmp_path / "x.gguf", arch="foo-arch")).problem is not None
