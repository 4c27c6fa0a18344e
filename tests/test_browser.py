"""The attention tutorial, executed and opened in headless Chromium: do the views render?

The executed notebook's outputs are laid into one page as a notebook front end
would show them (HTML as HTML, PNG as images), and Chromium, Debian's package
driven by Playwright, loads it with every request off this machine blocked and
recorded. The circuitsvis views must have drawn elements with a size, the heatmap
images must be there, and no request may have tried to leave.
"""

import html
import shutil
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).parent.parent
ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Debian's chromium package is not installed (make test installs it when run as root)")
    return path


def page_of(notebook) -> str:
    """The notebook's outputs as one HTML page, in order."""
    parts = ["<!doctype html><html><head><meta charset='utf-8'></head><body>"]
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "text/html" in data:
                parts.append(f"<div class='output'>{data['text/html']}</div>")
            elif "image/png" in data:
                parts.append(f"<img class='output heatmap' src='data:image/png;base64,{data['image/png']}'/>")
            elif "text" in output:
                parts.append(f"<pre>{html.escape(output['text'])}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


@pytest.mark.slow
def test_attention_tutorial_renders_in_chromium(tmp_path):
    executable = chromium()
    from nbclient import NotebookClient
    from playwright.sync_api import sync_playwright

    path = ROOT / "notebooks" / "01_attention_and_lens.ipynb"
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    page_file = tmp_path / "page.html"
    page_file.write_text(page_of(notebook), encoding="utf-8")
    outside = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})

            def gate(route):
                url = route.request.url
                if url.startswith(("file://", "data:", "about:")) or "127.0.0.1" in url:
                    return route.continue_()
                outside.append(url)
                return route.abort()

            page.route("**/*", gate)
            errors = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(page_file.as_uri())
            page.wait_for_function(
                "() => [...document.querySelectorAll('.mechnb-view')].every(v => v.childElementCount > 0)",
                timeout=30_000)
            sizes = page.evaluate("""() => [...document.querySelectorAll('.mechnb-view')].map(v => {
                const box = v.getBoundingClientRect();
                return [v.childElementCount, box.width, box.height, v.innerText.length];
            })""")
            images = page.evaluate("""() => [...document.querySelectorAll('img.heatmap')]
                .map(i => [i.naturalWidth, i.naturalHeight])""")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "01_attention_and_lens.png"), full_page=True)
        finally:
            browser.close()
    assert len(sizes) >= 3  # two attention layers and a coloured-token view
    for children, width, height, text in sizes:
        assert children > 0 and width > 100 and height > 20
    assert len(images) >= 3 and all(w > 100 and h > 100 for w, h in images)
    assert outside == []
    assert errors == []
