"""The `Model`: the model base with every method mechnb has, and `load`.

`mechnb.load()` returns a `Model`. Its state and core verbs (sites, traces, caches,
interventions) are those of `mechnb.core.model.ModelBase`; each method below is a
function of its own module, written once there with its arguments and docstring, and
bound here as a method (`model.patch(...)` is `mechnb.methods.patching.patch(model, ...)`).

    >>> model = mechnb.load()                              # the embedded SmolLM2
    >>> model.patch(clean, corrupt, "head.*.*", " Mary", " John")
    >>> model.circuit(clean, corrupt, " Mary", " John").top("2%")

Where each method lives, by what it asks of the model:
- patching and attribution: `patch`, `path_patch` (`methods.patching`), `attribute`
  (`methods.attribution`), `gim` (`methods.gim`), `circuit` (`circuits.discover`);
- reading: `attention`, `activations` (`methods.views`), `logit_lens`, `dla`
  (`methods.lens`), `detect_heads` (`methods.heads`), `ov`, `qk`, `composition`
  (`methods.weights`), `coactivation` (`methods.coactivation`);
- changing: `steer`, `steered`, `steering_vector` (`methods.steering`), `generate`
  (`methods.generation`), `causal_trace` (`methods.causal_tracing`), `edit` (`methods.rome`);
- sparse autoencoders: `collect` (`sae.shards`: `sae.store`'s, or over ranks under torchrun),
  `features` (`sae.dashboard`);
- SAEs and transcoders spliced in, their features as sites: `attach`, `detach`
  (`transcoders.splice`, which hands SAEs to `sae.attach`);
- attribution graphs over transcoders: `graph` (`graphs.build`);
- causal abstraction: `interchange` (`causal.engine`), `das` (`causal.training`);
- the explorer widget: `explore` (`display.widgets`).
"""

from __future__ import annotations

import functools

from .causal import engine as causal_engine
from .causal import training as causal_training
from .circuits import discover
from .core import loading
from .core.model import ModelBase
from .display import widgets
from .graphs.build import graph as attribution_graph
from .methods import (attribution, causal_tracing, coactivation, generation, gim, heads, lens, patching, rome, steering,
                      views, weights)
from .sae import dashboard, shards
from .transcoders import splice as splicing


class Model(ModelBase):
    """A causal language model ready for interpretability (see `mechnb.core.model` for its
    state and core verbs, and this module for where each method lives).

    Example: `Model(LlamaForCausalLM(config), tokenizer)` wraps a model built in code.
    """

    # Patching and attribution
    patch = patching.patch
    path_patch = patching.path_patch
    attribute = attribution.attribute
    gim = gim.gim
    circuit = discover.circuit
    # Reading
    attention = views.attention
    activations = views.activations
    logit_lens = lens.logit_lens
    dla = lens.dla
    detect_heads = heads.detect_heads
    ov = weights.ov
    qk = weights.qk
    composition = weights.composition
    coactivation = coactivation.coactivation
    # Changing
    steer = steering.steer
    steered = steering.steered
    steering_vector = steering.steering_vector
    generate = generation.generate
    causal_trace = causal_tracing.causal_trace
    edit = rome.edit
    # Sparse autoencoders and transcoders
    collect = shards.collect
    attach = splicing.attach
    detach = splicing.detach
    features = dashboard.features
    # Causal abstraction
    interchange = causal_engine.interchange
    das = causal_training.das
    # Attribution graphs over transcoders
    graph = attribution_graph
    # Widgets
    explore = widgets.explore


loading.register_api_class(Model)
load = functools.update_wrapper(functools.partial(loading.load, model_class=Model), loading.load)
