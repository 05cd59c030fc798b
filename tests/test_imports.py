"""The package's floor plan, read from the source with `ast`: no module imports one on a higher floor,
there is no import circle, and imports inside functions carry a comment saying why.

Floors, lowest first (README "Layout"): a module may import its own floor and the ones below.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE, CLI = ROOT / "npgpt", ROOT / "cli"        # cli/ installs as npgpt.cli

FLOORS = [
    ("npgpt.errors", "npgpt.backend"),
    ("npgpt.fileio", "npgpt.safeio", "npgpt.gguf", "npgpt.hub"),
    ("npgpt.tensor",),
    ("npgpt.ops", "npgpt.precision", "npgpt.perf"),
    ("npgpt.nn", "npgpt.gradcheck", "npgpt.layers"),
    ("npgpt.model", "npgpt.llama", "npgpt.sampling", "npgpt.structured"),
    ("npgpt.optim", "npgpt.distributed", "npgpt.replicas"),
    ("npgpt.data", "npgpt.tokenizer", "npgpt.checkpoint", "npgpt.lora", "npgpt.gguf_models"),
    ("npgpt.loading",),
    ("npgpt.training",),
    ("npgpt.train", "npgpt.generate"),
    ("npgpt.quant", "npgpt.compress", "npgpt.sft", "npgpt.interpret", "npgpt.bench", "npgpt.evaluate",
     "npgpt.tokenizer.bench", "npgpt.serve",
     "npgpt.reference", "npgpt.viz", "npgpt.distributed.launcher", "npgpt.tasks", "npgpt.exercises",
     "npgpt.dpo", "npgpt.rl", "npgpt.verifiable", "npgpt.programs"),
    ("npgpt.cli",),
]


def floor_of(module):
    """The floor of a dotted module name: its longest listed prefix decides."""
    best, floor = -1, None
    for i, names in enumerate(FLOORS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, floor = len(name), i
    return floor


def source_files():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        yield path, ".".join(parts[:-1] if parts[-1] == "__init__" else parts), parts[-1] == "__init__"
    for path in sorted(CLI.rglob("*.py")):
        parts = ("npgpt", "cli") + path.relative_to(CLI).with_suffix("").parts
        yield path, ".".join(parts[:-1] if parts[-1] == "__init__" else parts), parts[-1] == "__init__"


def npgpt_imports(tree, module, is_package):
    """(imported npgpt module, line, inside a function?) for every import in the tree."""
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node

    def in_function(node):
        while node in parents:
            node = parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                return True
        return False

    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:                                    # relative: resolve against this package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from npgpt import tokenizer` imports the submodule npgpt.tokenizer
            names = [f"{prefix}.{a.name}" if floor_of(f"{prefix}.{a.name}") is not None and prefix == "npgpt"
                     else prefix for a in node.names]
        else:
            continue
        for name in names:
            if name == "npgpt" or not name.startswith("npgpt."):
                continue
            out.append((name, node.lineno, in_function(node)))
    return out


def all_imports():
    found = []
    for path, module, is_package in source_files():
        if module == "npgpt":
            continue                          # the package's front door re-exports the public names
        tree = ast.parse(path.read_text(encoding="utf-8"))
        lines = path.read_text(encoding="utf-8").splitlines()
        for name, line, inside in npgpt_imports(tree, module, is_package):
            found.append((path, module, name, line, inside, lines[line - 1]))
    return found


def test_every_module_has_a_floor():
    missing = [m for _, m, _ in source_files() if m != "npgpt" and floor_of(m) is None]
    assert not missing, f"modules without a floor in tests/test_imports.py: {missing}"


def test_no_module_imports_a_higher_floor():
    bad = [f"{path.relative_to(ROOT)}:{line}: {module} (floor {floor_of(module)}) imports {name} "
           f"(floor {floor_of(name)})"
           for path, module, name, line, _, _ in all_imports()
           if floor_of(name) is not None and floor_of(name) > floor_of(module)]
    assert not bad, "imports that run up a floor:\n" + "\n".join(bad)


def test_no_import_circle():
    graph = {}
    for _, module, name, _, _, _ in all_imports():
        if name != module:
            graph.setdefault(module, set()).add(name)
    # resolve `npgpt.x.Name` style entries to the module they name
    modules = {m for _, m, _ in source_files()}

    def resolve(name):
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        return name
    graph = {m: {resolve(n) for n in targets} - {m} for m, targets in graph.items()}
    state = {}

    def visit(m, stack):
        if state.get(m) == "done":
            return None
        if state.get(m) == "open":
            return stack[stack.index(m):] + [m]
        state[m] = "open"
        for n in sorted(graph.get(m, ())):
            if n.startswith(m + "."):             # a package importing its own submodules is not a circle
                continue
            cycle = visit(n, stack + [m])
            if cycle:
                return cycle
        state[m] = "done"
        return None

    for m in sorted(graph):
        cycle = visit(m, [])
        assert cycle is None, "import circle: " + " -> ".join(cycle)


def _says_why(lines, line):
    """A comment on the import's line, or on the line above its run of import lines."""
    i = line - 1
    while i > 0 and lines[i - 1].strip().startswith(("from ", "import ")) and "#" not in lines[i]:
        i -= 1
    return "#" in lines[i] or (i > 0 and lines[i - 1].strip().startswith("#"))


