"""The layout's rules, checked on the source: no import cycles (counting imports inside functions
too: a lazy import is still a dependency), dependencies point one way between layers, and the
command line starts without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sspsam"

# lower layers never import higher ones; a package may import its own modules freely
LAYERS = {
    "errors": 0, "config": 0, "io": 0, "data": 0,
    "backbones": 1,
    "models": 2,
    "predict": 3,
    "engine": 4, "tools": 4,
    "serve": 5, "cli": 5,
}


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PACKAGE.rglob("*.py"):
        parts = list(p.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def import_graph() -> dict[str, set[str]]:
    """module → the sspsam modules it imports anywhere in its body."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        pkg = m if path.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name != m and not m.startswith(name + "."):  # importing a parent package is free
                    graph[m].add(name)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def _layer(module: str) -> tuple[str, int] | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # the top-level package (lazy public names) sits above everything
    return parts[1], LAYERS[parts[1]]


def test_the_graph_sees_lazy_imports():
    graph = import_graph()
    assert "sspsam.predict.onnx_runtime" in graph["sspsam.predict.segmenter"]  # imported inside from_pretrained
    assert "sspsam.models.build" in graph["sspsam.predict.base"]


def test_no_import_cycles():
    assert _cycle(import_graph()) is None, " -> ".join(_cycle(import_graph()))


def test_a_cycle_is_found_when_there_is_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_every_package_has_a_layer():
    tops = {m.split(".")[1] for m in _modules() if m.count(".") >= 1}
    assert tops <= set(LAYERS), tops - set(LAYERS)


def test_dependencies_point_down_the_layers():
    wrong = []
    for m, deps in import_graph().items():
        src = _layer(m)
        for d in deps:
            dst = _layer(d)
            if src and dst and src[0] != dst[0] and dst[1] > src[1]:
                wrong.append(f"{m} -> {d}")
    assert not wrong, wrong


def test_the_command_line_imports_no_torch():
    code = ("import sys, sspsam.cli, sspsam.cli.main; from sspsam.cli import app; "
            "heavy = [m for m in ('torch', 'numpy', 'sspsam.models', 'sspsam.predict') if m in sys.modules]; "
            "print(heavy); sys.exit(bool(heavy))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


# ---- one place for "what a method is" --------------------------------------------------------

BUILTIN_TYPES = ("ssp-sam", "escnet", "sam-mi", "zeroshot")


def _sources():
    for p in sorted(PACKAGE.rglob("*.py")):
        yield p, p.relative_to(PACKAGE).as_posix()


def test_model_type_strings_live_only_in_models():
    """A model-type string ('ssp-sam', 'escnet', …) as a literal anywhere but models/ (the registry
    and the method packages) and the YAML configs is a second definition of what a method is."""
    found = []
    for path, rel in _sources():
        if rel.startswith("models/"):
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
                      and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in BUILTIN_TYPES and id(node) not in docstrings:
                found.append(f"{rel}:{node.lineno} {node.value!r}")
    assert not found, found


def test_no_module_imports_another_modules_private_names():
    wrong = []
    for path, rel in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sspsam"):
                wrong += [f"{rel}:{node.lineno} from {node.module} import {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert not wrong, wrong


def test_no_source_file_is_over_500_lines():
    long = [f"{rel}: {n}" for path, rel in _sources() if (n := len(path.read_text().splitlines())) > 500]
    assert not long, long


def test_no_argparse_parsers_in_the_package():
    """Every command is a typer command of `sspsam`; no second command-line parser."""
    found = []
    for path, rel in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "ArgumentParser":
                found.append(f"{rel}:{node.lineno}")
            elif isinstance(node, ast.ImportFrom) and node.module == "argparse" and any(a.name == "ArgumentParser" for a in node.names):
                found.append(f"{rel}:{node.lineno}")
    assert not found, found


def test_the_registry_loads_no_torch_and_knows_every_bundled_config():
    code = ("import sys; from sspsam.models import registry; from sspsam.config import list_configs, load_config; "
            "[registry.validate(load_config(c)) for c in list_configs()]; "
            "sys.exit('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
