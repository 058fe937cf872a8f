"""The package's import graph has no cycle, and its layers point one way.

Every ``import`` counts, at module level or inside a function (a lazy import hides a cycle from
Python, not from a reader). Imports of a package's ``__init__`` (its public face) do not count:
``engramlab.locate`` re-exports names from its submodules by design.
"""

import ast
from pathlib import Path

import engramlab

ROOT = Path(engramlab.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _graph() -> tuple[dict[str, set[str]], set[str]]:
    mods = _modules()
    packages = {m for m, p in mods.items() if p.name == "__init__.py"}

    def owner(name: str) -> str | None:  # the module a dotted name lives in
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        here = mod if mod in packages else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for name in names:
                if name.split(".")[0] != "engramlab":
                    continue
                target = owner(name)
                if target and target != mod and target not in packages:
                    graph[mod].add(target)
    return graph, packages


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first walk (each reported once, by its set of modules)."""
    found, seen_sets = [], set()
    state: dict[str, int] = {}  # 1 on the path, 2 done

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):]
                key = frozenset(cycle)
                if key not in seen_sets:
                    seen_sets.add(key)
                    found.append(cycle + [nxt])
            elif nxt not in state:
                walk(nxt, path)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node, [])
    return found


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert [set(c) for c in _cycles(graph)] == [{"a", "b", "c"}]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph, _ = _graph()
    assert sum(map(len, graph.values())) > 100  # the scan sees the package's imports at all
    cycles = _cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_layers_point_one_way():
    """models/ and data/ know nothing of locators, training or the CLI; locators know nothing of
    the CLI or the report; nothing but the CLI imports the CLI."""
    graph, _ = _graph()
    forbidden = {
        "engramlab.models": ("engramlab.locate", "engramlab.train", "engramlab.cli", "engramlab.report",
                             "engramlab.dynamics"),
        "engramlab.data": ("engramlab.locate", "engramlab.train", "engramlab.cli", "engramlab.models"),
        "engramlab.locate": ("engramlab.cli", "engramlab.report", "engramlab.train"),
        "engramlab.train": ("engramlab.cli", "engramlab.locate"),
    }
    bad = []
    for mod, targets in graph.items():
        for layer, banned in forbidden.items():
            if mod.startswith(layer + ".") or mod == layer:
                bad += [f"{mod} -> {t}" for t in targets if t.startswith(banned)]
        if not mod.startswith("engramlab.cli"):
            bad += [f"{mod} -> {t}" for t in targets if t.startswith("engramlab.cli")]
    assert not bad, "imports against the layering: " + ", ".join(sorted(bad))


def test_site_names_are_built_in_one_place():
    """Hook-site names come from ``models.hooks.site_name``: no f"blocks.{l}..." outside it."""
    hand_built = [f"{p.relative_to(ROOT.parent)}:{n}" for p in ROOT.rglob("*.py") if p.name != "hooks.py"
                  for n, line in enumerate(p.read_text().splitlines(), 1) if 'f"blocks.{' in line]
    assert not hand_built, "build site names with site_name(kind, layer): " + ", ".join(hand_built)
