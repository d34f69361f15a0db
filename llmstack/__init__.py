"""llmstack: a self-hosted, OpenAI-compatible LLM service from one stack.toml."""

__version__ = "0.1.0"
