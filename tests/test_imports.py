"""Every module of the library imports without pulling in Ray, MLflow or Optuna: the pure
logic is usable (and testable) without a cluster, and the wiring imports them lazily."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import ipb_ray

MODULES = sorted(m.name for m in pkgutil.walk_packages(ipb_ray.__path__, "ipb_ray."))


def test_every_module_imports_without_ray_mlflow_or_optuna():
    assert {"ipb_ray.distributed.training", "ipb_ray.methods.base", "ipb_ray.methods.balancers", "ipb_ray.tracking.runs"} <= set(MODULES)
    code = ("import importlib, sys\n"
            f"for name in {MODULES!r}:\n"
            "    importlib.import_module(name)\n"
            "    heavy = [m for m in ('ray', 'mlflow', 'optuna') if m in sys.modules]\n"
            "    assert not heavy, f'importing {name} imported {heavy}'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def _imports(path):
    """(module-level?, imported module, names) of every ``from ipb_ray... import`` in a file,
    at module level or inside a function; imports under ``if TYPE_CHECKING:`` are for type
    checkers only (never run) and not counted."""
    import ast

    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", getattr(block.test, "attr", "")) == "TYPE_CHECKING"
                   for stmt in block.body for n in ast.walk(stmt)}
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ipb_ray"):
            out.append((id(node) in top, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out.extend((id(node) in top, a.name, []) for a in node.names if a.name.startswith("ipb_ray"))
    return out


def _files():
    from pathlib import Path

    root = Path(ipb_ray.__file__).parent
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        yield name, path


def test_no_module_imports_a_private_name_of_another():
    bad = [(name, mod, n) for name, path in _files() for _, mod, names in _imports(path)
           for n in names if n.startswith("_") and mod != name]
    assert not bad, bad


def test_pure_packages_do_not_import_the_ray_mlflow_or_cli_rooms_at_module_level():
    pure = ("ipb_ray.data", "ipb_ray.patches", "ipb_ray.nn", "ipb_ray.evaluation", "ipb_ray.methods", "ipb_ray.prediction")
    wiring = ("ipb_ray.distributed", "ipb_ray.tracking", "ipb_ray.cluster", "ipb_ray.cli")
    bad = [(name, mod) for name, path in _files() if name.startswith(pure)
           for top, mod, _ in _imports(path) if top and mod.startswith(wiring)]
    assert not bad, bad


def _graph(lazy: bool) -> dict[str, set[str]]:
    """Module -> the package modules it imports (a ``from pkg import mod`` names ``pkg.mod``);
    with ``lazy``, the imports inside functions too."""
    graph: dict[str, set[str]] = {name: set() for name, _ in _files()}
    for name, path in _files():
        for top, mod, names in _imports(path):
            if not (top or lazy):
                continue
            for target in [f"{mod}.{n}" for n in names if f"{mod}.{n}" in graph] or [mod]:
                if target in graph and target != name:
                    graph[name].add(target)
    return graph


@pytest.mark.parametrize("lazy", [False, True], ids=["module-level", "function-level-too"])
def test_imports_have_no_cycle(lazy):
    """No module imports, even lazily inside a function, a module that imports it back: every
    room can be read (and changed) from the bottom up. The lazy imports of the package that
    are left go one way only (e.g. ``config`` reads the method and model registries; the
    registries never read ``config``)."""
    graph = _graph(lazy)
    state: dict[str, int] = {}

    def visit(node, trail):
        if state.get(node) == 1:
            raise AssertionError("import cycle: " + " -> ".join(trail + [node]))
        if state.get(node) == 2:
            return
        state[node] = 1
        for nxt in sorted(graph[node]):
            visit(nxt, trail + [node])
        state[node] = 2

    for node in sorted(graph):
        visit(node, [])


def test_modules_that_moved_still_load_by_their_old_names_for_old_pickles():
    import importlib
    import pickle

    from ipb_ray import MOVED_MODULES
    from ipb_ray.nn import models

    for old, new in MOVED_MODULES.items():
        assert importlib.import_module(old) is importlib.import_module(new), old
    assert models.__spec__.name == "ipb_ray.nn.models"  # the alias did not take the module's identity
    # an MLflow model pickled before the move names its classes by the old module path
    assert pickle.loads(b"cipb_ray.models\nClassifier\n.") is models.Classifier
    assert set(MOVED_MODULES.values()) <= set(MODULES)


def _room(module: str) -> str:
    """The room of a module: its subpackage (``ipb_ray.data.catalog`` -> ``data``) or, for a
    top-level module, its name (``ipb_ray.config`` -> ``config``); the package is ``ipb_ray``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _architecture_rules() -> dict[str, tuple[set[str], set[str]]]:
    """docs/architecture.md's room table: room -> (module-level rooms, function-level rooms)."""
    import re
    from pathlib import Path

    text = (Path(ipb_ray.__file__).parents[1] / "docs" / "architecture.md").read_text()
    table = text.split("<!-- rooms: begin")[1].split("<!-- rooms: end -->")[0]
    rules: dict[str, tuple[set[str], set[str]]] = {}
    rooms = set()
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`"):
            continue
        room = cells[0].strip("`")
        rooms.add(room)
        named = [set(re.findall(r"^`(\w+)`|, `(\w+)`", c)) for c in cells[2:]]
        top, lazy = ({a or b for a, b in found} | ({"*"} if cell == "every room" else set())
                     for found, cell in zip(named, cells[2:]))
        rules[room] = (top, lazy)
    return rules


