"""The layout is the architecture: layers import downward only, no module imports itself back,
and `docs/architecture.md` names only what exists.

Layers, lowest first (see docs/architecture.md): the core (and `datasets`), the display,
the methods (`methods/`, `sae/`, `circuits/`, `transcoders/`, `graphs/`), the API (`mechnb.model`), the agent
(`agent/`: the model's experiments as tools, the MCP server), the notebook, and
the package itself (its public names and the IPython extension's entry). Every import counts, those inside functions too: a lazy import
that points upward is still a dependency, and a cycle of lazy imports is still a cycle.
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "mechnb"
LAYERS = {"core": 0, "datasets": 0, "display": 1, "methods": 2, "sae": 2, "circuits": 2, "transcoders": 2,
          "graphs": 2, "vision": 2, "causal": 2, "model": 3, "agent": 4, "notebook": 5,
          "__main__": 6, "mcp": 6, "": 6}  # "": the package itself, whose names are the public API and the extension's entry


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports, anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from .x import y` imports the module x.y when there is one, else x
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found |= {target for target in targets if target in known and target != name}
    return found


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def layer(name: str) -> int:
    part = name.split(".")[1] if "." in name else ""
    return LAYERS[part]


def test_every_module_is_in_a_layer():
    assert all(layer(name) >= 0 for name in modules())


def test_no_layer_imports_a_higher_one():
    upward = sorted(f"{importer} ({layer(importer)}) imports {imported} ({layer(imported)})"
                    for importer, targets in graph().items() for imported in targets
                    if layer(imported) > layer(importer))
    assert upward == []


def test_no_import_cycles():
    edges = graph()
    # The package's own __init__ imports lazily by name only; a submodule importing `mechnb`
    # for a name would make every module depend on every other.
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert cycles == [], [" -> ".join(cycle) for cycle in cycles]


def test_the_architecture_document_names_only_modules_that_exist():
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`(mechnb(?:\.\w+)+)`", text))
    known = set(modules())
    missing = sorted(name for name in named
                     if name not in known and name.rsplit(".", 1)[0] not in known)  # a module's attribute
    assert named and missing == []
    paths = set(re.findall(r"`((?:mechnb|tests|bench|notebooks|docs)/[\w./-]+)`", text))
    # Directories the runs create (ignored by git) are named but absent from a fresh clone.
    created = {line.strip() for line in (ROOT / ".gitignore").read_text().splitlines()}
    assert [path for path in sorted(paths)
            if not (ROOT / path).exists() and path not in created] == []
    # Every module of the package is placed in the document.
    assert [name for name in sorted(known) if name.split(".")[-1] not in text] == []


def test_the_readme_links_the_architecture_document():
    assert "docs/architecture.md" in (ROOT / "README.md").read_text()


def test_every_error_class_is_exported_from_mechnb():
    import mechnb

    defined = {node.name for path in modules().values() for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.ClassDef) and node.name.endswith(("Error", "Warning"))}
    assert {"SiteError", "PatchError", "SAEError", "CircuitError", "OutOfMemoryWarning"} <= defined
    missing = sorted(name for name in defined if not isinstance(getattr(mechnb, name, None), type))
    assert missing == []
    assert all(issubclass(getattr(mechnb, name), (mechnb.MechnbError, Warning)) for name in defined)


def test_import_mechnb_stays_light():
    import subprocess
    import sys

    code = "import sys, mechnb; print(sorted(m for m in ('torch', 'transformers', 'nnsight', 'pandas') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
