"""Engines: one small async interface (`base.Engine`), one package per backend (`hf/`, `vllm/`), what
they share in `text/`.

`create_engine` turns an engine configuration into an engine; backends are imported only when chosen
(vLLM and torch are heavy, and vLLM is an optional extra).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmstack.services.engines.base import Engine
    from llmstack.services.engines.hf.loading import HFEngineConfig
    from llmstack.services.engines.vllm.args import VLLMEngineConfig


# libgomp, the OpenMP runtime of torch's CPU builds, lets a thread that waits at a barrier spin about
# 300,000 times before it sleeps.  A worker's generation thread shares the cores with its event loop
# (which streams the tokens), the API server and the clients: a spinning OpenMP thread takes a core
# from them, and one descheduled in the middle of a parallel region leaves its partners spinning until
# it runs again.  Measured with the benchmark model on 2 busy cores: 16 concurrent requests 46-78 tok/s
# with the default spin, 226-343 tok/s with 20,000; 1-token latency unchanged.
OPENMP_SPIN_COUNT = "20000"


def tune_openmp(environ: MutableMapping[str, str] = os.environ) -> None:
    """A shorter OpenMP spin for the transformers engine; call before torch is imported.  An
    OMP_WAIT_POLICY or GOMP_SPINCOUNT of the user's own wins."""
    if "OMP_WAIT_POLICY" not in environ and "GOMP_SPINCOUNT" not in environ:
        environ["GOMP_SPINCOUNT"] = OPENMP_SPIN_COUNT


class EngineOptionError(ValueError):
    """Options that cannot work together, or that the chosen backend does not have."""


def create_engine(cfg: HFEngineConfig | VLLMEngineConfig) -> Engine:
    """The engine for a configuration (`services/worker/engine_config.py` builds it from the
    worker's options); raises `EngineOptionError` with a message for people."""
    from llmstack.services.engines.vllm.args import VLLMEngineConfig, VLLMUnavailable

    if not isinstance(cfg, VLLMEngineConfig):
        from llmstack.services.engines.hf.engine import HFEngine

        return HFEngine(cfg)
    from llmstack.services.engines.vllm.engine import VLLMEngine

    try:
        engine = VLLMEngine(cfg)
        engine.check_device()
    except VLLMUnavailable as exc:
        raise EngineOptionError(str(exc)) from None
    except ValueError as exc:
        raise EngineOptionError(str(exc)) from exc
    return engine