def test_the_architecture_map_names_every_room():
    rules = _architecture_rules()
    rooms = {_room(name) for name, _ in _files()} - {"ipb_ray"}
    assert rooms == set(rules), f"rooms in the package but not in docs/architecture.md: {rooms - set(rules)}; " \
                                f"in the map but not in the package: {set(rules) - rooms}"
    assert rules["params"] == (set(), set()) and "patches" in rules["config"][0]  # the parser reads the table


def test_every_import_follows_the_architecture_map():
    """Every ``from ipb_ray... import`` of every module goes to a room its row in
    docs/architecture.md allows (module level: the third column; inside a function: the
    third or the fourth); the package's own ``__init__`` imports no room."""
    rules = _architecture_rules()
    bad = []
    for name, path in _files():
        room = _room(name)
        for top, mod, names in _imports(path):
            targets = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in MODULES] or [mod]
            for target in targets:
                other = _room(target)
                if other in (room, "ipb_ray") and room != "ipb_ray":
                    continue
                if room == "ipb_ray":
                    bad.append((name, target, "the package's __init__ imports no room"))
                    continue
                allowed_top, allowed_lazy = rules[room]
                if {other, "*"} & allowed_top or (not top and {other, "*"} & allowed_lazy):
                    continue
                bad.append((name, target, "module level" if top else "inside a function"))
    assert not bad, "imports the map in docs/architecture.md does not allow:\n" + "\n".join(map(str, bad))


def test_every_module_says_what_it_exports():
    """Every module lists its public names in ``__all__``: each listed name exists, and every
    public function, class and constant the module defines is listed (private ones start
    with an underscore)."""
    import ast
    import importlib

    bad = []
    for name, path in _files():
        tree = ast.parse(path.read_text())
        module = importlib.import_module(name)
        exported = getattr(module, "__all__", None)
        if exported is None:
            bad.append((name, "no __all__"))
            continue
        bad += [(name, f"__all__ names {n!r}, which it lacks") for n in exported if not hasattr(module, n)]
        defined = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        defined |= {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
                    if isinstance(t, ast.Name) and t.id.isupper()}
        bad += [(name, f"public {n!r} missing from __all__") for n in sorted(defined - set(exported))
                if not n.startswith("_")]
    assert not bad, bad
