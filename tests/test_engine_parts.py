"""Engine building blocks: stop strings, incremental detokenization, chat templates, load planning."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from llmstack.services.engines.hardware import auto_cpu_dtype, cpu_flags
from llmstack.services.engines.hf.loading import EngineConfigError, HFEngineConfig, context_length_of, plan_loading
from llmstack.services.engines.text.decoding import IncrementalDetokenizer, StopStrings
from llmstack.services.engines.text.templates import ChatRenderer, get_template
from llmstack.services.engines.vllm.args import CPU_KV_CACHE_BYTES, cpu_defaults


def feed_all(stops: StopStrings, deltas: list[str]) -> tuple[str, bool]:
    out = []
    for d in deltas:
        text, hit = stops.feed(d)
        out.append(text)
        if hit:
            return "".join(out), True
    return "".join(out) + stops.flush(), False


@pytest.mark.parametrize(
    ("stops", "deltas", "expected", "hit"),
    [
        (["###"], ["Hello", " #", "#", "# after"], "Hello ", True),
        (["###"], ["a#", "b##", "c"], "a#b##c", False),
        (["STOP", "END"], ["xxEN", "D yy"], "xx", True),
        (["\n\n"], ["line\n", "\nmore"], "line", True),
        (["abc"], ["ab"], "ab", False),  # held back, then released at the end
        ([], ["free", "text"], "freetext", False),
        (["北京"], ["我想去北", "京旅行"], "我想去", True),
    ],
)
def test_stop_strings(stops: list[str], deltas: list[str], expected: str, hit: bool) -> None:
    assert feed_all(StopStrings(stops), deltas) == (expected, hit)


def test_stop_strings_hold_back_partial_matches() -> None:
    s = StopStrings(["<|end|>"])
    assert s.feed("answer <|") == ("answer ", False)
    assert s.feed("en") == ("", False)
    assert s.feed("x") == ("<|enx", False)


def test_incremental_detokenizer_matches_full_decode(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "我很想去北京旅行，我应该在哪里做什么？ Then emoji 🚀 and spaces  end."
    prompt = tok.encode("Question:")
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt)
    out = "".join(detok.add(i) for i in ids) + detok.flush()
    assert out == tok.decode(ids, skip_special_tokens=True)


def test_baichuan2_template_uses_reserved_role_tokens(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    renderer = ChatRenderer(tok, "baichuan-inc/Baichuan2-13B-Chat", "baichuan2-chat")
    prompt = renderer.render(
        [
            {"role": "system", "content": "SYS"},
            {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "您好"},
            {"role": "user", "content": "再见"},
        ]
    )
    assert prompt == "SYS<reserved_106>你好<reserved_107>您好<reserved_106>再见<reserved_107>"
    assert "<reserved_106>" in renderer.stop


def test_fallback_template_for_models_without_one(tiny_model_no_template_dir: Path, tiny_model_dir: Path) -> None:
    bare = AutoTokenizer.from_pretrained(tiny_model_no_template_dir)
    guessed = ChatRenderer(bare, "some/baichuan2-7b-chat", None)
    assert guessed.name == "baichuan2-chat"
    default = ChatRenderer(bare, "org/unknown", None)
    assert default.name == "chatml"
    assert default.render([{"role": "user", "content": "hi"}]).endswith("<|im_start|>assistant\n")
    own = ChatRenderer(AutoTokenizer.from_pretrained(tiny_model_dir), "org/x", None)
    assert own.name == "tokenizer"  # the tokenizer's own template comes first
    with pytest.raises(ValueError, match="known templates"):
        get_template("nonsense")
    assert get_template("vicuna").name == "vicuna_v1.1"


def _config(**kwargs: object) -> HFEngineConfig:
    return HFEngineConfig(model_path="/models/x", **kwargs)  # type: ignore[arg-type]


PLAIN = SimpleNamespace(quantization_config=None)
GPTQ = SimpleNamespace(quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 128})


@pytest.mark.parametrize(
    ("cfg", "model_config", "device", "message"),
    [
        (_config(cpu_offloading=True), PLAIN, "cpu", "only works with --load-8bit"),
        (_config(load_8bit=True), PLAIN, "mps", "does not support --device mps"),
        (_config(num_gpus=2), PLAIN, "cpu", "needs --device cuda"),
        (_config(gptq={"ckpt": "x.safetensors"}), GPTQ, "cpu", "not supported"),
        (_config(gptq={"wbits": 4}), PLAIN, "cpu", "is not a GPTQ checkpoint"),
        (_config(gptq={"wbits": 8}), GPTQ, "cpu", "disagrees"),
        (_config(load_8bit=True, awq={"wbits": 4}), PLAIN, "cpu", "cannot be combined"),
        (_config(dtype="float64"), PLAIN, "cpu", "choose auto"),
    ],
)
def test_impossible_loading_options_fail_clearly(cfg, model_config, device, message) -> None:
    with pytest.raises(EngineConfigError, match=message):
        plan_loading(cfg, model_config, device)


def test_loading_plans() -> None:
    import torch

    eight = plan_loading(_config(load_8bit=True), PLAIN, "cpu")
    assert eight.kwargs["device_map"] == "cpu" and eight.move_to is None
    assert eight.kwargs["quantization_config"].load_in_8bit
    plain = plan_loading(_config(revision="v2"), PLAIN, "cpu")
    fast = auto_cpu_dtype(cpu_flags())[0]  # auto on a CPU: what this one computes fast
    assert plain.move_to == "cpu" and plain.kwargs["dtype"] == getattr(torch, fast) and plain.kwargs["revision"] == "v2"
    assert plan_loading(_config(dtype="float32"), PLAIN, "cpu").kwargs["dtype"] == torch.float32
    half = plan_loading(_config(dtype="bfloat16"), PLAIN, "cpu")
    assert half.kwargs["dtype"] == torch.bfloat16


def test_context_length_from_config() -> None:
    assert context_length_of(SimpleNamespace(max_position_embeddings=4096)) == 4096
    assert context_length_of(SimpleNamespace(model_max_length=4096)) == 4096  # Baichuan2
    scaled = SimpleNamespace(max_position_embeddings=2048, rope_scaling={"type": "linear", "factor": 2.0})
    assert context_length_of(scaled) == 4096
    assert (
        context_length_of(SimpleNamespace(max_position_embeddings=4096), SimpleNamespace(model_max_length=512)) == 512
    )


AVX2 = "processor : 0\nflags : fpu sse2 avx avx2 fma\n"
SAPPHIRE = "processor : 0\nflags : avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
GRAVITON = "processor : 0\nFeatures : fp asimd sve bf16 i8mm\n"


def test_auto_dtype_on_a_cpu_is_bfloat16_only_with_bfloat16_units() -> None:
    assert auto_cpu_dtype(cpu_flags(AVX2))[0] == "float32"
    assert "emulated" in auto_cpu_dtype(cpu_flags(AVX2))[1]
    assert auto_cpu_dtype(cpu_flags(SAPPHIRE)) == ("bfloat16", "the CPU has AVX512-BF16 and AMX-BF16")
    assert auto_cpu_dtype(cpu_flags(GRAVITON))[0] == "bfloat16"
    assert cpu_flags("") == set()


def test_vllm_cpu_defaults_fill_only_what_is_left_open() -> None:
    args, notes = cpu_defaults({"model": "/m"}, "float32", 64 * 2**30, {})
    assert args == {"model": "/m", "dtype": "float32", "kv_cache_memory_bytes": CPU_KV_CACHE_BYTES}
    assert len(notes) == 2 and "dtype float32" in notes[0]
    small, _ = cpu_defaults({"model": "/m"}, "bfloat16", 4 * 2**30, {})
    assert small["kv_cache_memory_bytes"] == 2**30 and small["dtype"] == "bfloat16"  # a quarter of what is free
    given = {"model": "/m", "dtype": "half", "gpu_memory_utilization": 0.5}
    assert cpu_defaults(given, "float32", 64 * 2**30, {}) == (given, [])
    env, _ = cpu_defaults({"model": "/m", "dtype": "float32"}, "bfloat16", 64 * 2**30, {"VLLM_CPU_KVCACHE_SPACE": "4"})
    assert env == {"model": "/m", "dtype": "float32"}
