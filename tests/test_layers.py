"""The folder tree is the architecture, and imports keep to it (see `llmstack/__init__.py`):

    cli -> stack -> services -> common,   cli -> faces -> common

Nothing imports `cli`; `common` imports nothing else of llmstack; faces never import stack or services;
services never import stack; the transformers and vLLM engine packages never import each other; the API
server never imports a worker or an engine.  Every import in every module counts, lazy ones inside
functions and `TYPE_CHECKING` ones too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llmstack"

# (importer prefix, imported prefix, why not)
FORBIDDEN: list[tuple[str, str, str]] = [
    ("llmstack", "llmstack.cli", "nothing imports the command line"),
    ("llmstack.stack", "llmstack.faces", "the stack starts faces as processes; it does not import them"),
    ("llmstack.faces", "llmstack.stack", "faces get plain values from the CLI, not stack files"),
    ("llmstack.faces", "llmstack.services", "faces talk to services over HTTP"),
    ("llmstack.services", "llmstack.stack", "services run alone, without a stack"),
    ("llmstack.services", "llmstack.faces", "services do not know their clients"),
    ("llmstack.services.engines.hf", "llmstack.services.engines.vllm", "engines share only engines/text"),
    ("llmstack.services.engines.vllm", "llmstack.services.engines.hf", "engines share only engines/text"),
    ("llmstack.services.api", "llmstack.services.worker", "the API server reaches workers over HTTP"),
    ("llmstack.services.api", "llmstack.services.engines", "the API server reaches engines through workers"),
]


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, absolute module) for every llmstack import in the file, relative ones resolved."""
    here = module_name(path, root)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]  # `from pkg import mod`
    return [(line, name) for line, name in found if name == "llmstack" or name.startswith("llmstack.")]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(root: Path = PACKAGE) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        importer = module_name(path, root)
        for line, imported in imports_of(path, root):
            where = f"{path.relative_to(root.parent)}:{line} imports {imported}"
            if _under(importer, "llmstack.common") and not _under(imported, "llmstack.common"):
                problems.append(f"{where}: common imports only common")
            for source, target, why in FORBIDDEN:
                if importer == "llmstack.__main__":  # `python -m llmstack` is the command line's entry point
                    continue
                if _under(importer, source) and _under(imported, target) and not _under(importer, target):
                    problems.append(f"{where}: {why}")
    return problems


def test_imports_follow_the_layer_rule() -> None:
    assert len(list(PACKAGE.rglob("*.py"))) > 50
    assert violations() == []


def test_the_checker_reports_each_kind_of_break(tmp_path: Path) -> None:
    """Modules that break each rule (written to a copy of the tree's shape, never into the package)."""
    broken = {
        "common/a.py": "from llmstack.services.worker import options\n",
        "faces/a.py": "def f():\n    from llmstack.stack.config import StackConfig\n",  # lazy imports count
        "services/engines/vllm/a.py": "from ..hf import grammar\n",  # relative ones too
        "services/api/a.py": "import llmstack.services.engines.base\n",
        "services/b.py": "from llmstack.stack import models\n",
        "stack/a.py": "from llmstack import cli\n",
    }
    for rel, text in broken.items():
        path = tmp_path / "llmstack" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    found = violations(tmp_path / "llmstack")
    assert {line.split(":")[0] for line in found} == {f"llmstack/{rel}" for rel in broken}, found
