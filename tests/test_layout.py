"""The house: the package's import graph has no cycle (lazy imports inside functions included), the kernels
import only torch and triton, train.py is the loop, and no line is longer than 120 columns."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tropd_ds"
KERNELS = ROOT / "kernels" / "tropd_kernels"


def imported_modules(path: Path, package: str) -> set[str]:
    """Every module of `package` that `path` imports, at the top or inside a function."""
    module = path.relative_to(path.parents[len(package.split("."))]).with_suffix("").as_posix().replace("/", ".")
    parts = module.split(".")
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = (
                    parts[: len(parts) - node.level]
                    if path.name != "__init__.py"
                    else parts[: len(parts) - node.level + 1]
                )
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target + "." + a.name for a in node.names] + [target]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out |= {n for n in names if n.startswith(package + ".") and n.count(".") == 1}
    out.discard(module)
    return out


def graph(folder: Path, package: str) -> dict[str, set[str]]:
    modules = {f"{package}.{p.stem}" for p in folder.glob("*.py") if p.stem != "__init__"}
    return {
        f"{package}.{p.stem}": imported_modules(p, package) & modules
        for p in folder.glob("*.py")
        if p.stem != "__init__"
    }


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_package_import_graph_has_no_cycle():
    edges = graph(PACKAGE, "tropd_ds")
    assert "tropd_ds.train" in edges and edges["tropd_ds.train"], "the graph was not read"
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))
    # the phases build on each other in the order of a step, never backwards
    assert "tropd_ds.update" not in edges["tropd_ds.scoring"] and "tropd_ds.scoring" not in edges["tropd_ds.rollout"]
    assert not edges["tropd_ds.objectives"], "objectives are arithmetic on the kernels' results only"


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_kernels_import_only_torch_and_triton():
    allowed = {"torch", "triton", "tropd_kernels", "__future__"}
    for path in KERNELS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level:
                roots = {node.module.split(".")[0]}
            else:
                continue
            stdlib = {"math", "os", "importlib", "types", "dataclasses", "typing"}
            assert roots <= allowed | stdlib, f"{path.name} imports {roots - allowed - stdlib}"


def test_no_line_is_longer_than_120_columns():
    long = [
        f"{p.relative_to(ROOT)}:{i}"
        for folder in (PACKAGE, KERNELS)
        for p in folder.rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if len(line) > 120
    ]
    assert not long, long[:5]


def third_party_imports(folder: Path) -> set[str]:
    """Top-level names of the absolute imports outside the standard library, anywhere in `folder`."""
    import sys

    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("tropd_ds", "tropd_kernels")}


def test_every_import_of_the_package_is_declared_in_setup_py():
    """Each third-party module the package imports comes from a distribution that setup.py requires, or from
    one of its extras (the missing-extra message names those: tropd_ds/extras.py)."""
    import re
    from importlib.metadata import packages_distributions

    from tropd_ds.extras import EXTRAS

    setup = (ROOT / "setup.py").read_text()
    declared = {
        re.split(r"[<>=;\[ ]", d)[0].lower().replace("_", "-") for d in re.findall(r'"([A-Za-z][\w.-]*[^"]*)"', setup)
    }
    dists = packages_distributions()
    missing = []
    for name in sorted(third_party_imports(PACKAGE) | third_party_imports(KERNELS)):
        owners = {d.lower().replace("_", "-") for d in dists.get(name, [name])}
        if not owners & declared:
            missing.append(f"{name} (from {sorted(owners)})")
    assert not missing, f"imported but not declared in setup.py: {missing}"
    extras = re.search(r"extras_require=\{(.*?)\n    \}", setup, re.S).group(1)
    for module, (extra, _) in EXTRAS.items():
        assert f'"{extra}":' in extras, f"{module}: extra {extra!r} is not in setup.py's extras_require"


def test_the_mutation_scope_names_files_and_functions_that_exist_and_fences_the_rest():
    """`make mutation` would silently test less if a scoped function were renamed: every name must exist, and the
    staged copy must fence exactly the out-of-scope top-level definitions."""
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    import mutation_test

    sources = {"tropd_ds": PACKAGE, "tropd_kernels": KERNELS}
    for rel, keep in mutation_test.SCOPE.items():
        top, _, rest = rel.partition("/")
        path = sources[top] / rest
        assert path.is_file(), rel
        tree = ast.parse(path.read_text())
        names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        assert names, f"{rel} has no function for mutmut to mutate"
        skip = mutation_test.SKIP.get(rel, [])
        assert set(keep or []) <= names and set(skip) <= names, (rel, set(keep or []) - names, set(skip) - names)
        if keep is None and not skip:
            continue
        fenced = mutation_test.fenced(path.read_text(), keep, skip).splitlines()
        ast.parse("\n".join(fenced))
        out = 0
        for i, line in enumerate(fenced):
            if line == "# pragma: no mutate start":
                out += 1
                name = next(x for x in fenced[i + 1 :] if not x.startswith("@")).split()[1].split("(")[0].rstrip(":")
                assert (keep is not None and name not in keep) or name in skip, (rel, name)
        assert out == len(names - set(keep or names)) + len(skip), rel
    for test in mutation_test.TESTS:
        assert (ROOT / test).is_file(), test
