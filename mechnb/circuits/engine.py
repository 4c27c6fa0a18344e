"""The three forwards circuit discovery needs, each one pass however many edges there are.

- `writer_outputs`: every writer's output, `upstream batch pos d_model` (heads through
  their share of the output projection), from one forward without gradients.
- `reader_gradients`: the gradient of the metric with respect to every reader's input,
  from one forward and one backward. The input of each norm that attention, the MLP and
  the unembedding read is branched off the residual stream (a clone whose only consumer
  is that norm), so its gradient counts that reader's path only. All heads of a layer
  read one branch; each head's share of its gradient is a vector-Jacobian product from
  the query, key and value that head used (captured in mechnb's attention function)
  back to the branch, batched over heads.
- `patched_logits`: a forward in which every reader's input is its input in this run
  minus `(this run's - corrupt run's)` output of each removed upstream edge. Heads of a
  layer then read different inputs for their queries, keys and values: the layer's
  attention runs once on a batch that stacks the 3 x n_heads inputs, and mechnb's
  attention function picks each head's query, key and value from its own row
  (`_Split`). Layers where no attention input changes run as usual.

All hooks are removed and all attributes reset when a forward ends, however it ends.

Gemma 2 and 3 normalise the sum of a layer's heads before adding it to the residual
stream (`post_attention_layernorm`: `A * s * (1 + w)`, `A` the heads' sum, `s = 1 / rms(A)`
per position), so no term of the residual stream is one head's alone. Each head's edge is
defined with `s` frozen at the run being scored, the linearisation attribution graphs
make (`mechnb.graphs.replacement`): head i writes `h_i * s * (1 + w)`. A score's
difference is `(h_i clean - h_i corrupt) * s_clean * (1 + w)`; in a patched run a removed
edge carries `h_i corrupt * s * (1 + w)`, `s` that run's own (the scale of the heads it
computes). The approximation: a reader sees its mix of kept heads' values and removed
heads' corrupt values through that `s`, where the norm itself would divide the mix by
the mix's own rms. The heads' writes add up to the norm's output in every run, so keeping
every edge is the clean run and keeping none the corrupt run, exactly (every head then
computes its corrupt value, and `s` is corrupt's). `Writers` keeps a run's heads before
`s`, and `s`, apart for this. The MLP's output norm (`post_feedforward_layernorm`) needs
no freeze (the MLP is one writer), nor do exact node scores (a node patch reruns the norm).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import einsum, rearrange

from ..core.arch import output_weights, submodule
from ..core.devices import parameter
from ..core.engine import last_logits, run
from ..core.errors import ModelError
from ..core.memory import return_to_system
from .graph import Graph


def _layers(model):
    return list(submodule(model.hf, model.arch.layers))


def _heads_out(model, layer_module, z: torch.Tensor) -> torch.Tensor:
    """Per-head outputs `head batch pos d_model` from `z` (`batch pos head d_head`)."""
    weights = output_weights(model, submodule(layer_module, model.arch.o_proj), z.device)
    return einsum(z.float(), weights, "batch pos head d_head, head d_head d_model -> head batch pos d_model")


def _heads_norm(model, layer_module):
    """The norm of the sum of a layer's heads (Gemma's `post_attention_layernorm`), or None
    where the heads' sum is added as it is."""
    arch = model.arch
    if arch.attn_out == arch.attn:
        return None
    norm = submodule(layer_module, arch.attn_out)
    name = type(norm).__name__
    # The freeze is that of Gemma's RMSNorm, x / rms(x) * (1 + w): any other norm would
    # be linearised wrongly without a word.
    if not (name.startswith("Gemma") and name.endswith("RMSNorm") and hasattr(norm, "eps")):
        raise ModelError(f"circuits define each head's edge through {arch.attn_out} by freezing a Gemma "
                         f"RMSNorm's scale, but this {arch.name} model's is a {name}: add its freeze to "
                         "mechnb.circuits.engine")
    return norm


