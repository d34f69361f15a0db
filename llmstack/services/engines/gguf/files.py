"""Choosing one GGUF file by name or pattern (`gguf_file = "*q4_k_m.gguf"`) among a directory's or a hub
repository's files: GGUF repositories hold one file per quantisation, and exactly one must be chosen."""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase
from pathlib import Path

from llmstack.services.engines.gguf.header import GGUFError

GGUF_SUFFIX = ".gguf"


def is_gguf_path(value: str | Path) -> bool:
    """A path that names a GGUF file (by its suffix; the file itself is checked when it is read)."""
    return str(value).lower().endswith(GGUF_SUFFIX)


def check_pattern(pattern: str) -> str:
    """A `gguf_file` value must select .gguf files: a name or a glob such as `*q4_k_m.gguf`."""
    if not pattern.strip():
        raise ValueError("gguf_file must not be empty: give a file name or a pattern such as '*q4_k_m.gguf'")
    if not is_gguf_path(pattern) and not pattern.endswith("*"):
        raise ValueError(f"gguf_file {pattern!r} must end in .gguf (or *), e.g. '*q4_k_m.gguf'")
    return pattern


def match_gguf(names: Iterable[str], pattern: str, where: str) -> str:
    """The one name among `names` (paths relative to `where`) that `pattern` selects.

    Matching ignores case (repositories spell quantisations `Q4_K_M` and `q4_k_m`) and tries both the
    relative path and the bare file name, so `*q4_k_m.gguf` finds `sub/model-Q4_K_M.gguf`."""
    candidates = sorted(n for n in names if is_gguf_path(n))
    wanted = pattern.lower()
    hits = [n for n in candidates if _matches(n.lower(), wanted)]
    if len(hits) == 1:
        return hits[0]
    listing = ", ".join(candidates[:12]) + (f" and {len(candidates) - 12} more" if len(candidates) > 12 else "")
    if not hits:
        have = f"its .gguf files are: {listing}" if candidates else "it holds no .gguf files at all"
        raise GGUFError(f"gguf_file {pattern!r} matches no file in {where}; {have}. Set gguf_file to one of them.")
    shown = ", ".join(hits[:8]) + (" ..." if len(hits) > 8 else "")
    split = " (split GGUF files, *-00001-of-*.gguf, cannot be loaded: merge them with llama.cpp's gguf-split)"
    raise GGUFError(
        f"gguf_file {pattern!r} matches {len(hits)} files in {where}: {shown}. Choose one with a narrower "
        f"pattern, e.g. gguf_file = '{hits[0].rsplit('/', 1)[-1]}'" + (split if "-of-" in shown else "") + "."
    )


def _matches(name: str, pattern: str) -> bool:
    return fnmatchcase(name, pattern) or fnmatchcase(name.rsplit("/", 1)[-1], pattern)


def pick_gguf_file(directory: Path, pattern: str) -> Path:
    """The one .gguf file under `directory` that `pattern` selects; `GGUFError` for none or several."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise GGUFError(f"gguf_file {pattern!r} needs a directory to look in, and {root} is not one.")
    names = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and is_gguf_path(p.name)]
    return root / match_gguf(names, pattern, str(root))
