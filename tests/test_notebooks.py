"""The tutorials: stored without outputs, and executed end to end on the embedded model."""

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_there_is_a_quickstart():
    assert "00_quickstart.ipynb" in [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{path.name} has outputs: clear them before committing")


def execute(path):
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    return notebook


def texts(notebook):
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            yield output.get("text", "") + output.get("data", {}).get("text/plain", "")


@pytest.mark.slow
def test_quickstart_runs_end_to_end():
    notebook = execute(NOTEBOOKS[0])
    text = "\n".join(texts(notebook))
    assert "Traceback" not in text
    assert "Paris" in text and "bound to `model`" in text
    assert "h is an ordinary tensor: Tensor (1, 14, 576)" in text


def run_tutorial(name):
    """Execute the tutorial `name`; its notebook and all its text output, checked error-free."""
    notebook = execute(NOTEBOOKS[[p.name for p in NOTEBOOKS].index(name)])
    text = "\n".join(texts(notebook))
    assert "Traceback" not in text and "Error" not in text
    return notebook, text


@pytest.mark.slow
def test_circuits_tutorial_runs_end_to_end():
    notebook, text = run_tutorial("05_circuits_gim.ipynb")
    assert "forward unchanged under GIM: True" in text
    assert "faithfulness of eap-ig edges" in text
    assert "same edges: True" in text
    shared = int(text.split("shared: ")[1].split(" of 10")[0])
    assert shared >= 5
    images = [o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 2


@pytest.mark.slow
@pytest.mark.parametrize("name, expected", [
    ("02_activation_patching_ioi.ipynb", ["patches", "Pearson correlation of attribution"]),
    ("03_induction_heads.ipynb", ["loss on the repeated half", "copying score"]),
    ("04_sae_features.ipynb", ["strongest feature", "feature ablated"]),
    ("06_steering_and_editing.ipynb", ["clean p(Paris) 0.70", "WeightEdit 'Eiffel Tower': ' Paris' -> ' Rome'",
                                        "[]  Paris"]),  # reverted: no edits, Paris again
    ("07_weights_and_concepts.ipynb", ["OV head.18.6: copying score", "of the variance in 6 of 576 components",
                                        "stability (resamples)"]),
])
def test_tutorial_runs_end_to_end(name, expected):
    _, text = run_tutorial(name)
    for phrase in expected:
        assert phrase in text
