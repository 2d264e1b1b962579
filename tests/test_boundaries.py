"""The layout's rules, checked on the source: who may import what.

- No module imports another module's ``_private`` name.
- ``discoproxy/protocol/`` imports only the standard library (and itself): sans-IO.
- Providers import :mod:`discoproxy.model` and :mod:`discoproxy.provider` only.
- ``proxy/`` never imports ``providers``; only ``cli.py`` imports a provider module.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OURS = ("discoproxy", "providers")


def _modules() -> Iterator[tuple[str, ast.Module]]:
    for package in OURS:
        for path in sorted((REPO / package).rglob("*.py")):
            dotted = ".".join(path.relative_to(REPO).with_suffix("").parts)
            yield dotted, ast.parse(path.read_text(), str(path))


def _imports(dotted: str, tree: ast.Module) -> Iterator[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import in ``tree``
    (``dotted`` ends in ``.__init__`` for a package)."""
    package = dotted.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            yield module, [alias.name for alias in node.names]


def test_no_module_imports_another_modules_private_name() -> None:
    found = [
        f"{dotted} imports {name} from {module}"
        for dotted, tree in _modules()
        for module, names in _imports(dotted, tree)
        if module.split(".")[0] in OURS and module != dotted.removesuffix(".__init__")
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert found == []


def test_protocol_imports_only_the_standard_library() -> None:
    found = [
        f"{dotted} imports {module}"
        for dotted, tree in _modules()
        if dotted.startswith("discoproxy.protocol")
        for module, _ in _imports(dotted, tree)
        if not module.startswith("discoproxy.protocol")
        and module.split(".")[0] not in sys.stdlib_module_names
        and module != "__future__"
    ]
    assert found == []


def test_providers_import_the_model_and_the_provider_api_only() -> None:
    allowed = {"discoproxy.model", "discoproxy.provider"}
    found = [
        f"{dotted} imports {module}"
        for dotted, tree in _modules()
        if dotted.startswith("providers")
        for module, _ in _imports(dotted, tree)
        if module.split(".")[0] == "discoproxy" and module not in allowed
    ]
    assert found == []


def test_only_the_cli_reaches_into_providers() -> None:
    found = [
        f"{dotted} imports {module}"
        for dotted, tree in _modules()
        if dotted.startswith("discoproxy") and dotted != "discoproxy.cli"
        for module, _ in _imports(dotted, tree)
        if module.split(".")[0] == "providers"
    ]
    assert found == []
