"""The README's example is true: its cells run on the embedded model and show what they say."""

import re
from pathlib import Path

import pytest
import torch

from torchref import Reference

README = Path(__file__).parent.parent / "README.md"


def head_patched_from_clean(model, clean: str, corrupt: str, layer: int, head: int) -> float:
    """Head `layer.head` patched from the clean run into the corrupt one on a fresh transformers
    copy with a torch hook (`torchref`, no mechnb in the path): the logit difference ' Mary' -
    ' John' it restores, as a share of clean - corrupt."""
    reference = Reference(model.hf, "llama", tokenizer=model.tokenizer)
    mary, john = (model.tokenizer.encode(word, add_special_tokens=False)[0] for word in (" Mary", " John"))

    def difference(logits):
        return (logits[0, -1, mary] - logits[0, -1, john]).item()

    clean_value, corrupt_value = difference(reference.logits(clean)), difference(reference.logits(corrupt))
    patched = difference(reference.patched(clean, corrupt, f"head.{layer}.{head}"))
    return (patched - corrupt_value) / (clean_value - corrupt_value)


def example_cells() -> list[str]:
    block = re.search(r"Four notebook cells.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    return [cell.strip() for cell in block.split("\n\n")]


def test_the_example_is_four_cells_in_twenty_lines():
    cells = example_cells()
    assert len(cells) == 4 and cells[-1].startswith("%%trace")
    assert sum(len(c.splitlines()) for c in cells) <= 20


@pytest.mark.slow
def test_the_example_runs_and_shows_what_it_says(capsys):
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    try:
        for cell in example_cells():
            result = shell.run_cell(cell, store_history=False)
            assert result.success, (cell, capsys.readouterr().err)
        ns = shell.user_ns
        top = ns["model"].top("The Eiffel Tower is located in the city of", k=1)
        assert top.token[0] == " Paris"
        best = ns["heads"].df.nlargest(1, "value").iloc[0]
        # The README's figure, the model's own fact: head 23.3 restores 0.58 of the logit
        # difference. Measured independently of mechnb with a torch hook on a fresh transformers
        # copy (`head_patched_from_clean`), and that measurement agrees with the sweep's.
        assert (int(best["layer"]), int(best["head"])) == (23, 3) and abs(float(best["value"]) - 0.58) < 0.01
        independent = head_patched_from_clean(ns["model"], ns["clean"], ns["corrupt"], 23, 3)
        assert abs(independent - float(best["value"])) < 1e-4
        assert tuple(ns["cache"]["resid_pre.*@-1"].shape) == (30, 1, 576)
        assert len(ns["circ"].top("2%").df) > 0
        assert tuple(ns["h"].shape) == (1, 14, 576)
        clean = ns["model"].cache(ns["clean"], "logits")["logits"]
        assert not (ns["logits"] - clean).abs().max() < 1e-3  # the ablation changed the output
        assert ns["model"].interventions == []
    finally:
        shell.run_cell("%unload_ext mechnb", store_history=False)
