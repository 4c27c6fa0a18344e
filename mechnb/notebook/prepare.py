"""Run the tutorials' preparation cells ahead of time, so that they start from a warm cache.

A tutorial cell tagged `prepare` (cell metadata `tags`) computes something once and caches
it (tutorial 08 trains its transcoders into a checkpoint under the model cache). Binder's
postBuild runs those cells at build time, with `model` the embedded model, so a reader's
first run of the tutorial loads the result instead of computing it:

    python -m mechnb.notebook.prepare notebooks

Lines starting with `%` (magics) are skipped; the cells must be plain Python otherwise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def prepare_cells(path: Path) -> list[str]:
    """The sources of the cells of notebook `path` tagged `prepare`."""
    notebook = json.loads(Path(path).read_text(encoding="utf-8"))
    found = []
    for cell in notebook.get("cells", []):
        if cell.get("cell_type") == "code" and "prepare" in cell.get("metadata", {}).get("tags", []):
            source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            found.append("\n".join(line for line in source.splitlines() if not line.lstrip().startswith("%")))
    return found


def main(arguments: list[str]) -> int:
    if not arguments:
        print("usage: python -m mechnb.notebook.prepare NOTEBOOK_OR_DIRECTORY...", file=sys.stderr)
        return 2
    paths = []
    for argument in arguments:
        path = Path(argument)
        paths += sorted(path.glob("*.ipynb")) if path.is_dir() else [path]
    model = None
    for path in paths:
        for number, source in enumerate(prepare_cells(path), 1):
            if model is None:
                from ..model import load

                model = load()
            print(f"preparing {path.name}, cell {number}")
            exec(compile(source, f"{path.name}[prepare {number}]", "exec"), {"model": model})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
