"""The explorer: a prompt, its next tokens, one head's attention, and live head ablation.

    >>> Explorer(model, "When Mary and John went to the store, John gave a drink to",
    ...          answer=" Mary", wrong=" John")

Type a prompt, pick a layer and a head to see its attention pattern, and tick heads
in the grid to ablate them (zero): every change re-runs the model and updates the
next-token table and the answer-minus-wrong logit difference. The explorer is built
only from API calls (`model.top`, `model.attention`, `model.ablated`), and its
ablations live only inside its own runs: the model is left as it was.
"""

from __future__ import annotations

import html as html_module

from ..core.checks import is_int
from ..core.errors import MechnbError, ViewError
from ..core.remote import local_only


class Explorer:
    """An ipywidgets explorer of one model (see the module docstring).

    Attributes (for code and tests): `prompt`, `answer`, `wrong` (Text), `layer`,
    `head` (Dropdown), `boxes` ((layer, head) -> Checkbox), `table` (the last
    next-token DataFrame), `logit_diff` (float or None), `pattern` (the shown
    head's `pos_q pos_k`), `error` (the last error message, or None).
    """

    def __init__(self, model, prompt: str = "When Mary and John went to the store, John gave a drink to",
                 answer: str | None = " Mary", wrong: str | None = " John", k: int = 8):
        import ipywidgets as widgets

        for name, value in (("prompt", prompt), ("answer", answer), ("wrong", wrong)):
            if not isinstance(value, str) and (name == "prompt" or value is not None):
                what = "a string" if name == "prompt" else "a string or None"
                raise ViewError(f"the explorer's {name} is {what}, got {type(value).__name__} {value!r:.40}")
        if not is_int(k) or k < 1:
            raise ViewError(f"k, the next tokens shown, must be a positive int, got {k!r}")
        self.model, self.k = model, k
        self.table = self.logit_diff = self.pattern = self.error = None
        self.prompt = widgets.Text(value=prompt, description="prompt", continuous_update=False,
                                   layout=widgets.Layout(width="100%"))
        self.answer = widgets.Text(value=answer or "", description="answer", continuous_update=False)
        self.wrong = widgets.Text(value=wrong or "", description="wrong", continuous_update=False)
        self.layer = widgets.Dropdown(options=list(range(model.n_layers)), value=model.n_layers // 2,
                                      description="layer")
        self.head = widgets.Dropdown(options=list(range(model.n_heads)), value=0, description="head")
        self.boxes = {}
        cells = [widgets.HTML("")] + [widgets.HTML(f"<b>h{h}</b>") for h in range(model.n_heads)]
        for layer in range(model.n_layers):
            cells.append(widgets.HTML(f"<b>L{layer}</b>"))
            for head in range(model.n_heads):
                box = widgets.Checkbox(value=False, indent=False, layout=widgets.Layout(width="22px"))
                self.boxes[(layer, head)] = box
                cells.append(box)
        grid = widgets.GridBox(cells, layout=widgets.Layout(
            grid_template_columns=f"40px repeat({model.n_heads}, 24px)"))
        self.status = widgets.HTML()
        self.table_view = widgets.HTML()
        self.attention_view = widgets.Output()
        controls = widgets.VBox([self.prompt, widgets.HBox([self.answer, self.wrong]), self.status,
                                 self.table_view])
        ablation = widgets.VBox([widgets.HTML("<b>ablate heads</b> (zero)"), grid])
        looking = widgets.VBox([widgets.HBox([self.layer, self.head]), self.attention_view])
        self.widget = widgets.VBox([controls, widgets.HBox([looking, ablation])])
        for control in (self.prompt, self.answer, self.wrong, *self.boxes.values()):
            control.observe(lambda change: self.update(), names="value")
        for control in (self.layer, self.head):
            control.observe(lambda change: self.show_head(), names="value")
        self.update()

    @property
    def ablated(self) -> list[str]:
        """The head sites ticked in the grid."""
        return [f"head.{l}.{h}" for (l, h), box in self.boxes.items() if box.value]

    def update(self) -> None:
        """Re-run the model on the prompt with the ticked heads ablated; refresh everything."""
        self.error = None
        try:
            with self.model.ablated(self.ablated) if self.ablated else _nothing():
                self.table = self.model.top(self.prompt.value, k=self.k)
                self.logit_diff = self._logit_diff()
        except MechnbError as error:
            self.error = str(error)
        self._render()
        self.show_head()

    def _logit_diff(self):
        if not self.answer.value or not self.wrong.value:
            return None
        from ..core.metrics import make

        result = self.model.cache(self.prompt.value, "logits")
        metric = make(self.model, "logit_diff", self.answer.value, self.wrong.value)
        return metric(result["logits@-1"].float())[0].item()

    def show_head(self) -> None:
        """Show the chosen head's attention (with the ticked heads ablated)."""
        from IPython.display import HTML, display

        try:
            with self.model.ablated(self.ablated) if self.ablated else _nothing():
                result = self.model.attention(self.prompt.value, layers=[self.layer.value],
                                              heads=[self.head.value])
        except MechnbError as error:
            self.error = str(error)
            self._render()
            return
        self.pattern = result.values[0, 0]
        self.attention_view.clear_output(wait=True)
        with self.attention_view:
            display(HTML(result.html()))

    def _render(self) -> None:
        if self.error is not None:
            self.status.value = f'<span style="color:#b00">{html_module.escape(self.error)}</span>'
            return
        status = html_module.escape(f"{len(self.ablated)} head(s) ablated")
        if self.logit_diff is not None:
            label = f" | logit diff {self.answer.value!r} - {self.wrong.value!r}: "
            status += html_module.escape(label) + f"<b>{self.logit_diff:.3f}</b>"
        self.status.value = status
        self.table_view.value = self.table.to_html(index=False, float_format=lambda x: f"{x:.4f}")

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


class _nothing:
    """A context manager that does nothing (no heads ticked)."""

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@local_only
def explore(model, prompt: str = "When Mary and John went to the store, John gave a drink to",
            answer: str | None = " Mary", wrong: str | None = " John") -> Explorer:
    """An interactive explorer widget: next tokens, attention, live head ablation (see the
    module docstring). Example: `model.explore("The Eiffel Tower is in")`."""
    return Explorer(model, prompt, answer=answer, wrong=wrong)
