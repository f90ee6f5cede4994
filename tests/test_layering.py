"""The import layering of the package, as contracts checked over the source (``ast``, nothing is imported).

Layers, top to bottom; a module may import its own room and the layers below, never a layer above nor another
room of its own layer (the pipelines ``training`` and ``wsi`` know nothing of each other; a model knows no
method). Every import counts: module level, inside a function, or under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cdcl"

LAYERS: list[tuple[str, ...]] = [
    ("cdcl.cli", "cdcl.commands", "cdcl.testing"),  # commands; references and stand-ins for tests and benchmarks
    ("cdcl.training", "cdcl.wsi"),  # pipelines
    ("cdcl.inference",),  # running a model (training validates with it, wsi streams it)
    ("cdcl.config",),  # the typed experiment config
    ("cdcl.models", "cdcl.methods"),  # networks; training recipes and their losses
    ("cdcl.data",),  # datasets, views, loaders
    ("cdcl.instances",),  # representations, post-processing, exports
    ("cdcl.metrics",),  # numpy/scipy only
]
# The utilities every layer may use; they may use each other, and nothing above them.
FOUNDATION = (
    "cdcl",
    "cdcl.errors",
    "cdcl.vocab",
    "cdcl.ranges",
    "cdcl.windows",
    "cdcl.io",
    "cdcl.runtime",
    "cdcl.checkpoint",
    "cdcl.viz",
)
STANDALONE = ("cdcl.metrics",)  # imports nothing of the package at all


def room_of(module: str) -> str:
    """The room (layer entry or foundation module) that ``module`` belongs to."""
    for rooms in LAYERS:
        for room in rooms:
            if module == room or module.startswith(room + "."):
                return room
    if module in FOUNDATION:
        return module
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS or FOUNDATION in {__file__}")


def layer_of(room: str) -> int:
    """0 for the top layer; the foundation is below every layer."""
    return next((i for i, rooms in enumerate(LAYERS) if room in rooms), len(LAYERS))


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(source: str) -> list[tuple[int, str]]:
    """``(line, module)`` of every import of the package in ``source``, wherever it stands."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "cdcl"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "cdcl":
            found.append((node.lineno, node.module))
    return found


def violations(importer: str, source: str) -> list[str]:
    """What module ``importer`` (its text: ``source``) imports against the layering, one line each."""
    own_room = room_of(importer)
    own_layer = layer_of(own_room)
    found = []
    for line, target in imported(source):
        room = room_of(target)
        layer = layer_of(room)
        if room == own_room:
            continue
        if importer in STANDALONE:
            problem = "imports nothing of the package"
        elif layer < own_layer:
            problem = f"may not import the layer above it ({room})"
        elif layer == own_layer and layer < len(LAYERS):
            problem = f"may not import {room}, a room of its own layer"
        else:
            continue
        found.append(f"line {line}: {importer} imports {target}: {own_room} {problem}")
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layers(path: Path) -> None:
    found = violations(module_name(path), path.read_text())
    assert not found, f"{path}:\n" + "\n".join(found)


@pytest.mark.parametrize(
    ("importer", "source", "problem"),
    [
        (
            "cdcl.inference.window",
            "import torch\n\ndef f():\n    from cdcl.training.engine import train\n",
            "line 4: cdcl.inference.window imports cdcl.training.engine: cdcl.inference may not import the layer "
            "above it "
            "(cdcl.training)",
        ),
        (
            "cdcl.wsi.pipeline",
            "from cdcl.training import engine\n",
            "line 1: cdcl.wsi.pipeline imports cdcl.training: cdcl.wsi may not import cdcl.training, a room of its "
            "own layer",
        ),
        (
            "cdcl.metrics",
            "from cdcl.errors import CdclError\n",
            "line 1: cdcl.metrics imports cdcl.errors: cdcl.metrics imports nothing of the package",
        ),
    ],
)
def test_the_contracts_catch_forbidden_imports(importer: str, source: str, problem: str) -> None:
    assert violations(importer, source) == [problem]


def test_the_vocabularies_match_their_registries() -> None:
    """The method classes and the dataset readers offer exactly the names of ``cdcl.vocab``."""
    from cdcl import vocab
    from cdcl.data import readers
    from cdcl.methods import REGISTRY

    assert tuple(REGISTRY) == vocab.METHODS
    assert tuple(readers._SCANNERS) == vocab.FORMATS
