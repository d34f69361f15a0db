"""Small GGUF files written at test time (header, vocabulary and one tiny tensor), for the paths that read
a file's metadata or refuse it: an architecture no engine loads, a file named .gguf that is not one."""

from __future__ import annotations

from pathlib import Path

TOY_TEMPLATE = "{% for m in messages %}<|turn|>{{ m['content'] }}<|done|>{% endfor %}"


def write_gguf(
    path: Path,
    *,
    arch: str = "llama",
    name: str = "toy",
    chat_template: str | None = TOY_TEMPLATE,
    file_type: int = 15,  # Q4_K_M
) -> Path:
    import gguf
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_context_length(256)
    writer.add_file_type(file_type)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>", "<|turn|>", "<|done|>", "a", "b"])
    writer.add_token_types([2, 3, 3, 3, 3, 1, 1])  # 3: control (special) tokens
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.add_tensor("token_embd.weight", np.zeros((7, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
