"""The OpenAI-compatible API server: the app (`app`), request models (`protocol`), the routing table synced
from the controller (`routing`), the hop to a worker (`upstream`), and one serving module per endpoint
(`chat`, `completions`, `embeddings`) over shared streaming pieces (`streaming`); `keys/` holds the named API
keys: who may call, for which models, how fast, and the usage they are recorded with."""
