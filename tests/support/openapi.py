"""Validate API payloads against OpenAI's own OpenAPI document (pinned in tests/data/openai-openapi).

Being "OpenAI-compatible" is checked against the source of truth, not against our own pydantic models.
The document declares OpenAPI 3.1 but still uses the 3.0 ``nullable`` keyword, and a few fields are
stricter than what the real API sends; the patches below fix that (see the README next to the file).

Parsing the 3 MB YAML costs about a second, so the patched document is cached as JSON in the temp dir,
keyed by the file's hash and :data:`PATCH_VERSION`, and kept in memory once per process.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match, relevance
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_DIR = Path(__file__).resolve().parents[1] / "data" / "openai-openapi"
SPEC_PATH = SPEC_DIR / "openapi.yaml"
BASE_URI = "urn:openai-openapi"
PATCH_VERSION = "2"  # bump when _patch() changes, to invalidate the on-disk cache

COMPLETION = "CreateCompletionResponse"
#: Synthetic schema: a streamed /v1/completions chunk (finish_reason null until the last chunk).
COMPLETION_STREAM = "CreateCompletionStreamResponse"

_NULL = {"type": "null"}
_MAX_ERRORS = 5


class _Loader(yaml.CSafeLoader if hasattr(yaml, "CSafeLoader") else yaml.SafeLoader):  # type: ignore[misc]
    """Safe loader that keeps dates as strings, so the document stays JSON-serialisable."""


_Loader.yaml_implicit_resolvers = {
    key: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """Wrap a schema so that JSON null is accepted too."""
    return {"anyOf": [schema, _NULL]}


def _rewrite_nullable(node: Any) -> Any:
    """Turn every OpenAPI 3.0 ``nullable: true`` into a 2020-12 ``anyOf [..., null]``."""
    if isinstance(node, list):
        return [_rewrite_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _rewrite_nullable(value) for key, value in node.items()}
    flag = out.get("nullable")
    if isinstance(flag, bool):
        del out["nullable"]
        if flag:
            return _nullable(out)
    return out


def _patch(doc: dict[str, Any]) -> dict[str, Any]:
    """Apply the README's patches, each matching what the real API sends."""
    doc = _rewrite_nullable(doc)
    schemas = doc["components"]["schemas"]
    for name in ("CreateChatCompletionResponse", "CreateChatCompletionStreamResponse", COMPLETION):
        props = schemas[name]["properties"]
        props["system_fingerprint"] = _nullable(props["system_fingerprint"])
    # with echo, the prompt's first token has no log-probability: null in both lists
    logprobs = schemas[COMPLETION]["properties"]["choices"]["items"]["properties"]["logprobs"]["anyOf"][0]
    for key in ("token_logprobs", "top_logprobs"):
        logprobs["properties"][key]["items"] = _nullable(logprobs["properties"][key]["items"])
    stream = copy.deepcopy(schemas[COMPLETION])
    choice_props = stream["properties"]["choices"]["items"]["properties"]
    choice_props["finish_reason"] = _nullable(choice_props["finish_reason"])
    stream["description"] = "A streamed completion chunk: finish_reason is null until the last chunk."
    schemas[COMPLETION_STREAM] = stream
    emb = schemas["Embedding"]["properties"]
    emb["embedding"] = {"anyOf": [emb["embedding"], {"type": "string", "description": "base64 float32"}]}
    return doc


def _cache_path(raw: bytes) -> Path:
    digest = hashlib.sha256(raw + PATCH_VERSION.encode()).hexdigest()[:20]
    return Path(tempfile.gettempdir()) / "llmstack-test-openapi" / f"openapi-{digest}.json"


@lru_cache(maxsize=1)
def load_document() -> dict[str, Any]:
    """The patched OpenAPI document (parsed once per process, cached on disk across processes)."""
    raw = SPEC_PATH.read_bytes()
    cache = _cache_path(raw)
    try:
        return json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    doc = _patch(yaml.load(raw, Loader=_Loader))  # _Loader is a SafeLoader
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(doc, fh)
        os.replace(tmp, cache)  # atomic: parallel test processes never read a half-written file
    except OSError:
        pass
    return doc


@lru_cache(maxsize=1)
def _registry() -> Registry:
    resource = Resource.from_contents(load_document(), default_specification=DRAFT202012)
    return Registry().with_resource(BASE_URI, resource)


@cache
def validator(name: str) -> Draft202012Validator:
    """A validator for ``#/components/schemas/<name>``, resolving refs across the whole document."""
    if name not in load_document()["components"]["schemas"]:
        raise KeyError(f"no schema {name!r} in {SPEC_PATH}")
    return Draft202012Validator({"$ref": f"{BASE_URI}#/components/schemas/{name}"}, registry=_registry())


def _path(error: ValidationError) -> str:
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)


def _describe(error: ValidationError) -> str:
    """One readable line per error; for anyOf/oneOf failures, the most relevant sub-error too."""
    line = f"  at {_path(error)}: {error.message}"
    if error.context:
        deepest = best_match(error.context)
        if deepest is not None:
            line += f"\n    (best branch: at {_path(deepest)}: {deepest.message})"
    return line


def validate(name: str, instance: Any) -> None:
    """Assert that ``instance`` is valid against OpenAI's schema ``name``; the message names each error path.

    Names: CreateChatCompletionResponse, CreateChatCompletionStreamResponse, CreateCompletionResponse,
    CreateCompletionStreamResponse (synthetic), CreateEmbeddingResponse, ListModelsResponse, Model,
    ErrorResponse (a whole ``{"error": {...}}`` body), Error, CompletionUsage, or any other schema in it.
    """
    errors = sorted(validator(name).iter_errors(instance), key=relevance, reverse=True)
    if not errors:
        return
    shown = "\n".join(_describe(e) for e in errors[:_MAX_ERRORS])
    more = f"\n  ... and {len(errors) - _MAX_ERRORS} more" if len(errors) > _MAX_ERRORS else ""
    hint = ""
    if name == COMPLETION and any("finish_reason" in e.absolute_path for e in errors):
        hint = f"\n  hint: validate streamed completion chunks with {COMPLETION_STREAM!r}"
    body = json.dumps(instance, ensure_ascii=False, default=str)
    if len(body) > 600:
        body = body[:600] + "..."
    raise AssertionError(f"not a valid OpenAI {name}:\n{shown}{more}{hint}\n  instance: {body}")
