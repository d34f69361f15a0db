"""The API server: the app (`app`: routes and auth), request bodies read strictly (`bodies`), request
models (`protocol`), the routing table synced from the controller (`routing`), the hop to a worker
(`upstream`), and one serving module or package per endpoint over shared streaming pieces (`streaming`):
`chat`, `completions`, `embeddings`, `tokenize`, `responses/` (OpenAI's Responses API) and `messages/`
(Anthropic's Messages API); `keys/` holds the named API keys: who may call, for which models, how fast,
and the usage they are recorded with."""
