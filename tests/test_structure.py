"""The shape of the code base: acps_core imports cleanly, its modules form no import cycle and stay small, plugins
and examples reach acps only through ``acps_core`` and ``acps_core.plugin``, and old import paths keep working."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "acps_core"
#: The most lines a module of acps_core may have (generated protobuf code aside).
MAX_LINES = 400
#: What a plugin or an example may import of acps.
PLUGIN_API = {"acps_core", "acps_core.plugin"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def core_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(CORE.rglob("*.py")) if not path.name.endswith("_pb2.py")}


def imports_at_load(path: Path) -> list[tuple[str, list[str]]]:
    """The imports a module runs when it is loaded: (module, names) of every import statement outside functions
    and ``if TYPE_CHECKING:`` blocks, with relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: list[tuple[str, list[str]]] = []

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                found.extend((alias.name, []) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                found.append((base, [alias.name for alias in node.names]))
            elif isinstance(node, ast.If):
                checking = "TYPE_CHECKING" in ast.unparse(node.test)
                if not checking:
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, (ast.Try, ast.With)):
                visit(node.body)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
                visit(getattr(node, "orelse", []))
                visit(getattr(node, "finalbody", []))
    visit(tree.body)
    return found


def import_graph() -> dict[str, set[str]]:
    """acps_core module -> the acps_core modules it imports when loaded (``from package import submodule`` counts
    as an import of the submodule, ``from package import name`` as one of the package)."""
    modules = core_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for base, names in imports_at_load(path):
            if not base.startswith("acps_core"):
                continue
            for imported in names or [""]:
                target = f"{base}.{imported}" if f"{base}.{imported}" in modules else base
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*path[path.index(target):], target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_acps_core_and_its_plugin_module_import_in_a_fresh_interpreter() -> None:
    done = subprocess.run([sys.executable, "-c", "import acps_core, acps_core.plugin; print(acps_core.__version__)"],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == importlib.import_module("acps_core").__version__


def test_the_import_graph_finds_a_cycle_when_there_is_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_acps_core_has_no_import_cycle() -> None:
    graph = import_graph()
    assert graph["acps_core.search.run"] >= {"acps_core.search.arguments", "acps_core.graph.build"}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_module_of_acps_core_is_over_400_lines() -> None:
    lengths = {name: len(path.read_text().splitlines()) for name, path in core_modules().items()}
    biggest = sorted(lengths.items(), key=lambda item: -item[1])[:5]
    print("the biggest modules of acps_core: " + ", ".join(f"{name} ({lines})" for name, lines in biggest))
    assert {name: lines for name, lines in lengths.items() if lines > MAX_LINES} == {}


def plugin_sources() -> list[Path]:
    """The code of the plugin packages and examples (their tests aside: those may check acps's insides)."""
    roots = [*ROOT.glob("plugins/*/acps_*"), *ROOT.glob("examples/*/acps_*")]
    return sorted(path for root in roots for path in root.rglob("*.py"))


def test_plugins_and_examples_import_only_acps_core_and_acps_core_plugin() -> None:
    sources = plugin_sources()
    assert len(sources) >= 10
    reached: dict[str, set[str]] = {}
    for path in sources:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for name in names:
                if name.startswith("acps_core") and name not in PLUGIN_API:
                    reached.setdefault(str(path.relative_to(ROOT)), set()).add(name)
    assert reached == {}


@pytest.mark.parametrize(("old", "names"), [
    ("acps_core.bases", ["SensitivityBase", "SearchChannelBase", "GainEstimatorBase"]),
    ("acps_core.problem", ["GraphInfo", "PruneSearchConfig", "SearchRecord", "give_back", "masks_for"]),
    ("acps_core.graph", ["ChannelGraph", "LayerGeometry", "ParamSlice", "channel_atoms", "trace_sample",
                         "build_channel_graph"]),
    ("acps_core.data", ["forward", "default_loss", "primary_output", "to_device"]),
    ("acps_core.distributed", ["Communicator"]),
    ("acps_core.masking", ["masked_channels"]),
    ("acps_core.progress", ["progress"]),
    ("acps_core.atomic", ["atomic_write_text", "atomic_write_many"]),
    ("acps_core.reading", ["read_bytes"]),
    ("acps_core.hookspecs", ["Register", "hookimpl"]),
    ("acps_core.registry", ["resolve_method", "get_registry"]),
    ("acps_core.api", ["auto_channel_prune_search", "PruneTargetWarning"]),
    ("acps_core.config", ["parse_prune_config", "load_search_config", "write_prune_config", "resolve_layer"]),
    ("acps_core.prune", ["create_prune_retrain_model", "restore_prune_retrain_model", "prune_channels"]),
    ("acps_core.result", ["SearchResult", "LayerReport"]),
    ("acps_core.demo", ["DigitsCNN", "load_digits_tensors"]),
])
def test_old_import_paths_keep_working(old: str, names: list[str]) -> None:
    module = importlib.import_module(old)
    for name in names:
        assert hasattr(module, name), f"{old}.{name}"
    # The old name is the module that holds the code now, not a copy: patching through either means the same.
    assert importlib.import_module(module.__name__) is module