def _record_writers(model, graph: Graph, forward, store, scale):
    """Hooks of the run `forward` that give each writer's output to `store(index, output)`.

    Where a norm divides the heads' sum by its rms (Gemma), heads' outputs are stored
    through its gain but before its scale, and `scale(layer, s)` receives this run's
    `s` (`batch pos`) before any reader of that layer's heads runs.
    """
    arch = model.arch
    forward.hook(arch.embed, "output", lambda value: store(0, value.float()))
    for layer, module in enumerate(_layers(model)):
        first = graph.head(layer, 0)
        norm = _heads_norm(model, module)

        def heads(z, module=module, first=first, norm=norm):
            outputs = _heads_out(model, module, z)
            if norm is not None:
                outputs = outputs * (1 + parameter(norm, "weight", outputs.device).float())
            store(slice(first, first + graph.n_heads), outputs)

        def normed(total, layer=layer, norm=norm):
            # As Gemma's RMSNorm computes it: in float32, from the heads' sum it reads.
            scale(layer, torch.rsqrt(total.float().pow(2).mean(-1) + norm.eps))

        forward.hook(submodule(module, f"{arch.attn}.hook_z"), "output", heads)
        if norm is not None:
            forward.hook(norm, "input", normed)
        forward.hook(submodule(module, arch.mlp_out), "output",
                     lambda value, index=graph.mlp(layer): store(index, value.float()))


@dataclass
class Writers:
    """Every writer's output in one run of a batch (`writer_outputs`).

    `outputs` is `upstream batch pos d_model`. Where the family normalises the heads'
    sum (Gemma), a head's row is its output times the norm's gain `(1 + w)`, before the
    norm's scale, and `scales` (`layer batch pos`) holds the run's scale `1 / rms`
    (the module docstring); elsewhere `scales` is None and every row is what its writer
    adds to the residual stream.
    """

    outputs: torch.Tensor
    scales: torch.Tensor | None


def scale_heads(graph: Graph, values: torch.Tensor, layer: int, scale: torch.Tensor) -> None:
    """Multiply one layer's head rows of `values` (`upstream batch pos d_model`) by `scale`
    (`batch pos`), in place."""
    first = graph.head(layer, 0)
    values[first:first + graph.n_heads] *= scale[None, :, :, None].to(values)


def writer_outputs(model, graph: Graph, batch) -> Writers:
    """Every writer's output in one run of `batch` (see `Writers`)."""
    rows, positions = batch.input_ids.shape
    outputs = torch.zeros(graph.n_upstream, rows, positions, model.d_model, device=model.device)
    scales = None
    if model.arch.attn_out != model.arch.attn:
        scales = torch.ones(graph.n_layers, rows, positions, device=model.device)

    def store(index, value):
        outputs[index] = value.to(outputs.device)  # layers spread by a device_map

    def scale(layer, value):
        scales[layer] = value.to(scales.device)

    with run(model, batch.tokens) as forward:
        _record_writers(model, graph, forward, store, scale)
        base = submodule(model.hf, model.arch.layers.rsplit(".", 1)[0])
        base(**batch.inputs(model.device), use_cache=False)
    return Writers(outputs, scales)


def embeddings(model, batch) -> torch.Tensor:
    """The token embeddings of a batch, `batch pos d_model`."""
    with torch.no_grad():
        return submodule(model.hf, model.arch.embed)(batch.input_ids.to(model.device))


