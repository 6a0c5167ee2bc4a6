"""The package's own import graph: no cycles, a small root, torch-free stages stay torch-free.

The graph is read with `ast` (module- and function-level imports alike), so an import hidden inside a
function still counts. Importing `a.b.c` also runs `a/__init__.py` and `a/b/__init__.py`, so every
import is an edge to the module and to each package above it.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ghost_deploy"
ROOT = "ghost_deploy"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imported(node: ast.AST, package: str, modules: dict) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if not isinstance(node, ast.ImportFrom):
        return set()
    if node.level:
        base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    # `from pkg import sub` imports the submodule when one of that name exists
    return {f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target for alias in node.names}


def import_graph() -> dict[str, set[str]]:
    """{module: the package modules it imports, parents included}."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            for target in _imported(node, package, modules):
                parts = target.split(".")
                # every package above the target runs first; the root __init__ holds only the version
                targets.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
        graph[name] = {t for t in targets if t in modules and t != name and not name.startswith(t + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


STAGE_ORDER = ["data", "model", "quant", "eval", "train", "parity", "export", "engines", "bench", "cli"]


def test_stages_import_only_earlier_stages():
    """The folders read as the pipeline: a stage never imports one that comes after it (docs/DESIGN.md)."""
    late = []
    for module, targets in import_graph().items():
        stage = module.split(".")[1] if module.count(".") else None
        for target in targets:
            other = target.split(".")[1] if target.count(".") else None
            if stage in STAGE_ORDER and other in STAGE_ORDER and STAGE_ORDER.index(other) > STAGE_ORDER.index(stage):
                late.append(f"{module} -> {target}")
    assert not late, late


def test_package_root_is_small():
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert len(loose) <= 8, loose


def test_no_function_over_80_lines():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}")
    assert not long, long


FILE_SUFFIXES = (".onnx", ".npz", ".json", ".engine", ".safetensors")  # 'ghost.onnx' is a file name, not a key


def test_metadata_keys_spelled_in_one_module():
    """Only the contract module writes the `ghost.` metadata prefix as a literal."""
    spelled = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "contract.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("ghost.") \
                    and " " not in node.value and not node.value.endswith(FILE_SUFFIXES):
                spelled.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.value!r}")
    assert not spelled, spelled


def test_torch_free_stages_do_not_import_torch():
    """parity, engines and the stage contract run on a Jetson without PyTorch."""
    code = ("import sys; import ghost_deploy.contract, ghost_deploy.parity.gate, ghost_deploy.parity.exact, "
            "ghost_deploy.engines, ghost_deploy.engines.bundle; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
