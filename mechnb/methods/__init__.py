"""The methods layer: one module per method, each a function of the model.

`patching` (with `grid`), `attribution` and `gim`, `lens`, `heads`, `views`, `weights`,
`coactivation`, `steering`, `generation`, `causal`, `rome`. The packages `mechnb.sae`
and `mechnb.circuits` belong to this layer too. A method imports the core and the
display layers, and other methods' public names; `mechnb.Model` binds each one.
"""