def reader_gradients(model, graph: Graph, batch, metric, inputs_embeds: torch.Tensor, readers: torch.Tensor,
                     start: int = 0):
    """Add d metric / d each reader's input, at the given input embeddings, to `readers`
    (`downstream batch pos d_model`, its positions from `start` on); `metric(last_logits)
    -> batch` is summed over rows. Returns the metric values."""
    arch = model.arch
    attn_in, mlp_in, final_in, used = {}, {}, {}, {}

    def branch(store, key):
        def clone(value):
            store[key] = value.clone()
            return store[key]

        return clone

    with run(model, batch.tokens, grad=True) as forward:
        for layer, module in enumerate(_layers(model)):
            forward.hook(submodule(module, arch.attn_norm), "input", branch(attn_in, layer))
            forward.hook(submodule(module, arch.mlp_norm), "input", branch(mlp_in, layer))
            used[layer] = forward.attach(submodule(module, arch.attn), "mechnb_capture", [])
        forward.hook(arch.final_norm, "input", branch(final_in, 0))
        leaf = inputs_embeds.detach().to(model.dtype).requires_grad_()
        last = last_logits(model, batch, inputs_embeds=leaf,
                           attention_mask=batch.attention_mask.to(model.device))
        values = metric(last)
        targets = [t for layer in range(graph.n_layers) for t in used[layer][0]]
        targets += [mlp_in[layer] for layer in range(graph.n_layers)] + [final_in[0]]
        grads = torch.autograd.grad(values.sum(), targets, retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(targets, grads)]
        for layer in range(graph.n_layers):
            for k in range(3):
                used_value, grad = used[layer][0][k], grads[3 * layer + k]
                heads = torch.arange(graph.n_heads, device=grad.device)
                # One cotangent per head: that head's slice of the gradient, zeros elsewhere.
                cotangent = torch.zeros((graph.n_heads, *grad.shape), dtype=grad.dtype, device=grad.device)
                cotangent[heads, :, heads] = grad.transpose(0, 1)
                (per_head,) = torch.autograd.grad(used_value, attn_in[layer], cotangent,
                                                  retain_graph=True, is_grads_batched=True)
                # Gradients arrive on each layer's device (device_map); readers is on one.
                first = graph.head_input(layer, "qkv"[k], 0)
                readers[first:first + graph.n_heads] += per_head[:, :, start:].to(readers.device)
            readers[graph.mlp_input(layer)] += grads[3 * graph.n_layers + layer][:, start:].to(readers.device)
        readers[graph.logits_input] += grads[-1][:, start:].to(readers.device)
    return_to_system()  # a backward frees hundreds of small blocks: hand them back
    return values.detach()


class _Split:
    """Each head's query, key and value from its own row of a stacked batch (see module doc).

    `inverse` (`3 * head`, kind-major: q heads, k heads, v heads) gives the variant
    each head's query, key or value reads; the batch stacks `variant batch` rows, so
    inputs that happen to be equal (the corrupt residual, say) are computed once.
    """

    def __init__(self, inverse: torch.Tensor, rows: int):
        self.variants = int(inverse.max()) + 1
        self.inverse, self.rows = inverse.reshape(3, -1), rows

    def stack(self, inputs: torch.Tensor) -> torch.Tensor:
        """`variant batch pos d_model` -> `(variant*batch) pos d_model`."""
        return rearrange(inputs, "variant batch ... -> (variant batch) ...")

    def select(self, query, key, value, mask):
        heads = torch.arange(self.inverse.shape[1], device=query.device)

        def pick(t, kind):
            t = t.reshape(self.variants, self.rows, *t.shape[1:])
            return t[self.inverse[kind].to(t.device), :, heads].transpose(0, 1)  # batch head pos d_head

        if mask is not None and mask.shape[0] == self.variants * self.rows:
            mask = mask[: self.rows]
        return pick(query, 0), pick(key, 1), pick(value, 2), mask

    def expand(self, z: torch.Tensor) -> torch.Tensor:
        return z.repeat(self.variants, *([1] * (z.dim() - 1)))

    def expand_arguments(self, args, kwargs):
        """The attention module's other arguments, repeated along the stacked batch."""
        def grow(value):
            if torch.is_tensor(value) and value.dim() >= 2 and value.shape[0] == self.rows:
                return value.repeat(self.variants, *([1] * (value.dim() - 1)))
            if isinstance(value, tuple):
                return tuple(grow(v) for v in value)
            return value

        return tuple(grow(a) for a in args), {k: grow(v) for k, v in kwargs.items()}


