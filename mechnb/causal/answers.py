"""What a model answers: the answer ids of a causal model's output values, and predictions.

A causal model's output is a variable with a few values (`" he"`, `" she"`); the network's
answer is read at the last position of its input. On a language model each value is text
whose first token is the answer; on an image classifier a class name; on a plain torch module
the value's index in the output variable's list is the class index its output is read at. A
prediction is the value whose answer has the largest logit (`compare="values"`), or the
model's top token if it is one of them (`"top1"`).

    >>> answers = Answers(model, cm)
    >>> answers.ids                     # [384, 1041]: " he", " she"
    >>> predictions(model, cm, ["<|endoftext|>Mary walked because"])
    [' she']
"""

from __future__ import annotations

import torch

from ..core.errors import CausalError

COMPARE = ("values", "top1")


class Answers:
    """The answer id (a token, or a class) of each value of a causal model's output variable."""

    def __init__(self, model, causal_model):
        from ..core.metrics import token_id

        values = causal_model.values[causal_model.output]
        self.values = values
        if model.is_plain:
            self.ids = list(range(len(values)))
            self.notes = []
        else:
            found = []
            for value in values:
                if model.reads_images or isinstance(value, str):
                    found.append(token_id(model, value if model.reads_images else value, "output value"))
                else:
                    raise CausalError(f"output value {value!r} of {causal_model.output!r} is not text: on a language "
                                      "model each output value is the answer's text (' she'), whose first token is read")
            self.ids = [i for i, _ in found]
            self.notes = [note for _, note in found if note]
        if len(set(self.ids)) != len(self.ids):
            raise CausalError(f"the output values {values} of {causal_model.output!r} share a first token: the model's "
                              "answer cannot tell them apart; reword them")

    def index(self, value) -> int:
        return self.values.index(value)

    def predict(self, logits: torch.Tensor, compare: str) -> torch.Tensor:
        """The index of the predicted output value per row (`rows`), -1 when the top token is
        none of them (`compare="top1"`)."""
        ids = torch.tensor(self.ids, device=logits.device)
        if compare == "values":
            return logits[:, ids].argmax(-1)
        top = logits.argmax(-1)
        match = top[:, None] == ids[None]
        return torch.where(match.any(-1), match.float().argmax(-1), torch.full_like(top, -1))


def check_compare(compare: str) -> None:
    if compare not in COMPARE:
        raise CausalError(f"unknown compare {compare!r}: use 'values' (the largest logit among the output's "
                          "answers) or 'top1' (the model's top token)")


def batch_of(model, inputs: list):
    """A `Batch` of rendered inputs: prompts, or tensors stacked (images, a plain module's inputs)."""
    from ..core.batch import Batch

    if torch.is_tensor(inputs[0]):
        stacked = torch.stack([x[0] if x.dim() > 1 and x.shape[0] == 1 and model.is_plain else x for x in inputs])
        return model.tokenizer.batch(stacked)
    return Batch.of(model.tokenizer, list(inputs))


def forward_pass(model, batch, logits: bool):
    """One forward of `batch` inside a `run` block: last-position logits (`rows vocab`; a
    classifier's or a plain module's output) when `logits`, else only the layers."""
    from ..core.arch import submodule
    from ..core.engine import last_logits

    if model.is_plain:
        out = model.hf(*batch.arguments(model.device), **batch.inputs(model.device))
        return (out[0] if isinstance(out, tuple) else out).float()
    if model.reads_images:
        return model.hf(**batch.inputs(model.device)).logits.float()
    if logits:
        return last_logits(model, batch).float()
    submodule(model.hf, model.arch.layers.rsplit(".", 1)[0])(**batch.inputs(model.device), use_cache=False)
    return None


def predictions(model, causal_model, inputs: list, compare: str = "values", batch_size=None) -> list:
    """The output value `model` predicts for each rendered input (None: none of them)."""
    from ..core.engine import run
    from ..core.memory import Chunks

    check_compare(compare)
    answers = Answers(model, causal_model)
    chunks = Chunks(batch_size, "counterfactual filtering", "inputs")
    found = []

    def predict(rows):
        batch = batch_of(model, [inputs[i] for i in rows])
        with run(model, batch.tokens):
            return answers.predict(forward_pass(model, batch, True), compare).cpu()

    for _, values in chunks.run(predict, range(len(inputs)), default=64):
        found += [answers.values[i] if i >= 0 else None for i in values.tolist()]
    return found
