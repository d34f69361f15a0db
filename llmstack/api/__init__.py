"""The OpenAI-compatible API server: protocol models, routing table, serving logic, app."""
