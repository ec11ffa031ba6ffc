"""The package's layout rules (README "Layout", docs/design.md section 7), read from the source.

Every module of ``mixda_fast`` sits on a floor; an import (at module level or inside a function)
may go down or stay on its floor, never up. On a floor, separate units do not import each other:
a method imports only the core and the ops, and the benchmarks and demos are independent. No
module imports another's private (``_name``) names, and a private module is imported only from
inside its own package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mixda_fast

PACKAGE = Path(mixda_fast.__file__).parent

# unit (first name under mixda_fast) -> floor
FLOORS = {
    "core": 0, "version": 0,
    "ops": 1,
    "mixda": 2, "mode": 2, "task_adapters": 2,
    "training": 3,
    "benchmarks": 4, "demo": 4, "info": 4,
    "cli": 5,
    "": 6,                                            # the package's __init__: the public API
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(module: str, path: Path):
    """(target module, imported name or None) for every import of a mixda_fast module."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "mixda_fast":
                continue
            for alias in node.names:
                full = f"{target}.{alias.name}"
                yield (full, None) if full in MODULES else (target, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "mixda_fast":
                    yield alias.name, None


EDGES = sorted({(m, t, n) for m, p in MODULES.items() for t, n in _imports(m, p)}, key=str)


def test_every_module_has_a_floor():
    assert sorted({_unit(m) for m in MODULES} - set(FLOORS)) == []


def test_no_import_runs_upward():
    up = [f"{m} -> {t}" for m, t, _ in EDGES if FLOORS[_unit(t)] > FLOORS[_unit(m)]]
    assert up == []


def test_units_on_one_floor_do_not_import_each_other():
    sideways = [f"{m} -> {t}" for m, t, _ in EDGES
                if _unit(t) != _unit(m) and FLOORS[_unit(t)] == FLOORS[_unit(m)] and FLOORS[_unit(m)] > 0]
    assert sideways == []


def test_no_private_names_cross_modules():
    bad = []
    for m, t, name in EDGES:
        if name is not None and name.startswith("_") and not name.startswith("__") and t != m:
            bad.append(f"{m}: from {t} import {name}")
        private_module = any(p.startswith("_") and not p.startswith("__") for p in t.split(".")[1:])
        parent = t.rsplit(".", 1)[0]
        if name is None and private_module and not (m == parent or m.startswith(parent + ".")):
            bad.append(f"{m}: imports the private module {t}")
    assert bad == []


def test_methods_register_themselves_and_the_core_names_none():
    from mixda_fast.core import patch

    assert {m.name for m in patch.methods()} == {"mixda", "mode"}
    core = [p for m, p in MODULES.items() if _unit(m) == "core"]
    for path in core:
        text = path.read_text()
        assert "MixDAConfig(" not in text and "MoDEConfig(" not in text, path


def test_documents_cited_are_in_the_repository():
    """Every ``*.md`` the code, the kernels, the README or the benchmarks cite is a file of the
    repository (a user who clones it can read what the code points to)."""
    import re

    root = PACKAGE.parent
    assert (root / "docs" / "design.md").is_file()
    sources = [*root.glob("mixda_fast/**/*.py"), *root.glob("csrc/**/*"), *root.glob("bench/*"), root / "README.md",
               root / "setup.py", root / "CMakeLists.txt"]
    cited = {ref for p in sources if p.is_file()
             for ref in re.findall(r"[A-Za-z0-9_./-]*[A-Za-z0-9_-]\.md\b", p.read_text(errors="replace"))}
    here = {q.relative_to(root).as_posix() for q in root.rglob("*.md")
            if not any(part.startswith(".") for part in q.relative_to(root).parts)}
    missing = sorted(ref for ref in cited if ref not in here and not any(h.endswith("/" + ref) for h in here))
    assert missing == []


def test_the_version_is_defined_once():
    import importlib.metadata
    import re

    setup = (PACKAGE.parent / "setup.py").read_text()
    assert not re.search(r"version\s*=\s*['\"]", setup)
    assert importlib.metadata.version("mixda-fast") == mixda_fast.__version__
