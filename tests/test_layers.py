"""The library's imports point down its layers (docs/ARCHITECTURE.md, "Layers"): an upward import, an
import cycle (even inside a function), a private name imported from another module, Dagster or the
orchestration layer in the library, or a write to the process environment outside a process's entry point
fails here. Read from the source (AST): nothing is imported to check it."""

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: bottom to top; a package may import its own modules and those of the packages before it. The
#: top-level modules (config.py, the settings) are the bottom layer.
LAYERS = ["config", "data", "engine", "pseudo_labels", "quality", "features", "prerank", "evaluation", "cli"]
#: where the library and the orchestration write the process environment (``os.environ``, ``putenv``):
#: (file, function) -> why. Settings travel as values (issue 33); what is left is process-level state of
#: the libraries they drive, set where a process starts or for a third-party library that reads only its
#: environment. The list may only shrink.
ENVIRONMENT_WRITES = {
    ("gpl_platform/cli/main.py", "_offline"): "HF_HUB_OFFLINE for transformers/huggingface_hub, as `gpl` starts",
    ("gpl_platform/cli/instance.py", "prepare"): "DAGSTER_HOME, the process's Dagster instance (gpl run, make ui)",
    ("gpl_platform/engine/ray_engine.py", "_connect"): "Ray's driver variables for the cluster it joins",
    ("gpl_platform/pseudo_labels/encoder.py", "model"): "HF_HUB_OFFLINE before sentence-transformers loads",
}
#: the methods of ``os.environ`` that change it
ENVIRON_WRITERS = {"setdefault", "update", "pop", "popitem", "clear", "__setitem__", "__delitem__"}


