"""`/v1/embeddings`: one post to a worker, OpenAI's list of vectors (floats or base64)."""

from __future__ import annotations

import base64
import struct
from typing import Any

from llmstack.common.errors import LLMStackError
from llmstack.common.metrics import RequestTracker
from llmstack.common.wire import EmbedReply
from llmstack.services.api.protocol import EmbeddingRequest
from llmstack.services.api.upstream import WorkerStream


class Embeddings:
    def __init__(self, workers: WorkerStream) -> None:
        self.workers = workers

    async def create(self, req: EmbeddingRequest, tracker: RequestTracker) -> dict[str, Any]:
        reply = EmbedReply.model_validate(await self.workers.post(req.model, "/embeddings", {"input": req.inputs}))
        tracker.usage(reply.prompt_tokens, 0)
        dims = len(reply.embeddings[0]) if reply.embeddings else 0
        if req.dimensions is not None and req.dimensions != dims:
            raise LLMStackError.from_body(
                {
                    "error": {
                        "type": "invalid_request_error",
                        "message": f"this model only returns {dims} dimensions",
                        "param": "dimensions",
                    }
                }
            )
        data = []
        for i, vector in enumerate(reply.embeddings):
            value: Any = vector
            if req.encoding_format == "base64":
                value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": value})
        return {
            "object": "list",
            "data": data,
            "model": req.model,
            "usage": {"prompt_tokens": reply.prompt_tokens, "total_tokens": reply.prompt_tokens},
        }
