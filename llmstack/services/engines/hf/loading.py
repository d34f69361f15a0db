"""How a transformers model is loaded, decided before any weight is read: device, dtype, device map,
8-bit, GPTQ/AWQ checks, context length.  Pure decisions, unit-testable without loading a model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_CONTEXT_KEYS = ("max_position_embeddings", "max_sequence_length", "seq_length", "model_max_length", "n_positions")


class EngineConfigError(ValueError):
    """A combination of loading options that cannot work; the message says what to change."""


@dataclass
class HFEngineConfig:
    model_path: str
    model_names: list[str] = field(default_factory=list)
    revision: str | None = None
    device: str = "auto"  # cpu | cuda | mps | auto
    num_gpus: int = 1
    max_gpu_memory: str | None = None
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    load_8bit: bool = False
    cpu_offloading: bool = False
    conv_template: str | None = None
    trust_remote_code: bool = False
    stream_interval: int = 1
    seed: int | None = None
    embed_in_truncate: bool = False
    gptq: dict[str, Any] = field(default_factory=dict)  # wbits, groupsize, act_order, ckpt
    awq: dict[str, Any] = field(default_factory=dict)  # wbits, groupsize, ckpt
    max_batch_size: int = 32  # sequences decoded together in one forward pass
    max_batch_tokens: int = 16384  # KV-cache positions the batch may hold (rows x padded width)
    prefix_caching: bool = True  # reuse the cached keys/values of a prompt's already-seen prefix
    attention_kernel: str = "auto"  # auto | sdpa | matmul (`kernels`)
    compile_decode: str = "auto"  # auto | on | off (`compiled`)


@dataclass
class LoadPlan:
    """What `from_pretrained` gets, decided before any weight is read (and unit-testable)."""

    device: str
    kwargs: dict[str, Any]
    move_to: str | None  # model.to(...) after loading, when no device_map places it


def resolve_device(requested: str) -> str:
    import torch

    if requested != "auto":
        if requested == "cuda" and not torch.cuda.is_available():
            raise EngineConfigError("--device cuda was asked for but no CUDA GPU is visible to torch")
        if requested == "mps" and not torch.backends.mps.is_available():
            raise EngineConfigError("--device mps was asked for but MPS is not available")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _torch_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device == "mps":
            return torch.float16
        from llmstack.services.engines.hardware import this_cpu_dtype

        return getattr(torch, this_cpu_dtype())  # bfloat16 only where the CPU computes it fast
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    except KeyError:
        raise EngineConfigError(f"--dtype {name!r}: choose auto, float32, float16 or bfloat16") from None


def _check_prequantized(cfg: HFEngineConfig, model_config: Any) -> None:
    """GPTQ/AWQ weights load through transformers' own quantizers from the checkpoint's
    `quantization_config`; the tutorial's --gptq-*/--awq-* flags are checked against it."""
    for method, flags in (("gptq", cfg.gptq), ("awq", cfg.awq)):
        given = {k: v for k, v in flags.items() if v not in (None, False, "")}
        if not given:
            continue
        if cfg.load_8bit:
            raise EngineConfigError(f"--load-8bit cannot be combined with --{method}-* (weights are already quantized)")
        if given.get("ckpt"):
            raise EngineConfigError(
                f"--{method}-ckpt (a separate quantized checkpoint) is not supported: transformers loads "
                f"{method.upper()} weights from a checkpoint directory whose config.json has a "
                "quantization_config; point --model-path at that directory"
            )
        qc = getattr(model_config, "quantization_config", None)
        qc = qc if isinstance(qc, dict) else (qc.to_dict() if qc is not None else None)
        if not qc or qc.get("quant_method") != method:
            raise EngineConfigError(
                f"--{method}-* flags were given but {cfg.model_path} is not a {method.upper()} checkpoint "
                "(its config.json has no matching quantization_config)"
            )
        if "wbits" in given and qc.get("bits") not in (None, given["wbits"]):
            raise EngineConfigError(
                f"--{method}-wbits {given['wbits']} disagrees with the checkpoint's {qc['bits']} bits"
            )
        if "groupsize" in given and qc.get("group_size") not in (None, given["groupsize"]):
            raise EngineConfigError(
                f"--{method}-groupsize {given['groupsize']} disagrees with the checkpoint's {qc['group_size']}"
            )


