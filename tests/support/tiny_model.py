"""Tiny, randomly initialised Llama checkpoints built at test time.

Tests need a real Hugging Face model directory (config, safetensors, tokenizer, chat template) so every
code path of the engines runs for real, but downloading one is impossible here and a real one is slow
on CPU. A 2-layer, 128-wide Llama with a freshly trained byte-level BPE tokenizer loads and generates
in milliseconds; its output is gibberish, which is fine for plumbing tests.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS = "<s>"
EOS = "</s>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<pad>"
SPECIAL_TOKENS = [BOS, EOS, IM_START, IM_END, PAD]

# ChatML, tool-aware the way Qwen 2.5 is: tool definitions in the system turn, assistant tool calls as
# <tool_call> JSON, tool results as <tool_response> user turns. String content or OpenAI-style content
# parts ([{"type": "text", "text": ...}]) both render; without tools it is plain ChatML.  Thinking-aware
# the way Qwen3 is, for the variables a request may set: an assistant turn's `reasoning_content` renders
# as a <think> block, `enable_thinking=false` closes an empty one in the generation prompt, and
# `reasoning_effort` (as GPT-OSS reads it) adds a line to the system turn.  None of these render when
# the variables are not set.
CHATML_TEMPLATE = (
    "{%- if reasoning_effort is defined -%}"
    "{{- '<|im_start|>system\\nReasoning: ' + reasoning_effort + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}{{- messages[0]['content'] + '\\n\\n' -}}{%- endif -%}"
    "{{- '# Tools\\n\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not (tools and loop.first and message['role'] == 'system') -%}"
    "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
    "{%- elif message['content'] is none -%}{%- set content = '' -%}"
    "{%- else -%}{%- set content = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' and message['reasoning_content'] -%}"
    "{%- set content = '<think>\\n' + message['reasoning_content'] + '\\n</think>\\n\\n' + content -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] -%}"
    "{{- '<|im_start|>assistant\\n' + content -}}"
    "{%- for call in message['tool_calls'] -%}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' "
    "+ (call['function']['arguments'] | tojson) + '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + content + '\\n</tool_response><|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>' + '\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}{%- endif -%}"
)

_EN_SUBJECTS = [
    "The model",
    "A user",
    "The server",
    "My friend",
    "The worker",
    "Our team",
    "The cat",
    "She",
    "He",
    "The controller",
    "Every client",
    "A small dog",
    "The teacher",
    "Nobody",
    "The scheduler",
    "They",
]
_EN_VERBS = [
    "answers",
    "writes",
    "reads",
    "streams",
    "counts",
    "sends",
    "likes",
    "remembers",
    "explains",
    "translates",
    "forgets",
    "generates",
    "receives",
    "computes",
    "describes",
    "prefers",
    "tests",
]
_EN_OBJECTS = [
    "a short poem",
    "the request",
    "many tokens",
    "a long story about Beijing",
    "the weather today",
    "an embedding vector",
    "three questions",
    "the error message",
    "JSON output",
    "hello world",
    "the capital of France",
    "a recipe for dinner",
    "seven green apples",
    "the first chapter",
    "a quick summary",
    "their travel plans",
    "the meaning of life",
    "an important letter",
]
_EN_TAILS = [
    "quickly.",
    "again and again.",
    "before noon.",
    "with care!",
    "for everyone?",
    "in 2024.",
    "every morning.",
    "without any help.",
    "on Monday.",
    "at the station.",
    "because it is fun.",
]
_ZH_SUBJECTS = ["我", "你", "他们", "我们的老师", "这个模型", "小明", "服务器", "她", "每个学生", "我的朋友"]
_ZH_VERBS = ["很想去", "喜欢", "正在学习", "应该在", "每天都看", "写了", "回答了", "想知道", "打算", "讨论"]
_ZH_OBJECTS = [
    "北京旅行",
    "上海的天气",
    "中文和英文",
    "一个问题",
    "哪里做什么",
    "长城",
    "很多书",
    "人工智能",
    "明天的计划",
    "一首短诗",
    "今天的新闻",
    "春天的花园",
    "机器学习",
    "吃饭的地方",
]
_ZH_TAILS = ["。", "？", "！", "，然后休息。", "，非常好。", "，谢谢你。", "，你觉得呢？"]
_EXTRA = [
    '{"role": "assistant", "content": "ok"}',
    "def main() -> None:\n    print('hi')\n",
    "1 2 3 4 5 6 7 8 9 10 100 1000",
    "Hello, how are you? I am fine, thank you.",
    "我很想去北京旅行，我应该在哪里做什么？",
    "Say this is a test.",
    "café naïve résumé — “quotes” ✓ 😀",
]


def _corpus(seed: int, size: int = 600) -> list[str]:
    """A small deterministic bilingual corpus: enough for useful merges, fast to train on."""
    rng = random.Random(seed)
    lines = list(_EXTRA)
    english = (_EN_SUBJECTS, _EN_VERBS, _EN_OBJECTS, _EN_TAILS)
    chinese = (_ZH_SUBJECTS, _ZH_VERBS, _ZH_OBJECTS, _ZH_TAILS)
    for _ in range(size // 2):
        lines.append(" ".join(rng.choice(words) for words in english))
        lines.append("".join(rng.choice(words) for words in chinese))
    return lines


def build_tokenizer(
    *,
    vocab_size: int = 1024,
    seed: int = 0,
    chat_template: str | None = CHATML_TEMPLATE,
    corpus: list[str] | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (any UTF-8 round-trips) and wrap it the way real chat checkpoints ship;
    `corpus` adds text of its own (a model trained on some texts reads them in fewer tokens)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed) + list(corpus or []), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[EOS, IM_START],
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    if chat_template is not None:
        hf_tok.chat_template = chat_template
    return hf_tok


def _fix_tokenizer_config(dest: Path, chat_template: str | None) -> None:
    """Make the saved tokenizer loadable by transformers 4.x as well as 5.x.

    Transformers 5 records ``tokenizer_class: TokenizersBackend`` (a class 4.x lacks), writes
    ``extra_special_tokens`` as a list (4.x expects a dict of named tokens there), and writes the chat
    template only to ``chat_template.jinja``, which older 4.x releases do not read. 5.x reads the 4.x
    spellings too (checked against 4.57.6 and 5.19.0).
    """
    path = dest / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = cfg.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        cfg["additional_special_tokens"] = extra
    elif extra:
        cfg["extra_special_tokens"] = extra
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    else:
        cfg.pop("chat_template", None)
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_tiny_llama(
    dest: Path,
    *,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 2,
    head_dim: int = 64,
    vocab_size: int = 1024,
    max_position: int = 2048,
    seed: int = 0,
    chat_template: str | None = CHATML_TEMPLATE,
    dtype: torch.dtype = torch.float32,
    corpus: list[str] | None = None,
) -> Path:
    """Write a tiny random ``LlamaForCausalLM`` + tokenizer checkpoint to ``dest`` and return ``dest``.

    head_dim defaults to 64 because vLLM's CPU attention rejects smaller heads. ``vocab_size`` is the BPE
    target; the built-in corpus reaches about 1300 at most. Build time is about 0.1 s after imports.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size=vocab_size, seed=seed, chat_template=chat_template, corpus=corpus)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=head_dim,
        max_position_embeddings=max_position,
        bos_token_id=ids[BOS],
        eos_token_id=ids[IM_END],
        pad_token_id=ids[PAD],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS],
        eos_token_id=ids[IM_END],
        pad_token_id=ids[PAD],
    )
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    _fix_tokenizer_config(dest, chat_template)
    return dest


