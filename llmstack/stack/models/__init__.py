"""Models on disk: a local directory, or a ModelScope / Hugging Face snapshot fetched cache-first.

`resolve.py` holds the one algorithm (local path, cache, probe, download); `modelscope.py` and
`huggingface.py` adapt the two hub libraries to it (`hub.Hub`); `local.py` checks that a directory is a
usable model; `probe.py` tells an unreachable hub in seconds; `errors.py` and `remedies.py` say what failed
and what to do; `progress.py` draws ModelScope's download bars.
"""

from llmstack.stack.models.errors import DownloadError, DownloadFailure
from llmstack.stack.models.hub import Source
from llmstack.stack.models.modelscope import modelscope_cache_path, modelscope_cache_root
from llmstack.stack.models.probe import PROBE_TIMEOUT_S, probe_hub
from llmstack.stack.models.resolve import hub_endpoints, resolve_model

__all__ = [
    "PROBE_TIMEOUT_S",
    "DownloadError",
    "DownloadFailure",
    "Source",
    "hub_endpoints",
    "modelscope_cache_path",
    "modelscope_cache_root",
    "probe_hub",
    "resolve_model",
]
