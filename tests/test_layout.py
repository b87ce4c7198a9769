"""The package's shape: the demo is a leaf, modules stay small, the layers only import downwards."""
from __future__ import annotations

import ast
from pathlib import Path

import abcd_edge

PACKAGE = Path(abcd_edge.__file__).parent
# what each layer may import from abcd_edge (besides itself and the top-level errors/paths/io modules)
ALLOWED = {
    "core": set(),
    "formats": {"core"},
    "device": {"core", "formats"},
    "profiling": {"core", "formats", "device"},
    "runtime": {"core", "formats", "device", "profiling"},
}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, path.relative_to(PACKAGE).parts


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("abcd_edge")}


def test_the_library_never_imports_the_demo():
    bad = [(str(p), m) for p, parts in _modules() if parts[0] != "demo"
           for m in _imports(p) if m.startswith("abcd_edge.demo")]
    assert not bad, bad


def test_no_module_over_about_500_lines():
    big = {str(p.relative_to(PACKAGE)): n for p, _ in _modules() if (n := len(p.read_text().splitlines())) > 500}
    assert not big, big


def test_lower_layers_import_only_downwards():
    bad = []
    for path, parts in _modules():
        layer = parts[0] if len(parts) > 1 else None
        if layer not in ALLOWED:
            continue
        for m in _imports(path):
            target = m.split(".")
            if len(target) > 1 and target[1] in {"core", "formats", "device", "profiling", "runtime", "export",
                                                 "calibrate", "bench", "cli", "demo", "quality"}:
                if target[1] != layer and target[1] not in ALLOWED[layer]:
                    bad.append((str(path.relative_to(PACKAGE)), m))
    assert not bad, bad