def _module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(root: Path, path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every import in the file, at any depth (functions included)."""
    found = []
    name = _module_name(root, path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: resolved against the importing package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{module}" if module else base
            found.append((module, [alias.name for alias in node.names], node.lineno))
    return found


def library(root: Path) -> dict[str, Path]:
    return {_module_name(root, path): path for path in (root / "gpl_platform").rglob("*.py")}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS[1:]) else "config"


def upward_imports(root: Path) -> list[str]:
    found = []
    for module, path in library(root).items():
        for target, _, line in _imports(root, path):
            if target.startswith("gpl_platform.") and LAYERS.index(layer(target)) > LAYERS.index(layer(module)):
                found.append(f"{path.relative_to(root)}:{line} imports {target}")
    return found


def private_imports(root: Path) -> list[str]:
    found = []
    for module, path in library(root).items():
        for target, names, line in _imports(root, path):
            if target.startswith("gpl_platform") and target != module:
                found += [f"{path.relative_to(root)}:{line} {target}.{n}" for n in names if n.startswith("_")]
    return found


def import_cycles(root: Path) -> list[str]:
    modules = library(root)
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in modules.items():
        for target, names, _ in _imports(root, path):
            # `from package import module` imports that module; `from module import name`, the module
            candidates = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules] or [target]
            # a package's __init__ exporting its own modules is how packages export, not a cycle
            graph[module] |= {c for c in candidates if c in modules and c != module and not module.startswith(c + ".")}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for module in sorted(modules):
        if module not in state:
            visit(module, [module])
    return cycles


def test_the_library_imports_only_down_its_layers():
    assert upward_imports(ROOT) == []


def test_no_private_name_is_imported_from_another_module():
    assert private_imports(ROOT) == []


def test_no_import_cycle_between_library_modules():
    assert import_cycles(ROOT) == []


def test_the_library_imports_no_dagster_no_orchestration_and_no_tests():
    """The CLI reaches the orchestration through its entry point (gpl_platform/cli/orchestration.py)."""
    found = []
    for path in library(ROOT).values():
        for target, _, line in _imports(ROOT, path):
            if target.split(".")[0] in {"dagster", "dagster_webserver", "assets", "tests", "bench"}:
                found.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert found == []


def _is_environ(node: ast.AST) -> bool:
    """``os.environ`` or a bare ``environ`` (``from os import environ``)."""
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or (
        isinstance(node, ast.Name) and node.id == "environ"
    )


def environment_writes(root: Path, folders: tuple[str, ...] = ("gpl_platform", "assets")) -> dict[tuple, list]:
    """(file, enclosing function or "<module>") -> the lines that write the process environment."""
    found: dict[tuple, list] = defaultdict(list)
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            where = path.relative_to(root).as_posix()

            def visit(node: ast.AST, function: str) -> None:
                for child in ast.iter_child_nodes(node):
                    name = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else function
                    targets = child.targets if isinstance(child, ast.Assign | ast.Delete) else []
                    targets += [child.target] if isinstance(child, ast.AugAssign | ast.AnnAssign) else []
                    written = any(isinstance(t, ast.Subscript) and _is_environ(t.value) for t in targets)
                    if isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute):
                        method, owner = child.func.attr, child.func.value
                        written |= _is_environ(owner) and method in ENVIRON_WRITERS
                        written |= isinstance(owner, ast.Name) and owner.id == "os" and method in ("putenv", "unsetenv")
                    if written:
                        found[(where, function)].append(child.lineno)
                    visit(child, name)

            visit(ast.parse(path.read_text()), "<module>")
    return dict(found)


def test_settings_are_values_not_environment_writes():
    """Commands build a Settings value and pass it (issue 33): the library and the orchestration write the
    process environment only in the listed places."""
    found = environment_writes(ROOT)
    assert set(found) <= set(ENVIRONMENT_WRITES), {k: v for k, v in found.items() if k not in ENVIRONMENT_WRITES}


def test_the_environment_check_sees_every_kind_of_write(tmp_path):
    (tmp_path / "gpl_platform").mkdir()
    (tmp_path / "gpl_platform" / "m.py").write_text(
        "import os\nfrom os import environ\n"
        "os.environ['A'] = '1'\n"
        "def f():\n    os.environ.setdefault('B', '1')\n    del os.environ['A']\n"
        "def g():\n    environ.update(C='1')\n    os.putenv('D', '1')\n    x = os.environ.get('E')\n"
    )
    assert environment_writes(tmp_path, ("gpl_platform",)) == {
        ("gpl_platform/m.py", "<module>"): [3],
        ("gpl_platform/m.py", "f"): [5, 6],
        ("gpl_platform/m.py", "g"): [8, 9],
    }


def test_the_checks_see_what_they_forbid(tmp_path):
    """The checker itself, on a planted library: an upward import inside a function, a private name from
    another module, and a cycle through a function-level import."""
    lib = tmp_path / "gpl_platform"
    (lib / "data").mkdir(parents=True)
    (lib / "config.py").write_text("from gpl_platform.data.reader import read\n")
    (lib / "data" / "reader.py").write_text(
        "from gpl_platform.data.writer import _helper\n\ndef read():\n    from gpl_platform.evaluation import m\n"
    )
    (lib / "data" / "writer.py").write_text("def _helper():\n    from gpl_platform.data import reader\n")
    assert upward_imports(tmp_path) == [
        "gpl_platform/config.py:1 imports gpl_platform.data.reader",
        "gpl_platform/data/reader.py:4 imports gpl_platform.evaluation",
    ]
    assert private_imports(tmp_path) == ["gpl_platform/data/reader.py:1 gpl_platform.data.writer._helper"]
    assert import_cycles(tmp_path) == [
        "gpl_platform.data.reader -> gpl_platform.data.writer -> gpl_platform.data.reader"
    ]


#: the most lines a module of the product (library, orchestration, Feast repository, benchmarks) may have
MAX_MODULE_LINES = 450


def long_modules(root: Path) -> list[str]:
    found = []
    for folder in ("gpl_platform", "assets", "bench", "feature_repo"):
        for path in sorted((root / folder).rglob("*.py")):
            n = len(path.read_text().splitlines())
            if n > MAX_MODULE_LINES:
                found.append(f"{path.relative_to(root)}: {n} lines")
    return found


def test_no_module_is_longer_than_the_limit(tmp_path):
    assert long_modules(ROOT) == []
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "long.py").write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    assert long_modules(tmp_path) == [f"bench/long.py: {MAX_MODULE_LINES + 1} lines"]
