"""docs/architecture.md stays true: its map lists exactly the package's files, the scripts, and
top-level entries that exist; the layers import only downwards."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"


def mapped_paths() -> set[str]:
    """Paths of the map's code block: indentation nests a line under the last folder above it."""
    block = re.search(r"## The map.*?```text\n(.*?)```", DOC.read_text(), flags=re.S)
    assert block, "docs/architecture.md has no map"
    paths, folders = set(), {}
    for line in block.group(1).splitlines():
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2
        name = line.split()[0]
        parent = folders.get(depth - 1, "") if depth else ""
        path = parent + name
        paths.add(path.rstrip("/"))
        if name.endswith("/"):
            folders[depth] = path
    return paths


def test_the_map_lists_every_file_of_the_package_and_no_other():
    listed = {p for p in mapped_paths() if p.startswith("falcon_service/") and p.endswith(".py")}
    actual = {str(p.relative_to(ROOT)) for p in (ROOT / "falcon_service").rglob("*.py")
              if p.name != "__init__.py" or p.read_text().strip()}  # an empty __init__.py has no job
    assert listed == actual


def test_the_map_lists_every_script_and_its_entries_exist():
    listed = {p for p in mapped_paths() if p.startswith("scripts/") and p != "scripts"}
    assert listed == {str(p.relative_to(ROOT)) for p in (ROOT / "scripts").iterdir() if p.is_file()}
    for path in mapped_paths():
        assert (ROOT / path).exists(), f"the map lists {path}, which does not exist"


def _imports(path: Path) -> set[str]:
    """Modules of falcon_service this file imports (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.add(".".join([*base, node.module] if node.module else base))
            elif node.module:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def _engine_names(path: Path) -> set[tuple[str, str]]:
    """(module, name) of each import in this file that reaches into falcon_service.engine; name "" for a
    module imported whole."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            for alias in node.names:
                if f"{module}.{alias.name}".startswith("falcon_service.engine"):
                    found.add((module, alias.name))
        elif isinstance(node, ast.Import):
            found |= {(a.name, "") for a in node.names if a.name.startswith("falcon_service.engine")}
    return found


def test_the_engine_has_one_door():
    """Outside the engine, the package takes from it only what falcon_service/engine/__init__.py exports: its
    client, how to start it, the request and event types, the errors. That interface is where the engine's
    core can move into a process of its own."""
    import falcon_service.engine

    door = set(falcon_service.engine.__all__)
    outside = [p for p in (ROOT / "falcon_service").rglob("*.py") if "engine" not in p.relative_to(ROOT).parts]
    for path in [*outside, ROOT / "service.py"]:
        taken = _engine_names(path)
        assert {m for m, _ in taken} <= {"falcon_service.engine"}, f"{path.relative_to(ROOT)} imports {taken}"
        assert {n for _, n in taken} <= door, f"{path.relative_to(ROOT)} imports {taken}"


def test_the_engines_door_opens_without_torch():
    """Importing the engine package imports nothing heavy until a name is used: the grammar sandbox's child
    process (`python -m falcon_service.engine.grammar_sandbox`) goes through it and must start without torch."""
    code = "import sys, falcon_service.engine.grammar_sandbox; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_layers_import_only_downwards():
    """engine < api < server < service: each wing imports only those below it (the server, the HTTP edge, has no
    business with the engine)."""
    forbidden = {
        "falcon_service/engine": ("falcon_service.api", "falcon_service.server", "falcon_service.service",
                                  "falcon_service.config", "falcon_service.metrics", "bentoml", "fastapi",
                                  "starlette", "pydantic"),
        "falcon_service/api": ("falcon_service.server", "falcon_service.service", "bentoml"),
        "falcon_service/server": ("falcon_service.engine", "falcon_service.service"),
    }
    for folder, banned in forbidden.items():
        for path in (ROOT / folder).rglob("*.py"):
            bad = {m for m in _imports(path) if m.startswith(banned)}
            assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def _constants(path: Path) -> set[str]:
    """UPPER_CASE names this module assigns at its top level (type variables aside)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "TypeVar":
            continue
        names |= {t.id for t in targets if isinstance(t, ast.Name) and t.id.isupper()}
    return names


def test_a_constant_is_defined_in_one_module():
    """A value two modules must agree on (a Retry-After, a default) has one home that the other imports."""
    homes: dict[str, list[str]] = {}
    for path in sorted((ROOT / "falcon_service").rglob("*.py")):
        for name in _constants(path):
            homes.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert {name: paths for name, paths in homes.items() if len(paths) > 1} == {}
