"""JupyterLab in headless Chromium, for the tutorial tests: open a notebook, run every cell, save.

The server (JupyterLab 4, with Notebook 7 beside it) runs on 127.0.0.1 with no token, on a copy of the notebooks, with the
news feed, update check and autosave off and notebook windowing off (so every cell is in the
page and measurable). Chromium is Debian's package driven by Playwright; every
request the page makes is routed, and any that is not for 127.0.0.1 is refused and
recorded. The kernel is a child of the server: its peak resident memory is read from
`/proc/<pid>/status` (VmHWM) before it is shut down.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]

SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    # No autosave (every 120 s): the test saves once, after the run. An autosave at the same
    # moment can make JupyterLab ask whether to overwrite a file changed on disk, and the save
    # the test awaits then never ends (a fresh-clone run hung on tutorial 06 that way).
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
}

# Polled in the page: done when every code cell ran and the kernel is idle, or a cell errored.
PROGRESS = """() => {
    const panel = window.jupyterapp.shell.currentWidget;
    if (!panel || !panel.content || !panel.sessionContext) return null;
    let total = 0, done = 0, error = null;
    for (const cell of panel.content.widgets) {
        if (cell.model.type !== 'code') continue;
        total += 1;
        const prompt = cell.promptNode ? cell.promptNode.textContent : '';
        if (cell.model.executionCount !== null && !prompt.includes('*')) done += 1;
        for (let i = 0; i < cell.model.outputs.length; i++) {
            const out = cell.model.outputs.get(i).toJSON();
            if (out.output_type === 'error') error = `${out.ename}: ${out.evalue}`;
        }
    }
    const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
    const idle = kernel && kernel.status === 'idle';
    return (error || (total > 0 && done === total && idle)) ? {total, done, error} : null;
}"""

# What rendered: circuitsvis views, widgets and images, each with its size.
RENDERED = """() => {
    const box = e => { const r = e.getBoundingClientRect(); return [r.width, r.height]; };
    const views = [...document.querySelectorAll('.jp-OutputArea-output .mechnb-view')]
        .map(v => [v.childElementCount, ...box(v)]);
    const widgets = [...document.querySelectorAll('.jp-OutputArea-output .jupyter-widgets')]
        .filter(w => !w.parentElement.closest('.jupyter-widgets')).map(box);
    const images = [...document.querySelectorAll('.jp-OutputArea-output img')]
        .map(i => [i.naturalWidth, i.naturalHeight]);
    const text = [...document.querySelectorAll('.jp-OutputArea-output')].map(o => o.innerText).join('\\n');
    return {views, widgets, images, widget_failures: (text.match(/Error displaying widget|Loading widget/g) || []).length,
            tracebacks: (text.match(/Traceback \\(most recent call last\\)/g) || []).length};
}"""


@dataclass
class Run:
    """One notebook run in the browser: the saved notebook and what the page showed."""

    notebook: nbformat.NotebookNode
    seconds: float
    peak_rss: int
    rendered: dict
    outside: list = field(default_factory=list)
    page_errors: list = field(default_factory=list)
    frontend_errors: list = field(default_factory=list)
    interaction: dict | None = None


# Runs a JupyterLab command in the page and returns the id of what it returned (the widget
# `docmanager:open` opens), or null; fails after `ms` instead of waiting for ever (a command
# that opens a dialog, such as a save JupyterLab thinks would overwrite newer changes, never
# ends on its own).
COMMAND = """async ([command, args, ms]) => {
    const timeout = new Promise((_, reject) => setTimeout(
        () => reject(new Error(`${command} did not finish in ${ms} ms`)), ms));
    const result = await Promise.race([window.jupyterapp.commands.execute(command, args), timeout]);
    return result && result.id !== undefined ? result.id : null;
}"""


def _command(page, command: str, args: dict | None = None, ms: int = 60_000):
    """Run JupyterLab command `command` with `args` in `page`; the id of its result, if any."""
    return page.evaluate(COMMAND, [command, args or {}, ms])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JupyterLab:
    """A JupyterLab server and a Chromium page on it; `run(name)` executes one notebook."""

    def __init__(self, notebooks: list[Path], root: Path, chromium: str, artifacts: Path):
        self.root, self.artifacts = root, artifacts
        for path in notebooks:
            shutil.copy(path, root / path.name)
        settings = root.parent / "lab-settings"
        for name, values in SETTINGS.items():
            target = settings / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(values))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
                   f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
                   "--IdentityProvider.token=", "--ServerApp.password=", "--ServerApp.disable_check_xsrf=True",
                   f"--ServerApp.root_dir={root}", "--expose-app-in-browser", "--LabApp.news_url=None",
                   "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                   f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={root.parent / 'ws'}",
                   "--JupyterNotebookApp.expose_app_in_browser=True"]
        if os.getuid() == 0:
            command.append("--allow-root")
        # Kernels skip Python's last garbage collections when they exit: with a model and a
        # tutorial's results in memory, those took 2-3 s of a core per kernel shut down (in
        # the IPython profile of this server's kernels only; no cell sees a difference).
        startup = root.parent / "ipython" / "profile_default" / "startup"
        startup.mkdir(parents=True)
        (startup / "00-quick-exit.py").write_text("__import__('atexit').register(__import__('gc').freeze)\n")
        self.log = open(root.parent / "lab.log", "w")
        # The kernels' mechnb cache holds the converted models and nothing else: what the
        # tutorials cache (ROME's key statistics, feature labels) is computed in every run, as
        # on a new machine, and no run reads what an earlier one left.
        from mechnb.core import embedded

        cache = root.parent / "mechnb-cache"
        cache.mkdir()
        converted = embedded.converted()
        (cache / converted.name).symlink_to(converted, target_is_directory=True)
        # The embedded vision model too (trained once by `make test`'s set-up, like the conversion).
        from mechnb.vision.model import trained

        vit = trained()
        (cache / vit.name).symlink_to(vit, target_is_directory=True)
        # The kernels' Hugging Face cache is offline and holds one file: a stand-in in Gemma Scope's
        # format where tutorial 04 loads a published SAE by name (`hubcache`).
        from hubcache import gemma_scope_stand_in

        hf_home = root.parent / "hf"
        gemma_scope_stand_in(hf_home / "hub")
        self.server = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, cwd=root,
                                       env=dict(os.environ, IPYTHONDIR=str(startup.parents[1]),
                                                MECHNB_CACHE=str(cache), HF_HOME=str(hf_home),
                                                HF_HUB_OFFLINE="1"))
        self._wait_for_server()
        from playwright.sync_api import sync_playwright

        self._playwright = sync_playwright().start()
        self.browser = self._playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        self._lab_page = None
        self._shutting_down: list[threading.Thread] = []

    def _wait_for_server(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.server.poll() is not None:
                raise RuntimeError(f"jupyter lab exited: {(self.root.parent / 'lab.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.url}/api/status", timeout=2).read()
                return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("jupyter lab did not start within a minute")

    def _new_page(self, url: str):
        """A page on `url` whose requests outside 127.0.0.1 are refused and kept in `page.outside`,
        and whose script errors are kept in `page.errors` (or `page.frontend_errors`)."""
        page = self.browser.new_page(viewport={"width": 1400, "height": 1000})
        page.outside, page.errors, page.frontend_errors = [], [], []

        def gate(route):
            url = route.request.url
            if url.startswith(("data:", "blob:", "about:")) or url.startswith(f"{self.url}/"):
                return route.continue_()
            page.outside.append(url)
            return route.abort()

        def page_error(error):
            stack = (error.stack or "").splitlines()[1:2]
            # Notebook 7.6's own bundle throws now and then (a plugin's settings schema
            # undefined while loading shortcuts; `filebrowser:open-path` not registered):
            # errors raised in the front end's core, not in a view, are kept apart.
            own = any(f"{self.url}/static/notebook/notebook_core." in line for line in stack)
            (page.frontend_errors if own else page.errors).append(f"{error} {stack}")

        page.route("**/*", gate)
        page.on("pageerror", page_error)
        page.goto(url)
        return page

    def run(self, name: str, timeout: float = 600, ui: str = "lab", interact=None) -> Run:
        """Open `name` in JupyterLab (or `ui="notebook"`: Notebook 7), run all cells, save;
        what ran and what the page showed. `interact(page)`, if given, acts on the page once
        every cell has run (clicks, as a user's), its kernel still running; what it returns
        is the run's `interaction`.

        JupyterLab's page is loaded once and each notebook opened in it, then closed, as a
        user goes from one tutorial to the next (loading the front end took about as long
        as the shorter tutorials); Notebook 7 gets a page of its own.
        """
        if ui == "lab":
            if self._lab_page is None:
                self._lab_page = self._new_page(f"{self.url}/lab?reset")
                self._lab_page.wait_for_function(
                    "() => window.jupyterapp && ['docmanager:open', 'notebook:run-all-cells', 'application:close-all']"
                    ".every(c => window.jupyterapp.commands.hasCommand(c))", timeout=120_000)
            page = self._lab_page
            widget = _command(page, "docmanager:open", {"path": name})
            # A click on its tab focuses it, as a user's would: the shell's current widget
            # (which the notebook commands act on) follows focus.
            page.click(f'li.lm-TabBar-tab[data-id="{widget}"]')
        else:
            page = self._new_page(f"{self.url}/notebooks/{name}")
        # What this run sees, apart from the runs before it in the same page.
        del page.outside[:], page.errors[:], page.frontend_errors[:]
        ok = False
        try:
            page.wait_for_function("""name => { const p = window.jupyterapp && window.jupyterapp.shell.currentWidget;
                return p && p.context && p.context.path === name && p.sessionContext && p.sessionContext.session
                    && p.sessionContext.session.kernel && p.sessionContext.session.kernel.status === 'idle'; }""",
                                   arg=name, timeout=120_000)
            started = time.perf_counter()
            page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
            progress = page.wait_for_function(PROGRESS, timeout=timeout * 1000, polling=500).json_value()
            seconds = time.perf_counter() - started
            interaction = interact(page) if interact is not None and not progress["error"] else None
            kernel = page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.id")
            peak = self._kernel_peak_rss(kernel)
            _command(page, "docmanager:save")
            page.wait_for_function("() => !window.jupyterapp.shell.currentWidget.context.model.dirty",
                                   timeout=30_000)
            page.wait_for_timeout(1000)  # views draw after their output arrives
            rendered = page.evaluate(RENDERED)
            rendered["progress"] = progress
            self._screenshot(page, name if ui == "lab" else f"{Path(name).stem}-notebook7.png")
            outside, errors, frontend_errors = list(page.outside), list(page.errors), list(page.frontend_errors)
            ok = True
        finally:
            if ui == "lab" and ok:
                _command(page, "application:close-all")
                page.wait_for_function("() => !window.jupyterapp.shell.currentWidget || "
                                       "!window.jupyterapp.shell.currentWidget.sessionContext", timeout=30_000)
            else:  # a run that failed leaves its page; the next one starts on a fresh one
                page.close()
                if ui == "lab":
                    self._lab_page = None
            self._shutdown_kernels()
        notebook = nbformat.read(self.root / name, as_version=4)
        return Run(notebook, seconds, peak, rendered, outside, errors, frontend_errors, interaction)

    def _screenshot(self, page, name: str) -> None:
        """The first rich output (a view, a widget or a plot) in view, or the top of the notebook."""
        self.artifacts.mkdir(exist_ok=True)
        rich = page.locator(".jp-OutputArea-output .mechnb-view, .jp-OutputArea-output .jupyter-widgets, "
                            ".jp-OutputArea-output img")
        page.evaluate("() => window.jupyterapp.shell.collapseLeft && window.jupyterapp.shell.collapseLeft()")
        if rich.count():
            rich.first.evaluate("e => e.closest('.jp-Cell').scrollIntoView({block: 'start'})")
            page.wait_for_timeout(300)
        page.screenshot(path=str(self.artifacts / f"{Path(name).stem}.png"))

    def _kernel_peak_rss(self, kernel_id: str) -> int:
        """Peak resident memory of kernel `kernel_id` (its connection file is named after it), bytes."""
        import psutil

        for process in psutil.Process(self.server.pid).children(recursive=True):
            if "ipykernel" in " ".join(process.cmdline()) and kernel_id in " ".join(process.cmdline()):
                status = Path(f"/proc/{process.pid}/status").read_text()
                return int(status.split("VmHWM:")[1].split()[0]) * 1024
        return 0

    def _shutdown_kernels(self) -> None:
        """Shut the sessions' kernels down in the background: the next notebook need not wait
        for a kernel holding a model to exit (`close` waits for them)."""
        sessions = json.loads(urllib.request.urlopen(f"{self.url}/api/sessions", timeout=10).read())

        def shut_down(session_id):
            request = urllib.request.Request(f"{self.url}/api/sessions/{session_id}", method="DELETE")
            try:
                urllib.request.urlopen(request, timeout=60).read()
            except urllib.error.HTTPError as error:
                if error.code != 404:  # 404: the session ended already
                    raise

        for session in sessions:
            thread = threading.Thread(target=shut_down, args=(session["id"],))
            thread.start()
            self._shutting_down.append(thread)

    def close(self) -> None:
        for thread in self._shutting_down:
            thread.join(timeout=60)
        try:
            self.browser.close()
            self._playwright.stop()
        finally:
            self.server.terminate()
            try:
                self.server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.server.kill()
            self.log.close()
