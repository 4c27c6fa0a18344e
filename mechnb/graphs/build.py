"""Building an attribution graph: nodes, targets, and edges from batched backward passes.

Nodes, in the order of the adjacency's rows and columns (circuit-tracer's order):
active transcoder features (layer, position, feature; sorted), one error node per
(layer, position) (layer-major), one token embedding per position, then the logits that
cover `logit_prob` of the next-token probability (at most `max_logits`).

Edges into the logits are computed first. Then, if more features are active than
`max_feature_nodes`, features are visited in order of their influence on the logits as
estimated from the rows computed so far (re-estimated every `update_every` features), and
those never visited are left out; otherwise every feature's row is computed. Each batch
of `batch_size` targets is one pass of `Replacement.backward`.

    >>> graph = build(model, "The Eiffel Tower is located in the city of", tcs)
"""

from __future__ import annotations

import time

import torch

from ..core.errors import GraphError
from ..core.checks import is_int
from ..core.remote import local_only
from .prune import influence_of_rows, normalised
from .replacement import Replacement, record

MAX_TOKENS = 64


@local_only
def graph(model, prompt: str, transcoders, **options):
    """The attribution graph of `prompt` over `transcoders` (a `TranscoderSet`): see `build`
    for the options. Example: `model.graph("The Eiffel Tower is located in the city of", tcs).top(20)`."""
    return build(model, prompt, transcoders, **options)


def _check_options(max_logits, logit_prob, max_feature_nodes, batch_size, max_tokens):
    for name, value in (("max_logits", max_logits), ("max_feature_nodes", max_feature_nodes),
                        ("batch_size", batch_size), ("max_tokens", max_tokens)):
        if not is_int(value) or value < 1:
            raise GraphError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(logit_prob, (int, float)) or isinstance(logit_prob, bool) or not 0 < logit_prob <= 1:
        raise GraphError(f"logit_prob is the share of probability the logit nodes cover, in (0, 1]; "
                         f"got {logit_prob!r}")


def _logit_nodes(model, rec, max_logits, logit_prob, target):
    """Token ids and probabilities of the logit nodes (the target first, if given)."""
    probs = rec.probabilities
    top = probs.topk(min(max_logits, len(probs)))
    cumulative = top.values.cumsum(0)
    count = min(int(torch.searchsorted(cumulative, torch.tensor(logit_prob))) + 1, len(top.values))
    ids = top.indices[:count].tolist()
    notes = []
    if target is not None:
        from ..core.errors import MetricError
        from ..core.metrics import token_id

        try:
            wanted, note = token_id(model, target, role="target")
        except MetricError as error:
            raise GraphError(str(error)) from None
        if note:
            notes.append(note)
        if wanted not in ids:
            rank = int((probs > probs[wanted]).sum()) + 1
            notes.append(f"the target {target!r} is not among the top logits (rank {rank}, p = "
                         f"{float(probs[wanted]):.3g}): added as a logit node")
            ids = [wanted] + ids[: max_logits - 1]
        else:
            ids.remove(wanted)
            ids = [wanted] + ids
    return ids, probs[ids].clone(), notes