def build_tiny_llama_no_template(dest: Path, **kwargs: object) -> Path:
    """Same checkpoint without any chat template, to exercise fallback templates."""
    kwargs.pop("chat_template", None)
    path = build_tiny_llama(dest, chat_template=None, **kwargs)  # type: ignore[arg-type]
    (path / "chat_template.jinja").unlink(missing_ok=True)
    return path


@dataclass
class Conversation:
    """One thing a trained tiny model says: `reply` to `messages` (with `tools`), the prompt rendered as
    the worker renders it (the model's chat template, with `template_kwargs`)."""

    messages: list[dict]
    reply: str
    tools: list[dict] | None = None
    template_kwargs: dict = field(default_factory=dict)


def build_tool_caller(
    dest: Path,
    conversations: list[tuple[list[dict], list[dict] | None, str] | Conversation],
    *,
    steps: int = 400,
    seed: int = 0,
) -> Path:
    """A tiny Llama trained (for a few seconds) to answer each conversation with its reply.

    Tool-call and reasoning parsing need a model that really writes `<tool_call>` and `<think>` blocks: a
    random one never does.  Greedy decoding of the trained model reproduces each reply (followed by the
    end-of-turn token) for its own conversation; other prompts get whatever it makes of them.
    Conversations are `(messages, tools, reply)` tuples or `Conversation`s, all trained on together (one
    step over all of them) until every reply token is by far the most likely.  The tokenizer learns the
    conversations' own text too, so their prompts (tool definitions above all) are short and training fast.
    """
    wanted = [c if isinstance(c, Conversation) else Conversation(c[0], c[2], c[1]) for c in conversations]
    plain = build_tokenizer(seed=seed)
    texts = [_prompt(plain, c) + c.reply for c in wanted]
    dest = build_tiny_llama(dest, seed=seed, vocab_size=2048, corpus=texts * 8)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(dest)
    model = LlamaForCausalLM.from_pretrained(dest, dtype=torch.float32)
    rows = _training_rows(tokenizer, wanted)
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        worst = 0.0
        for ids, labels in rows:  # one row at a time: no padding to compute
            logits = model(input_ids=ids).logits[0, :-1]
            target = labels[0, 1:]
            per_token = torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="none")
            worst = max(worst, per_token[target != -100].max().item())
            (per_token.sum() / (target != -100).sum() / len(rows)).backward()
        if worst < 0.1:  # every reply token at p > 0.9: greedy decoding reproduces every reply
            break
        optimizer.step()
    model.eval()
    model.save_pretrained(dest)
    return dest


def _prompt(tokenizer: PreTrainedTokenizerFast, c: Conversation) -> str:
    return tokenizer.apply_chat_template(
        c.messages, tools=c.tools, add_generation_prompt=True, tokenize=False, **c.template_kwargs
    )


def _training_rows(
    tokenizer: PreTrainedTokenizerFast, conversations: list[Conversation]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Prompt + reply ids of each conversation, with labels on the reply (and its end) only."""
    end = tokenizer.convert_tokens_to_ids(IM_END)
    rows = []
    for c in conversations:
        prompt_ids = tokenizer.encode(_prompt(tokenizer, c), add_special_tokens=False)
        reply_ids = tokenizer.encode(c.reply, add_special_tokens=False) + [end]
        rows.append((torch.tensor([prompt_ids + reply_ids]), torch.tensor([[-100] * len(prompt_ids) + reply_ids])))
    return rows
