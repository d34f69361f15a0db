"""Request bodies of the API server, read the way OpenAI reads them: the JSON parsed here, an unknown
model answered with 404 before any other problem of the body, then strict validation (`"stream": "yes"`
or `"max_tokens": "5"` are type errors, never coerced)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from fastapi import Request
from pydantic import BaseModel, ValidationError

from llmstack.common.errors import InvalidRequest, NotFound
from llmstack.common.http import validation_error

Body = TypeVar("Body", bound=BaseModel)


async def read_json(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        raise InvalidRequest("We could not parse the JSON body of your request: the body is empty; send a JSON object.")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"We could not parse the JSON body of your request: {exc}") from None


def check_model(request: Request, model: Any) -> None:
    """404 for a model name no worker serves or served and the stack does not declare (a known model without
    workers is a 503 later; a declared one that is not loaded is loaded first)."""
    router = request.app.state.router
    if isinstance(model, str) and model and model not in router.by_model and model not in router.known_models:
        catalog = getattr(request.app.state, "catalog", None)
        if catalog is None or catalog.status(model) is None:
            raise NotFound(f"The model '{model}' does not exist.", param="model")


def validate(cls: type[Body], data: Any, at: tuple[str | int, ...] = ()) -> Body:
    """`data` as `cls`, strictly; `at` is where it sits in the body, for the error's `param`."""
    try:
        return cls.model_validate(data, strict=True)
    except ValidationError as exc:
        errors = [{**e, "loc": (*at, *e.get("loc", ()))} for e in exc.errors()]
        raise validation_error(errors) from None


def body(cls: type[Body]) -> Callable[[Request], Awaitable[Body]]:
    """A dependency that reads a request body as `cls` (which has a `model` field)."""

    async def parse(request: Request) -> Body:
        data = await read_json(request)
        if isinstance(data, dict):
            check_model(request, data.get("model"))
        return validate(cls, data)

    return parse
