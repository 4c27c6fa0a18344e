"""The core layer: the model, its vocabulary of sites, and the engines that run it.

Nothing here imports a method, a display or a magic (a test checks it). In it:
`model` (the model base and its state), `loading` and `embedded` (getting a model),
`arch` and `hookpoints` (where each site lives), `sites` (the grammar), `batch`
(prompts), `interventions` (persistent changes), `engine` (the one entry for running
the model, always clean after), `trace` (nnsight traces), `runner` (the layer-by-layer
engine of sweeps), `cache`, `metrics`, `memory` (chunks), `progress`, `devices`,
`remote` (NDIF), `checks` and `errors`.
"""
