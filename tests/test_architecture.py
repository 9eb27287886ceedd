"""The structure docs/architecture.md describes, checked from the code itself.

One import namespace (``retrogen.*`` only, nothing shadowed from the working directory), dependencies that
point one way (no import circle, no import from a lower layer to a higher one), no private name used outside
its module, and functions small enough to read. The import graph is read statically (every ``import``,
including the lazy ones inside functions, is a dependency), so a violation is found without running it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# import name -> repository folder (pyproject's package-dir)
FOLDERS = {"retrogen": "retrogen", "retrogen.retrieval": "retrieval", "retrogen.index_builder": "index_builder",
           "retrogen.generation": "generation", "retrogen.evaluation": "evaluation", "retrogen.service": "service"}
LIBRARIES = ("retrieval", "generation", "index_builder", "evaluation", "service")
# The retrogen command's composition root and the demo sit above every library; the client beside them.
ABOVE_LIBRARIES = ("retrogen.cli", "retrogen.demo")
# What each part may import besides the foundation and itself.
MAY_IMPORT = {
    "retrogen.retrieval": (),
    "retrogen.generation": (),
    "retrogen.index_builder": ("retrogen.retrieval",),
    "retrogen.evaluation": ("retrogen.retrieval",),
    "retrogen.service": ("retrogen.retrieval", "retrogen.generation", "retrogen.index_builder",
                         "retrogen.evaluation"),
    "retrogen.client": (),
}
# The service's layers, lowest first: a module imports its own layer or lower ones only.
SERVICE_LAYERS = ("core", "crud", "domain", "wiring", "api", "cli")
MAX_FUNCTION_LINES = 60
MAX_POSITIONAL = 5


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_package = MODULES[module].name == "__init__.py"
    base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _own(name: str) -> str | None:
    """The module of ours that ``name`` (a module, or a module's attribute) refers to, or None."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            out |= {m for a in node.names if (m := _own(a.name))}
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            for a in node.names:
                target = _own(f"{base}.{a.name}") or _own(base)
                if target and target != module:
                    out.add(target)
    return out


GRAPH = {m: _imports(m) for m in MODULES}


def _part(module: str) -> str:
    for name in ("retrogen.client", *MAY_IMPORT):
        if module == name or module.startswith(name + "."):
            return name
    return "retrogen.cli" if module in ABOVE_LIBRARIES else "foundation"


def test_every_package_folder_is_installed_under_the_retrogen_namespace():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {k: v for k, v in FOLDERS.items() if k != "retrogen"}
    packages = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    data_only = set(config["packages"]) - packages  # folders of static files (the gallery's)
    assert packages <= set(config["packages"]), f"package folders missing: {packages - set(config['packages'])}"
    assert set(config["package-data"]) == data_only, "a listed package is neither code nor package data"


def test_bare_names_do_not_import_and_a_users_files_shadow_nothing(tmp_path):
    # A training repository with its own evaluation.py and service/ package in the working directory.
    (tmp_path / "evaluation.py").write_text("raise SystemExit('the user evaluation.py was imported')\n")
    (tmp_path / "service").mkdir()
    (tmp_path / "service" / "__init__.py").write_text("raise SystemExit('the user service/ was imported')\n")
    code = ("import importlib.util, retrogen.service.domain.evaluations as e; "
            "e.check_config({}); "
            "print([n for n in ('retrieval', 'generation', 'index_builder') if importlib.util.find_spec(n)])")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", "library folders must not be importable as top-level names"
    # From the repository root the folders are on sys.path, yet their bare names still refuse to load.
    for name in LIBRARIES:
        done = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode != 0 and f"import 'retrogen.{name}' instead" in done.stderr


def test_no_import_circle():
    visiting, done, circles = [], set(), []

    def visit(m: str) -> None:
        if m in done:
            return
        if m in visiting:
            circles.append(visiting[visiting.index(m):] + [m])
            return
        visiting.append(m)
        for n in sorted(GRAPH[m]):
            if not n.startswith(m + "."):  # a package's __init__ may hand on its own modules' names
                visit(n)
        visiting.pop()
        done.add(m)

    for m in sorted(GRAPH):
        visit(m)
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_dependencies_point_one_way():
    wrong = []
    for m, targets in GRAPH.items():
        part = _part(m)
        for t in targets:
            tpart = _part(t)
            if tpart in (part, "foundation") and not (part == "foundation" and t in ABOVE_LIBRARIES):
                continue
            if part == "retrogen.cli" or tpart in MAY_IMPORT.get(part, ()):
                continue
            wrong.append(f"{m} -> {t}")
    assert not wrong, "imports against the layering: " + ", ".join(sorted(wrong))


def _service_layer(module: str) -> int:
    rest = module.removeprefix("retrogen.service").lstrip(".").split(".")[0]
    return SERVICE_LAYERS.index(rest) if rest in SERVICE_LAYERS else -1


def test_service_layers_import_downward_only():
    wrong = [f"{m} -> {t}" for m, targets in GRAPH.items() if m.startswith("retrogen.service.")
             for t in targets if t.startswith("retrogen.service.") and _service_layer(t) > _service_layer(m)]
    assert not wrong, "service imports from a higher layer: " + ", ".join(sorted(wrong))
    unplaced = [m for m in GRAPH if m.startswith("retrogen.service.") and _service_layer(m) < 0]
    assert not unplaced, f"service modules outside {SERVICE_LAYERS}: {unplaced}"


def test_no_private_name_used_outside_its_module():
    found = []
    for m, path in MODULES.items():
        tree = ast.parse(path.read_text())
        modules_bound = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = _resolve(m, node)
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        found.append(f"{m} imports {base}.{a.name}")
                    if f"{base}.{a.name}" in MODULES:
                        modules_bound[a.asname or a.name] = f"{base}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname and a.name in MODULES:
                        modules_bound[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in modules_bound and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                found.append(f"{m} uses {modules_bound[node.value.id]}.{node.attr}")
    assert not found, "private names used across modules: " + ", ".join(sorted(set(found)))


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> int:
    first = node.body[0]
    docstring = set()
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        docstring = set(range(first.lineno, first.end_lineno + 1))
    return sum(1 for n in range(node.lineno, node.end_lineno + 1)
               if n not in docstring and lines[n - 1].strip() and not lines[n - 1].strip().startswith("#"))


@pytest.mark.parametrize("module", sorted(MODULES))
def test_functions_are_short_and_take_few_positional_arguments(module):
    source = MODULES[module].read_text()
    lines = source.splitlines()
    too_long, too_many = [], []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if _code_lines(node, lines) > MAX_FUNCTION_LINES:
                too_long.append(f"{node.name} (line {node.lineno}: {_code_lines(node, lines)} lines)")
            positional = [a.arg for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
            if len(positional) > MAX_POSITIONAL:
                too_many.append(f"{node.name} (line {node.lineno}: {len(positional)} positional)")
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines of code: {too_long}"
    assert not too_many, f"over {MAX_POSITIONAL} positional parameters (make them keyword-only): {too_many}"


def test_the_client_stands_alone():
    """A training pipeline imports the client without the server's stack; torch only for as_torch_dataset."""
    code = ("import sys; from retrogen.client import RetrogenClient; "
            "print(sorted(m for m in ('fastapi', 'sqlalchemy', 'torch', 'faiss') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