def test_imports_inside_functions_say_why():
    bad = [f"{path.relative_to(ROOT)}:{line}: {text.strip()}"
           for path, module, name, line, inside, text in all_imports()
           if inside and not _says_why(path.read_text(encoding="utf-8").splitlines(), line)]
    assert not bad, "imports inside functions without a comment saying why:\n" + "\n".join(bad)


@pytest.mark.parametrize("module, imported, ok", [
    ("npgpt.model", "npgpt.quant", False),
    ("npgpt.train", "npgpt.compress", False),
    ("npgpt.compress", "npgpt.train", True),
    ("npgpt.tensor", "npgpt.backend", True),
    ("npgpt.cli.train", "npgpt.train", True),
    ("npgpt.tokenizer.bpe", "npgpt.tokenizer.files", True),
    ("npgpt.distributed.comm", "npgpt.distributed.launcher", False),
    ("npgpt.distributed.launcher", "npgpt.bench", True),
    ("npgpt.train", "npgpt.training.scaler", True),
    ("npgpt.training.scaler", "npgpt.train", False),
    ("npgpt.precision", "npgpt.training", False),
    ("npgpt.serve.engine", "npgpt.serve.protocol", True),
    ("npgpt.layers", "npgpt.model", False),
    ("npgpt.model", "npgpt.layers", True),
    ("npgpt.loading", "npgpt.train", False),
    ("npgpt.train", "npgpt.loading", True),
    ("npgpt.loading", "npgpt.quant", False),
    ("npgpt.lora", "npgpt.loading", False),
    ("npgpt.training.plugins", "npgpt.train", False),
    ("npgpt.training.plugins", "npgpt.compress", False),
    ("npgpt.train", "npgpt.training.plugins", True),
    ("npgpt.training.plugins", "npgpt.loading", True),
])
def test_the_floor_rule_itself(module, imported, ok):
    assert (floor_of(imported) <= floor_of(module)) == ok


def test_every_package_and_its_data_is_in_pyproject():
    """A wheel holds only the packages pyproject.toml lists (an editable install hides a missing one):
    every folder of npgpt/ and cli/ with an __init__.py is listed, and every other file inside a
    package (data, or Python files in a folder that is not a package, like exercise stubs) is matched
    by its package-data."""
    tomllib = pytest.importorskip("tomllib")
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    dirs = {name: ROOT / path for name, path in setup["package-dir"].items()}

    def folder(package):
        head = max((n for n in dirs if package == n or package.startswith(n + ".")), key=len)
        return dirs[head].joinpath(*package[len(head):].split(".")[1:])

    listed = set(setup["packages"])
    found = {"npgpt." + ".".join(p.parent.relative_to(PACKAGE).parts) if p.parent != PACKAGE else "npgpt"
             for p in PACKAGE.rglob("__init__.py")}
    found |= {".".join(("npgpt", "cli") + p.parent.relative_to(CLI).parts) for p in CLI.rglob("__init__.py")}
    assert found - listed == set(), f"packages missing from pyproject.toml: {sorted(found - listed)}"
    assert listed - found == set(), f"pyproject.toml lists packages that do not exist: {sorted(listed - found)}"
    data = setup.get("package-data", {})
    unlisted = []
    for package in sorted(listed):
        base = folder(package)
        subpackages = [folder(p) for p in listed if p.startswith(package + ".")]
        for path in base.rglob("*"):
            if (not path.is_file() or path.suffix == ".pyc" or "__pycache__" in path.parts
                    or any(sub in path.parents for sub in subpackages)):
                continue
            if path.suffix == ".py" and path.parent == base:     # a module of the package itself
                continue
            rel = path.relative_to(base)
            if not any(rel.match(pattern) for pattern in data.get(package, [])):
                unlisted.append(f"{package}: {rel}")
    assert not unlisted, f"files a wheel would leave out (add them to package-data): {unlisted}"


def test_no_private_name_is_imported_from_another_module():
    """A name with a leading underscore belongs to its module: another module that needs it needs it
    public (bench.check_counts, backend.cupy_module)."""
    bad = []
    for path, module, _ in source_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("npgpt"):
                bad += [f"{path.relative_to(ROOT)}:{node.lineno}: {a.name} from {node.module}"
                        for a in node.names if a.name.startswith("_") and not a.name.endswith("__")]
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)
