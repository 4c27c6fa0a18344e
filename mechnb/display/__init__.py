"""The display layer: what results look like in a notebook.

`results` (the `Result` every method returns), `viz` (matplotlib figures), `render`
(circuitsvis views, offline) and `widgets` (the explorer). It imports only the core.
"""
