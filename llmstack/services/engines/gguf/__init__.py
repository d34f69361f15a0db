"""GGUF model files (llama.cpp's format, what Ollama and llama.cpp users have on disk), shared by the engines.

`header` reads a file's metadata without touching its tensors (architecture, quantisation, tokenizer
facts); `convert` turns a file into a plain Hugging Face checkpoint once and keeps it in llmstack's cache;
`support` says which engine can load which architecture.  Not an engine itself: both engines use it.
"""