def build(model, prompt: str, tcs, max_logits: int = 10, logit_prob: float = 0.95,
          max_feature_nodes: int = 4096, batch_size: int = 256, update_every: int = 1024,
          target: str | None = None, max_tokens: int = MAX_TOKENS, progress: bool = False, sink: bool = True):
    """The attribution graph of `prompt` under the transcoders `tcs` (see the module doc).

    Args:
        max_logits, logit_prob: the logit nodes: the most probable next tokens until
            their probabilities sum to `logit_prob`, at most `max_logits`.
        max_feature_nodes: feature rows computed at most (by influence when fewer than active).
        batch_size: targets per backward pass.
        target: a next token to include (and list first) among the logit nodes.
        max_tokens: the longest prompt accepted (the graph grows with its square).
        sink: put the tokenizer's special token first when the prompt lacks one and leave
            position 0 (the attention sink, whose huge activations make features that mean
            nothing) out of the features and errors, as circuit-tracer does (said in the
            graph's notes). False: every position as it is.

    Returns an `AttributionGraph`.
    """
    from ..transcoders.model import TranscoderSet
    from .graph import AttributionGraph

    started = time.perf_counter()
    if not isinstance(tcs, TranscoderSet):
        raise GraphError(f"a graph needs a TranscoderSet (mechnb.transcoders.train or load), got "
                         f"{type(tcs).__name__}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise GraphError(f"a graph is of one prompt, a non-empty string; got {prompt!r:.60}")
    _check_options(max_logits, logit_prob, max_feature_nodes, batch_size, max_tokens)
    if not is_int(update_every) or update_every < 1:
        raise GraphError(f"update_every must be a positive int, got {update_every!r}")
    tcs.check_model(model)
    # Attached transcoders change nothing until their features are edited: they may stay.
    changing = [i for i in model.interventions if i.kind != "transcoder"]
    if changing or model.edits:
        what = ", ".join(str(i.site) for i in changing[:3]) if changing else "a weight edit"
        raise GraphError(f"the model has {len(changing) or len(model.edits)} active intervention(s) or edit(s) "
                         f"({what}): a graph is of the unmodified model; remove them first (model.clear(), "
                         "model.edits), and intervene on what the graph shows after")
    input_ids, tokens, notes = _tokens(model, prompt, sink)
    n_pos = int(input_ids.shape[1])
    if n_pos > max_tokens:
        raise GraphError(f"the prompt has {n_pos} tokens, more than the graph budget of {max_tokens} "
                         "(max_tokens=...): shorten it, or raise the budget")
    timings = {}
    tick = time.perf_counter()
    dtypes = {tc: tc.W_enc.dtype for tc in tcs}
    tcs.to(device=model.device, dtype=torch.float32)
    try:
        with torch.no_grad():
            rec = record(model, input_ids, tcs.reads)
            rep = Replacement(model, rec, tcs, sink=sink)
            timings["record"] = time.perf_counter() - tick
            graph = _edges(model, rep, tcs, rec, max_logits, logit_prob, max_feature_nodes, batch_size,
                           update_every, target, timings, progress)
    finally:
        for tc, dtype in dtypes.items():
            tc.to(dtype=dtype)
    if sink and notes and "was put first" in notes[0]:  # how much the added token changes the answer
        with torch.no_grad():
            alone = torch.softmax(model.hf(input_ids=input_ids[:, 1:].to(model.device), use_cache=False).logits[0, -1]
                                  .float(), -1)
        top = graph["logit_ids"][0]
        notes[0] += (f"; p({model.tokenizer.decode([top])!r}) is {float(rec.probabilities[top]):.2f} with it, "
                     f"{float(alone[top]):.2f} without (start the prompt with another special token to choose it)")
    graph["notes"] = notes + graph["notes"]
    graph_obj = AttributionGraph(model=model, prompt=prompt, tokens=tokens, tcs=tcs, rep=rep, **graph)
    timings["total"] = time.perf_counter() - started
    graph_obj.meta["seconds"] = timings
    return graph_obj


def _tokens(model, prompt: str, sink: bool):
    """`(input_ids 1 pos, token strings, notes)` of the prompt: with `sink`, a special token first
    (the tokenizer's own if it adds one, else its BOS, pad or EOS token, as circuit-tracer picks)."""
    from ..core.batch import Batch

    batch = Batch.of(model.tokenizer, prompt)
    ids, tokens = batch.input_ids, list(batch.tokens[0])
    notes = []
    if not sink:
        return ids, tokens, notes
    tokenizer = model.tokenizer
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    if int(ids[0, 0]) not in special:
        # circuit-tracer's choice (its filter(None, ...) passes over an id of 0), then 0 itself.
        candidates = [tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id,
                      *getattr(tokenizer, "all_special_ids", [])]
        first = next((c for c in candidates if c), next((c for c in candidates if c is not None), None))
        if first is None:
            raise GraphError(f"{model.name}'s tokenizer has no special token to put first: build the graph with "
                             "sink=False (position 0 then holds the prompt's first token, and its features)")
        ids = torch.cat([torch.tensor([[first]]), ids], 1)
        tokens = [tokenizer.decode([first])] + tokens
        notes.append(f"{tokens[0]!r} was put first (the prompt lacked a special token): position 0, the "
                     "attention sink, is left out of the features and errors, as circuit-tracer does")
    else:
        notes.append(f"position 0 ({tokens[0]!r}, the attention sink) is left out of the features and errors")
    if ids.shape[1] < 2:
        raise GraphError(f"the prompt {prompt!r} is only the special token {tokens[0]!r}: a graph needs a token "
                         "after it")
    return ids, tokens, notes


def _edges(model, rep, tcs, rec, max_logits, logit_prob, max_feature_nodes, batch_size, update_every,
           target, timings, progress):
    tick = time.perf_counter()
    L, T, d = rep.n_layers, rep.n_pos, model.d_model
    # Active features, sorted by (layer, position, feature).
    layers, positions, ids, acts = [], [], [], []
    for layer in tcs.layers:
        pos, feat, act = rep.features[layer]
        order = torch.argsort(pos * tcs.width + feat)
        layers.append(torch.full((len(pos),), layer, dtype=torch.long))
        positions.append(pos[order].cpu())
        ids.append(feat[order].cpu())
        acts.append(act[order].cpu())
    f_layer = torch.cat(layers) if layers else torch.zeros(0, dtype=torch.long)
    f_pos, f_id, f_act = torch.cat(positions), torch.cat(ids), torch.cat(acts)
    n_active = len(f_layer)
    logit_ids, logit_probs, notes = _logit_nodes(model, rec, max_logits, logit_prob, target)
    n_logits = len(logit_ids)
    error_start, token_start = n_active, n_active + L * T
    logit_start = token_start + T
    n_nodes = logit_start + n_logits

    # What each feature writes, grouped by the layer it writes at (a cross-layer transcoder's
    # features write at several): per target layer, its writers' node indices sorted by position
    # and their decoder rows times activation, padded per position to the most at any position,
    # so one batched product reads every feature's edge at its own position only.
    writes = {}
    for layer in tcs.layers:
        rows = (f_layer == layer).nonzero().squeeze(-1)
        if not len(rows):
            continue
        decoders = tcs.rows(layer, f_id[rows]).to(rep.device) * f_act[rows, None, None].to(rep.device)
        for j, target in enumerate(tcs.targets(layer)):
            writes.setdefault(target, []).append((rows, decoders[:, j]))
    by_layer = {}
    for target, parts in writes.items():
        nodes = torch.cat([rows for rows, _ in parts])
        vectors = torch.cat([vectors for _, vectors in parts])
        pos = f_pos[nodes]
        order = torch.argsort(pos, stable=True)
        nodes, vectors, pos = nodes[order], vectors[order.to(vectors.device)], pos[order]
        counts = torch.bincount(pos, minlength=T)
        width = int(counts.max())
        padded = torch.zeros(T, width, d, device=rep.device)
        slot = torch.arange(len(nodes)) - torch.cumsum(counts, 0)[pos] + counts[pos]
        padded[pos, slot] = vectors
        by_layer[target] = (nodes.to(rep.device), pos.to(rep.device), slot.to(rep.device), padded)
        del vectors
    writes.clear()
    timings["decoders"] = time.perf_counter() - tick
    tick = time.perf_counter()
    errors = rep.errors
    resid0 = rec.resid0

    def run_batch(layers, positions, vectors):
        buffer = torch.zeros(len(layers), n_nodes, device=rep.device)

        def sink(kind, layer, g):
            n = g.shape[1]
            if kind == "embed":
                buffer[:, token_start:token_start + n] = torch.einsum("bpd,pd->bp", g, resid0[:n])
                return
            start = error_start + layer * T
            buffer[:, start:start + n] = torch.einsum("bpd,pd->bp", g, errors[layer, :n])
            if layer in by_layer:
                nodes, pos, slot, padded = by_layer[layer]
                count = int(torch.searchsorted(pos, n))        # features at positions < n
                if count:
                    dots = torch.bmm(g.transpose(0, 1), padded[:n].transpose(1, 2))   # pos batch slot
                    buffer.index_add_(1, nodes[:count], dots[pos[:count], :, slot[:count]].T)

        rep.backward(layers, positions, vectors, sink)
        return buffer.cpu()

    # Logit rows.
    mean_row = rep.unembed.mean(0)
    logit_vectors = rep.unembed[logit_ids] - mean_row
    logit_rows = torch.cat([
        run_batch(torch.full((len(logit_vectors[i:i + batch_size]),), L), torch.full((len(logit_vectors[i:i + batch_size]),), T - 1),
                  logit_vectors[i:i + batch_size])
        for i in range(0, n_logits, batch_size)])
    timings["logit rows"] = time.perf_counter() - tick
    tick = time.perf_counter()

    # Feature rows, all of them or in order of influence; only computed rows are kept
    # (`slots`: each visited feature's row in `feature_rows`).
    budget = min(max_feature_nodes, n_active)
    feature_rows = torch.zeros(budget, n_nodes)
    slots = torch.full((n_active,), -1, dtype=torch.long)
    weights = torch.zeros(n_nodes)
    weights[logit_start:] = logit_probs.cpu()
    encoder_columns = {layer: tcs[layer].W_enc.detach().float() for layer in tcs.layers}

    def compute(chosen):
        # Cheapest batches: sorted by layer, then position (a batch stops at its deepest layer
        # and its last position).
        chosen = chosen[torch.argsort(f_layer[chosen] * T + f_pos[chosen])]
        for i in range(0, len(chosen), batch_size):
            part = chosen[i:i + batch_size]
            vectors = torch.stack([encoder_columns[int(f_layer[j])][:, int(f_id[j])] for j in part])
            first = int((slots >= 0).sum())
            slots[part] = torch.arange(first, first + len(part))
            feature_rows[first:first + len(part)] = run_batch(f_layer[part], f_pos[part], vectors)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=budget, desc="graph: feature rows", unit="feature", delay=2)
    try:
        if budget == n_active:
            compute(torch.arange(n_active))
            if bar is not None:
                bar.update(budget)
        while int((slots >= 0).sum()) < budget:
            visited = slots >= 0
            done = visited.nonzero().squeeze(-1)
            rows = torch.cat([feature_rows[slots[done]], logit_rows])
            row_nodes = torch.cat([done, torch.arange(logit_start, n_nodes)])
            estimate = influence_of_rows(normalised(rows), row_nodes, weights)[:n_active]
            estimate[visited] = -1
            take = min(update_every, budget - int(visited.sum()))
            compute(estimate.topk(take).indices)
            if bar is not None:
                bar.update(take)
    finally:
        if bar is not None:
            bar.close()
    timings["feature rows"] = time.perf_counter() - tick

    # The square adjacency over the kept nodes: visited features, errors, tokens, logits (only
    # features and logits have inputs).
    sel = (slots >= 0).nonzero().squeeze(-1)
    kept = torch.cat([sel, torch.arange(n_active, n_nodes)])
    adjacency = torch.zeros(len(kept), len(kept))
    adjacency[:len(sel)] = feature_rows[slots[sel]][:, kept]
    adjacency[len(kept) - n_logits:] = logit_rows[:, kept]
    if budget < n_active:
        notes.append(f"{budget} of {n_active} active features kept (max_feature_nodes), chosen by their "
                     "influence on the logits")
    return dict(adjacency=adjacency, feature_layer=f_layer[sel], feature_pos=f_pos[sel], feature_id=f_id[sel],
                feature_act=f_act[sel], n_active=n_active, logit_ids=logit_ids, logit_probs=logit_probs.cpu(),
                notes=notes)