def _project_only_needed(model, forward, layer_module, split: _Split) -> None:
    """Hooks of the run `forward` that run each projection on the stacked rows someone
    reads, and no others.

    A query projection's rows for variants only keys read are never used (they become
    zeros), and the output projection sees one copy of the heads' output (the stacked
    copies are equal). Where the family fuses q, k, v into one module, only the output
    projection is narrowed.
    """
    rows = split.rows

    def narrow(needed):
        return lambda module, args: (args[0][needed], *args[1:])

    def widen(needed):
        def hook(module, args, output):
            full = output.new_zeros((split.variants * rows, *output.shape[1:]))
            full[needed] = output
            return full

        return hook

    for kind, path in enumerate(model.arch.qkv or ()):
        variants = torch.unique(split.inverse[kind])
        needed = (variants[:, None] * rows + torch.arange(rows)).flatten()
        projection = submodule(layer_module, path)
        forward.torch_hook(projection, narrow(needed), pre=True)
        forward.torch_hook(projection, widen(needed))
    o_proj = submodule(layer_module, model.arch.o_proj)
    forward.torch_hook(o_proj, lambda module, args: (args[0][:rows], *args[1:]), pre=True)
    forward.torch_hook(o_proj, lambda module, args, output: output.repeat(split.variants,
                                                                          *([1] * (output.dim() - 1))))


def _combine(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`weights`-weighted sums of writer outputs: `upstream ...` x `upstream n` -> `n ...`."""
    return (weights.T @ values.reshape(values.shape[0], -1)).reshape(weights.shape[1], *values.shape[1:])


def patched_logits(model, graph: Graph, batch, corrupt: Writers, removed: torch.Tensor) -> torch.Tensor:
    """Last-position logits of `batch` with the `removed` edges (`upstream downstream`
    bool) carrying the corrupt run's outputs (`corrupt`, from `writer_outputs`; Gemma's
    heads at this run's frozen scale, see the module docstring)."""
    arch = model.arch
    rows = len(batch)
    difference = torch.zeros_like(corrupt.outputs)
    removed = removed.to(device=difference.device, dtype=difference.dtype)

    def store(index, value):
        difference[index] = value.to(difference.device) - corrupt.outputs[index]

    def scale(layer, value):
        # This run's own scale: the heads' differences are read only after their norm.
        scale_heads(graph, difference, layer, value)

    def minus(column):
        """The input of reader `column`: this run's minus the removed edges' differences."""
        reads = graph.reads(column)
        weights = removed[:reads, column]
        if not bool(weights.any()):
            return None
        return lambda x: x - _combine(difference[:reads], weights[:, None])[0].to(x)

    with run(model, batch.tokens) as forward:
        _record_writers(model, graph, forward, store, scale)
        for layer, module in enumerate(_layers(model)):
            columns = graph.attention_inputs(layer)
            reads = graph.reads(columns.start)
            weights = removed[:reads, columns]
            if bool(weights.any()):
                attn = submodule(module, arch.attn)
                variants, inverse = torch.unique(weights, dim=1, return_inverse=True)
                split = _Split(inverse, rows)

                def stacked(x, variants=variants, reads=reads, split=split):
                    inputs = x[None].float() - _combine(difference[:reads], variants).to(x.device)
                    return split.stack(inputs).to(x.dtype)

                def arrive(module, args, kwargs, split=split):
                    module.mechnb_split = split
                    return split.expand_arguments(args, kwargs)

                def leave(module, args, output):
                    module.__dict__.pop("mechnb_split", None)
                    if isinstance(output, tuple):
                        return (output[0][:rows], *output[1:])
                    return output[:rows]

                forward.hook(submodule(module, arch.attn_norm), "input", stacked)
                forward.attach(attn, "mechnb_split", None)  # removed with the run, however it ends
                forward.torch_hook(attn, arrive, pre=True, with_kwargs=True)
                forward.torch_hook(attn, leave)
                _project_only_needed(model, forward, module, split)
            change = minus(graph.mlp_input(layer))
            if change is not None:
                forward.hook(submodule(module, arch.mlp_norm), "input", change)
        change = minus(graph.logits_input)
        if change is not None:
            forward.hook(arch.final_norm, "input", change)
        return last_logits(model, batch).float()
