"""circuitsvis views, rendered offline: the bundle is sent to the page once per kernel.

circuitsvis's own `render()` tests for internet on every display (an HTTP request)
and then either loads its JavaScript from a CDN or inlines the whole 1.3 MB bundle
into every view. Here the bundle shipped in the circuitsvis wheel
(`dist/cdn/iife.js`) goes into the first view of the kernel session as a classic
script, which defines the global `CircuitsVis`; every later view is a small `div`
plus a script that renders into it once `CircuitsVis` exists. Nothing asks the
network for anything.

    >>> html = view("AttentionHeads", {"attention": pattern, "tokens": tokens})

Safety: props travel as JSON inside a `<script>`, with `<`, `>` and `&` written as
unicode escapes, so a token such as `</script><script>alert(1)</script>` stays text
(React renders strings as text). URLs inside the bundle (XML namespaces, links in
error messages) are written with escaped slashes, so no rendered output holds a
literal `http://` or `https://`.

Gotcha: a page that never received the bundle (an output cleared, a notebook
reopened without re-running its first view) shows a note in place of the view;
`reset()` makes the next view carry the bundle again.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

# Whether this kernel has already sent the bundle to the page. Module state on
# purpose: it belongs to the kernel process, exactly as the page's global does.
_sent = False
_bundle: str | None = None

WAIT_MS = 10_000


def bundle() -> str:
    """The circuitsvis browser bundle, made safe to inline in a classic `<script>`."""
    global _bundle
    if _bundle is None:
        import circuitsvis

        path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
        text = path.read_text(encoding="utf-8")
        lines = [line for line in text.splitlines() if not line.startswith("//# sourceMappingURL")]
        text = "\n".join(lines)
        text = text.replace("</script", "<\\/script").replace("http://", "http:\\/\\/")
        _bundle = text.replace("https://", "https:\\/\\/")
    return _bundle


def reset() -> None:
    """Make the next view carry the bundle again (for a page that lost it)."""
    global _sent
    _sent = False


def safe_json(value) -> str:
    """JSON that cannot close a `<script>` or start markup: `<`, `>`, `&` as unicode escapes."""
    try:
        text = json.dumps(value, allow_nan=False, separators=(",", ":"))
    except ValueError:
        from ..core.errors import ViewError

        raise ViewError("a view cannot show NaN or infinite values, and these came out of the model's "
                          "run (an active hook or steering?): the numbers are in the result's .values; "
                          "remove that intervention to see the view") from None
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                          ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escaped)
    return text


def compact(values, digits: int = 3):
    """Nested lists of numbers rounded for display (exact zeros as `0`): small HTML."""
    if isinstance(values, (list, tuple)):
        return [compact(v, digits) for v in values]
    rounded = round(float(values), digits)
    return 0 if rounded == 0 else rounded


def view(component: str, props: dict, title: str | None = None) -> str:
    """The HTML of one circuitsvis view (`AttentionHeads`, `ColoredTokens`, ...)."""
    global _sent
    import html

    ident = "mechnb-view-" + uuid.uuid4().hex[:12]
    parts = []
    if title:
        parts.append(f'<div style="font-weight:600;margin-top:8px">{html.escape(title)}</div>')
    parts.append(f'<div id="{ident}" class="mechnb-view" style="margin: 8px 0;"></div>')
    if not _sent:
        parts.append(f"<script>{bundle()}\nwindow.CircuitsVis = CircuitsVis;</script>")
        _sent = True
    parts.append(
        "<script>(function () {\n"
        f'  var id = "{ident}", props = {safe_json(props)}, waited = 0;\n'
        "  function draw() {\n"
        "    var target = document.getElementById(id);\n"
        "    if (window.CircuitsVis && target) {\n"
        f"      window.CircuitsVis.render(id, window.CircuitsVis.{component}, props);\n"
        f"    }} else if ((waited += 50) < {WAIT_MS}) {{ setTimeout(draw, 50); }}\n"
        "    else if (target) { target.textContent = 'circuitsvis is not loaded in this page: "
        "re-run the cell (mechnb sends its script with the first view of a kernel session; "
        "mechnb.display.render.reset() sends it again)'; }\n"
        "  }\n"
        "  draw();\n"
        "})();</script>"
    )
    return "\n".join(parts)