def _check_quant_packages(model_config: Any) -> None:
    from transformers.utils import is_gptqmodel_available, is_llm_awq_available

    qc = getattr(model_config, "quantization_config", None)
    qc = qc if isinstance(qc, dict) else (qc.to_dict() if qc is not None else None)
    method = (qc or {}).get("quant_method")
    if method == "gptq" and not is_gptqmodel_available():
        raise EngineConfigError("this is a GPTQ checkpoint: install the `gptqmodel` package to load it")
    if method == "awq" and not is_llm_awq_available():
        raise EngineConfigError("this is an AWQ checkpoint: install the `autoawq` package to load it")


def plan_loading(cfg: HFEngineConfig, model_config: Any, device: str) -> LoadPlan:
    if cfg.cpu_offloading and not cfg.load_8bit:
        raise EngineConfigError("--cpu-offloading only works with --load-8bit (it offloads 8-bit layers to CPU)")
    if cfg.load_8bit and device == "mps":
        raise EngineConfigError("--load-8bit (bitsandbytes) does not support --device mps")
    if cfg.num_gpus > 1 and device != "cuda":
        raise EngineConfigError(f"--num-gpus {cfg.num_gpus} needs --device cuda (got {device})")
    _check_prequantized(cfg, model_config)
    _check_quant_packages(model_config)

    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code, "dtype": _torch_dtype(cfg.dtype, device)}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    move_to: str | None = None
    max_memory: dict[Any, str] | None = None
    if device == "cuda" and (cfg.num_gpus > 1 or cfg.max_gpu_memory or cfg.cpu_offloading):
        per_gpu = cfg.max_gpu_memory
        if per_gpu is None:
            import torch

            per_gpu = f"{int(torch.cuda.get_device_properties(0).total_memory * 0.85 / 2**30)}GiB"
        max_memory = {i: per_gpu for i in range(cfg.num_gpus)}
        if cfg.cpu_offloading:
            max_memory["cpu"] = "1000GiB"
    if cfg.load_8bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=cfg.cpu_offloading
        )
        kwargs["device_map"] = "cpu" if device == "cpu" else "auto"
        if device == "cpu":
            kwargs["dtype"] = _torch_dtype("float32" if cfg.dtype == "auto" else cfg.dtype, device)
    elif max_memory is not None:
        kwargs["device_map"] = "auto"
    else:
        move_to = device
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    return LoadPlan(device=device, kwargs=kwargs, move_to=move_to)


@dataclass
class Checkpoint:
    """What transformers loads: `path` (a directory or hub id), and for a GGUF file the names (the file's
    `general.name`, its architecture) that help guess a chat template for it."""

    path: str
    hints: tuple[str, ...] = ()


def checkpoint_of(cfg: HFEngineConfig, device: str) -> Checkpoint:
    """A GGUF `model_path` becomes its converted checkpoint in the dtype the model runs in (converted on
    the first start, see `gguf.convert`); anything else is loaded as it is."""
    from llmstack.services.engines.gguf.files import is_gguf_path

    if not is_gguf_path(cfg.model_path):
        return Checkpoint(cfg.model_path)
    from llmstack.services.engines.gguf.convert import convert_gguf
    from llmstack.services.engines.gguf.header import GGUFError, read_header

    dtype = _torch_dtype("float32" if cfg.load_8bit and device == "cpu" else cfg.dtype, device)
    try:
        header = read_header(cfg.model_path)
        path = convert_gguf(cfg.model_path, str(dtype).removeprefix("torch."))
    except GGUFError as exc:
        raise EngineConfigError(str(exc)) from exc
    return Checkpoint(str(path), (header.name, header.architecture))


def context_length_of(model_config: Any, tokenizer: Any | None = None) -> int:
    for key in _CONTEXT_KEYS:
        value = getattr(model_config, key, None)
        if isinstance(value, int) and value > 0:
            scaling = getattr(model_config, "rope_scaling", None) or {}
            factor = scaling.get("factor") if isinstance(scaling, dict) else None
            length = int(value * factor) if isinstance(factor, int | float) and factor > 1 else value
            model_max = getattr(tokenizer, "model_max_length", None)
            if isinstance(model_max, int) and 0 < model_max < length:
                length = model_max
            return length
    return 2048


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list | tuple):
            ids.update(int(x) for x in source)
    return ids


def describe_load(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" if k != "quantization_config" else "8-bit" for k, v in kwargs.items())
