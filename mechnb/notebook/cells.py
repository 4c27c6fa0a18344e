"""Running a `%%trace` cell: the cell's code inside one trace of the model, in the user's namespace.

    %%trace "When Mary and John went to the store, John gave a drink to"
    h = model["resid_post.5"].save()
    model["head.9.6"] = 0

nnsight reads the source of the traced `with` block and caches it by file name, so the
cell is compiled under a new file name each run and registered in `linecache`. Its body
gets a first statement of our own (nnsight refuses a body that opens with `try:`). An
error in the cell becomes one `TraceError` naming the cell's line; names assigned in the
cell but not `.save()`d are lost (nnsight), which a note says.
"""

from __future__ import annotations

import itertools
import linecache
import sys
import textwrap
import traceback

from ..core.errors import MagicError, MechnbError, TraceError

_counter = itertools.count()


def run_traced_cell(shell, model, prompts, cell: str, **options) -> None:
    """Execute `cell` in the user namespace inside `model.trace(prompts, **options)`."""
    handle = "__mechnb_trace__"
    body = textwrap.dedent(cell).strip("\n") or "pass"
    # A first statement of our own: nnsight refuses a body that opens with `try:`.
    source = f"with {handle}:\n    {handle}.batch\n" + textwrap.indent(body, "    ") + "\n"
    filename = f"<mechnb-trace-{next(_counter)}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    try:
        code = compile(source, filename, "exec")
    except SyntaxError as error:
        raise MagicError(f"syntax error in the %%trace cell, line {(error.lineno or 3) - 2}: "
                         f"{error.msg}") from None
    namespace = shell.user_ns
    assigned = _assigned_names(body)
    before = {name: id(namespace[name]) for name in assigned if name in namespace}
    namespace[handle] = model.trace(prompts, **options)
    try:
        exec(code, namespace)
    except MechnbError:
        raise
    except KeyboardInterrupt:
        raise TraceError("the %%trace cell was interrupted; the model is unchanged") from None
    except Exception as error:
        where = _cell_line(error, filename)
        raise TraceError(f"the %%trace cell raised {type(error).__name__}: {error}{where}; "
                         "the model is unchanged") from None
    finally:
        namespace.pop(handle, None)
    lost = [n for n in assigned if n not in namespace or before.get(n) == id(namespace[n])]
    if lost:
        print(f"note: {', '.join(lost)} assigned in the %%trace cell but not kept: only values "
              "marked with .save() leave a trace (e.g. h = model['resid_post.5'].save())",
              file=sys.stderr)


def _assigned_names(body: str) -> list[str]:
    """Names the cell assigns at its top level (plain `name = ...` statements)."""
    import ast

    names = []
    for statement in ast.parse(body).body:
        targets = statement.targets if isinstance(statement, ast.Assign) else []
        for target in targets:
            if isinstance(target, ast.Name) and target.id not in names:
                names.append(target.id)
    return names


def _cell_line(error: BaseException, filename: str) -> str:
    """` (cell line N: source)` for the innermost frame of the cell in the traceback."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == filename]
    if not frames:
        return ""
    frame = frames[-1]
    return f" (cell line {frame.lineno - 2}: {(frame.line or '').strip()})"
