"""The batched engine behind patching sweeps: many edited runs of one prompt, without waste.

A sweep asks "what is the metric if I replace this one value by that one?" for
hundreds of values. Running one forward per question repeats work that cannot
change. This engine records one forward of the target prompt (every layer's
residual input, the arguments each layer was called with, and every layer's
attention keys and values), then answers a batch of edited runs ("rows") at once:

- A row whose first edit is in layer L starts at layer L from the recorded
  residual: layers below L are exactly as in the target run, so they are skipped.
- A row whose edits all sit at positions >= p computes only positions p..n-1:
  earlier positions cannot see later ones (causal attention), so their keys and
  values come from the record (`mechnb_prefix` in `mechnb.core.hookpoints`).
- Rows are grouped by p, sorted by start layer, and join the batch as it reaches
  their layer; chunks of `batch_size` rows bound the memory, and a chunk that runs
  out of memory is halved and run again (`mechnb.core.memory`).
- Only the last position goes through the final norm and the unembedding.

Edits at `resid_pre`/`resid_post` set a row's starting residual; edits inside a
layer (heads, patterns, attention or MLP outputs, neurons, `resid_mid`) are applied
by temporary PyTorch hooks that touch only their own rows. Active persistent
interventions (`Model.ablate`, `Model.hook`) apply as in any forward.

Example:
    >>> target = TargetRun(model, "When Mary and John went to the store, Mary gave a drink to")
    >>> rows = [Row([Edit(parse("resid_pre.5"), [9], clean_value)])]
    >>> run_rows(model, target, rows).shape        # rows vocab: logits at the last position
    torch.Size([1, 49152])

Images: a vision transformer's attention is bidirectional (every position sees every
other, so a patch changes what comes before it too) and a classifier's logits are
`batch class`, without positions. A `TargetRun` of an image therefore records only its
logits, and its rows run as whole images, batched, every edit applied by a hook to its
own row; the values are the classifier's logits (`rows class`).

Gotchas: the record is of one unpadded prompt; layers are called with the keyword
arguments the model itself passed them (sliced to the computed positions), so any
family of the architecture map works without its own code.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from .arch import locate, submodule
from .engine import run, unembed
from .interventions import Context, apply
from .memory import return_to_system
from .residual import reporting
from .sites import Site, assign_part, read_part

_SEQ_KWARGS = ("attention_mask", "position_ids", "cache_position", "position_embeddings")
_DROP_KWARGS = ("cache", "layer_past", "past_key_values", "past_key_value")


@dataclass
class Edit:
    """Set `site` (concrete, positions ignored) at absolute `positions` (None: all) to `value`.

    `value` is shaped like the site's part at those positions for one prompt
    (`1 pos ...`, or broadcastable).
    """

    site: Site
    positions: list[int] | None
    value: torch.Tensor

    @property
    def start(self) -> int:
        """The first layer a row with this edit must compute (0 for a plain module's site)."""
        if self.site.kind == "embed" or self.site.path is not None:
            return 0
        if self.site.kind == "resid_post":
            return self.site.layer + 1
        return self.site.layer

    @property
    def sets_residual(self) -> bool:
        """True when the edit is to a row's starting residual rather than inside a layer."""
        return self.site.kind in ("embed", "resid_pre", "resid_post")

    @property
    def offset(self) -> int:
        return 0 if self.positions is None else min(self.positions)


@dataclass
class Row:
    """One edited run: its edits, and the prompt of the record it edits (`base`, an index
    into a `TargetRun` of several prompts; 0 for one)."""

    edits: list[Edit]
    base: int = 0

    @property
    def start(self) -> int:
        return min(edit.start for edit in self.edits)

    @property
    def offset(self) -> int:
        return min(edit.offset for edit in self.edits)


class TargetRun:
    """One recorded forward of unpadded prompts (one, or a batch whose rows' edits each name
    their prompt: `Row.base`), or of images (`whole`: rows then run whole; see the module
    docstring).

    Args:
        model: the `Model`.
        prompts: a prompt, a list of them (right-padded: a real token never sees a pad,
            so each prompt computes what it computes alone), or a `Batch`.
        start: record the layers from this one on (rows that start below it cannot run).
        sites: concrete sites whose values to keep from the same forward (`values`): a list
            (each site's whole value), or a dict of site -> a function of the whole value
            returning what to keep (a few positions of it, say).
        recorded: record only the first this many prompts (the others run only for `sites`:
            a record holds every layer's residual, keys and values of each prompt it keeps).

    Attributes: `batch`; `tokens` (the first prompt's token strings) and `token_rows` (each
    prompt's); `lengths`; `n` (the padded width: one prompt's length); `logits` (each
    recorded prompt's at its last real position, `prompts vocab`); `values` (site -> its value).
    """

    def __init__(self, model, prompts, start: int = 0, sites=(), recorded: int | None = None):
        from .batch import Batch, check_length

        self.model = model
        batch = Batch.of(model.tokenizer, prompts)
        self.batch = batch
        self.token_rows = batch.tokens  # None for a plain module's tensors
        self.tokens = batch.tokens[0] if batch.tokens else None
        self.lengths = batch.lengths
        self.n = max(self.lengths)
        self.start = start
        self.size = recorded or len(batch)
        keep_rows = self.size if self.size < len(batch) else None
        self.whole = bool(model.reads_images or model.is_plain)
        self.values: dict = {}
        if self.whole:
            with run(model, self.token_rows) as forward:
                self._keep(forward, sites)
                self.logits = _whole_logits(model, batch, range(len(batch)))
            return
        check_length(model, self.n)
        layers = submodule(model.hf, model.arch.layers)
        self.resid: list[torch.Tensor] = [None] * (model.n_layers + 1)
        self.calls: list[dict] = [None] * model.n_layers

        def record_layer(index):
            recorder = _call_recorder(layers[index], index, self.resid, self.calls, keep_rows, len(batch))

            def hook(*args):
                recorder(*args)
                return_to_system()
            return hook

        def record_final(module, args):
            self.resid[model.n_layers] = _first(args[0], keep_rows)

        def record_embed(module, args, output):
            self.embed = _first(output, keep_rows)

        records = [None] * model.n_layers
        with run(model, self.token_rows) as forward:
            for index, layer in enumerate(layers):
                if index < start:
                    continue
                # First in line, so the record is the input before any active intervention,
                # which the engine's own call of the layer then applies once.
                forward.torch_hook(layer, record_layer(index), pre=True, with_kwargs=True, prepend=True)
                records[index] = forward.attach(submodule(layer, model.arch.attn), "mechnb_record",
                                                _Kept(keep_rows))
            forward.torch_hook(submodule(model.hf, model.arch.final_norm), record_final, pre=True)
            self._keep(forward, sites)
            if start == 0:
                forward.torch_hook(submodule(model.hf, model.arch.embed), record_embed)
            base = submodule(model.hf, model.arch.layers.rsplit(".", 1)[0])
            out = base(**batch.inputs(model.device), use_cache=False)
            hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
            last = batch.last[:self.size]
            normed = hidden[torch.arange(self.size, device=hidden.device), last.to(hidden.device)][:, None]
            self.logits = _logits(model, normed, self.token_rows[:self.size], last, normed=True)
        self.kv = [record[0] if record else None for record in records]

    def _keep(self, forward, sites) -> None:
        """Keep each site's value (or what its function takes of it) from the forward about to
        run, in `values`."""
        for site in sites:
            take = sites[site] if isinstance(sites, dict) else (lambda value: value)

            def keep(value, site=site, take=take):
                self.values[site] = take(value.detach())

            forward.hook_site(site, keep)

    @property
    def several(self) -> bool:
        """True when the record holds several prompts (rows then pick theirs: `Row.base`)."""
        return self.size > 1

    def call(self, layer: int, offset: int, bases=None, end: int | None = None) -> tuple[str, dict]:
        """The name of the residual argument and the other arguments, for positions offset..end-1
        (and, for several prompts, the rows of `bases`)."""
        name, arguments = _arguments(self.calls[layer], offset, end)
        if bases is not None and self.several:
            arguments = {key: _rows(value, bases, self.size) for key, value in arguments.items()}
        return name, arguments


def _rows(value, bases: torch.Tensor, size: int):
    """A recorded argument's rows `bases` where its first axis is the record's batch."""
    if isinstance(value, tuple):
        return tuple(_rows(v, bases, size) for v in value)
    if torch.is_tensor(value) and value.dim() >= 2 and value.shape[0] == size:
        return value[bases.to(value.device)]
    return value


def _logits(model, hidden, token_rows, last, normed: bool = False, ids=None) -> torch.Tensor:
    """Logits `rows vocab` of the residual `hidden` (`rows 1 d_model`) at each row's position
    `last`, through the final norm (unless `normed`) and unembedding, with the active
    interventions on the logits; with `ids`, only those tokens' logits (`rows ids`)."""
    from .engine import unembed_normed

    if ids is not None and not any(i.site.kind == "logits" for i in model.interventions):
        if not normed:
            hidden = submodule(model.hf, model.arch.final_norm)(hidden)
        return _some_logits(model, hidden[:, -1], ids).float()
    logits = unembed_normed(model, hidden) if normed else unembed(model, hidden)
    for intervention in model.interventions:
        if intervention.site.kind == "logits":
            logits = apply(intervention, logits, Context(token_rows, [int(p) for p in last]))
    logits = logits[:, -1].float()
    return logits if ids is None else logits[:, torch.as_tensor(ids, device=logits.device)]


def _some_logits(model, normed: torch.Tensor, ids) -> torch.Tensor:
    """The unembedding's logits of tokens `ids` only (`rows ids`), soft-capped as the model's are:
    a row of a vocabulary of 49,152 costs as much as a layer, and a comparison needs two."""
    head = submodule(model.hf, model.arch.unembed)
    index = torch.as_tensor(ids, device=head.weight.device)
    logits = normed.to(head.weight.dtype) @ head.weight[index].T
    if getattr(head, "bias", None) is not None:
        logits = logits + head.bias[index]
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def _whole_logits(model, batch, rows) -> torch.Tensor:
    """The whole forward's logits of `batch`'s prompts at `rows` (an image classifier's
    `rows class`; a plain module's output, its leading axis the rows)."""
    if model.is_plain:
        picked = batch.select(list(rows))
        out = model.hf(*picked.arguments(model.device), **picked.inputs(model.device))
        out = out[0] if isinstance(out, tuple) else out
        return out.float()
    inputs = {key: value[torch.as_tensor(list(rows), device=value.device)] for key, value in
              batch.inputs(model.device).items()}
    return model.hf(**inputs).logits.float()


def _call_recorder(layer, index: int, resid, calls, rows: int | None = None, size: int | None = None):
    """A pre-hook (with kwargs) storing the residual input of decoder layer `layer` in
    `resid[index]` (unless `resid` is None) and `(its argument name, the other
    arguments)` in `calls[index]`; with `rows`, only the first `rows` of a batch of `size`."""
    signature = inspect.signature(type(layer).forward)

    def hook(module, args, kwargs):
        bound = signature.bind(module, *args, **kwargs).arguments
        bound.pop("self", None)
        name = next(iter(bound))
        value = bound.pop(name)
        if resid is not None:
            resid[index] = _first(value, rows)
        if rows is not None:
            bound = {key: _rows(v, torch.arange(rows), size) for key, v in bound.items()}
        calls[index] = (name, bound)

    return hook


def _first(value: torch.Tensor, rows: int | None) -> torch.Tensor:
    """The first `rows` of a batch, copied (so that the rest can be freed), or all of it."""
    return value if rows is None else value[:rows].clone()


class _Kept(list):
    """The keys and values a record keeps (`mechnb_record`): the first `rows` of each call's batch."""

    def __init__(self, rows: int | None):
        super().__init__()
        self.rows = rows

    def append(self, pair) -> None:
        super().append(tuple(_first(value, self.rows) for value in pair))


def _arguments(call: tuple[str, dict], offset: int, end: int | None = None) -> tuple[str, dict]:
    """A recorded call's arguments for a forward computing positions offset..end-1 (end None:
    to the last), without a cache."""
    name, arguments = call
    sliced = {}
    for key, value in arguments.items():
        if key in _DROP_KWARGS:
            value = None
        elif key == "use_cache":
            value = False
        elif key in _SEQ_KWARGS and value is not None and (offset or end is not None):
            value = _slice_positions(key, value, offset, end)
        sliced[key] = value
    return name, sliced


class LayerCalls:
    """The decoder layers' inputs in one forward of a batch, from layer `start` on, to run the
    rest of the model again from there (`resume`) on the same tokens: the layers below
    `start` are not recomputed. Made inside `run(...) as forward`, before the forward.

        >>> with run(model, tokens) as forward:
        ...     calls = LayerCalls(model, forward, 12)
        ...     model.hf.model(input_ids=ids, use_cache=False)
        >>> with model.hooked("mlp_out.12", torch.zeros_like), run(model, tokens):
        ...     hidden = calls.resume()         # the final norm's input, 12's MLP zeroed
    """

    def __init__(self, model, forward, start: int):
        self.model, self.start = model, start
        layers = submodule(model.hf, model.arch.layers)
        self.resid: dict[int, torch.Tensor] = {}
        self.calls: dict[int, tuple] = {}
        for index in range(start, model.n_layers):
            # First in line: the record is the input before any active intervention,
            # which calling the layer again applies once. Only the first layer's residual
            # is kept (the others' would hold a batch's activations per layer).
            resid = self.resid if index == start else None
            forward.torch_hook(layers[index], _call_recorder(layers[index], index, resid, self.calls),
                               pre=True, with_kwargs=True, prepend=True)

    def resume(self) -> torch.Tensor:
        """Layers `start..` again from the recorded residual; their output (the final norm's input)."""
        layers = submodule(self.model.hf, self.model.arch.layers)
        hidden = self.resid[self.start]
        for index in range(self.start, self.model.n_layers):
            _, arguments = _arguments(self.calls[index], 0)
            out = layers[index](hidden, **arguments)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden


def _slice_positions(key: str, value, offset: int, end: int | None = None):
    if key == "position_embeddings":
        return tuple(v[..., offset:end, :] for v in value)
    if key == "attention_mask":
        # Query rows offset..end; the key columns stay (the attention function cuts them to the keys).
        return value[..., offset:end, :]
    return value[..., offset:end]


def run_rows(model, target: TargetRun, rows: list[Row], batch_size=None,
             progress=None, record: list[Site] = (), metric=None, ids=None) -> torch.Tensor:
    """Logits at the last position, `rows vocab`, of each edited run (see module doc); for
    an image, the classifier's logits, `rows class`.

    `batch_size` is the rows per forward (default from a 256 MiB budget), or a
    `mechnb.core.memory.Chunks` shared by the calls of one sweep; a chunk that runs out
    of memory is halved and run again. With `metric` (logits `batch vocab` ->
    `batch ...`), its values per row instead, computed chunk by chunk so that the logits
    of all rows are never held at once. Values move to CPU chunk by chunk. On a record of
    several prompts each row runs on its own (`Row.base`). With `ids` (token ids), a language
    model's rows give only those tokens' logits (`rows ids`), the rest never computed.
    `progress`, if given, is a tqdm bar updated by the number of rows done.
    `record` names concrete sites whose whole values each row should report: they
    are stored, after the row's edits, in `row.recorded` (site name -> `1 pos ...`,
    positions from the row's offset on).

    Under torchrun (`mechnb.core.distributed`), the chunks of a sweep are dealt to the ranks in
    turn and the values summed back (each row is computed by one rank, in the chunk it would
    have had alone, so the result is the one process's exactly), on every rank; sweeps that
    `record` values run every row on every rank.
    """
    from . import distributed
    from .memory import Chunks

    world = distributed.current()
    dealt = world.several and not record
    out = None
    # Rows of one group compute the same positions: from their first edited one to the end of
    # their prompt (rows of a padded record's shorter prompts stop at their own end).
    groups: dict[tuple[int, int], list[int]] = {}
    for index, row in enumerate(rows):
        groups.setdefault((row.offset, target.lengths[row.base] if target.several else target.n), []).append(index)
    chunks = batch_size if isinstance(batch_size, Chunks) else Chunks(batch_size, "a patching sweep", "rows")
    default = 256 if model.is_plain else default_batch_size(model, target.n)
    dealt_chunks = 0
    for (offset, _), members in sorted(groups.items()):
        members.sort(key=lambda i: rows[i].start)
        if dealt:
            # This rank's chunks of the group, as one process would cut them; cut again by the
            # same size they are the same chunks.
            size = min(chunks.size or default, chunks.limit or len(members) or 1)
            cut = [members[i:i + size] for i in range(0, len(members), size)]
            mine = [chunk for number, chunk in enumerate(cut, dealt_chunks) if world.owns(number)]
            dealt_chunks += len(cut)
            if progress is not None:
                progress.update(len(members) - sum(map(len, mine)))
            members = [index for chunk in mine for index in chunk]
            if not members:
                continue

        def values_of(chunk, offset=offset):
            if target.whole:
                logits = _run_whole(model, target, [rows[i] for i in chunk], offset, record)
            else:
                logits = _run_chunk(model, target, [rows[i] for i in chunk], offset, record, ids=ids)
            return metric(logits).cpu() if metric is not None else logits.cpu()

        for chunk, values in chunks.run(values_of, members, default=default):
            if out is None:
                out = values.new_zeros((len(rows), *values.shape[1:]))
            out[chunk] = values
            if progress is not None:
                progress.update(len(chunk))
    if dealt:
        out = _summed(world, out, len(rows))
    return out if out is not None else torch.empty(0)


def _summed(world, out, n: int) -> torch.Tensor:
    """Every rank's rows (zeros elsewhere) summed into the whole sweep's values, on every rank."""
    has = world.gather(torch.tensor([out is not None], dtype=torch.int32)).tolist()
    if not any(has):
        return out
    source = has.index(1)
    described = world.broadcast_object([list(out.shape[1:]), str(out.dtype).removeprefix("torch.")]
                                       if out is not None else None, source)
    if out is None:
        out = torch.zeros((n, *described[0]), dtype=getattr(torch, described[1]))
    return world.sum_(out)


def default_batch_size(model, n_pos: int, budget_bytes: float = 256 * 2**20) -> int:
    """Rows per chunk so that one layer's activations stay within `budget_bytes`."""
    per_row = n_pos * (3 * model.d_mlp + 4 * model.d_model + model.n_heads * n_pos) * 4
    return max(1, min(512, int(budget_bytes // max(per_row, 1))))


def _run_chunk(model, target: TargetRun, rows: list[Row], offset: int, record=(), grad: bool = False, ids=None):
    """Run rows sorted by start layer, all computing positions offset..n-1; each row's logits
    at its prompt's last position, `rows vocab` (`rows ids` with `ids`; with autograd through
    edit values when `grad`)."""
    layers = submodule(model.hf, model.arch.layers)
    inner: dict[tuple[str, str], list] = {}
    for index, row in enumerate(rows):
        for edit in row.edits:
            if not edit.sets_residual:
                path, io, _ = locate(model, edit.site)
                inner.setdefault((path, io), []).append((index, edit))
    bases = torch.tensor([row.base for row in rows])
    token_rows = [target.token_rows[row.base] for row in rows]
    # Positions past the longest of these rows' prompts are padding: not computed.
    end = max(target.lengths[row.base] for row in rows) if target.several else None
    with run(model, token_rows, offset, grad=grad) as forward:
        for (path, io), entries in inner.items():
            forward.hook(path, io, reporting(model, entries[0][1].site, _edit(entries, offset)))
        for site in record:
            path, io, _ = locate(model, site)
            forward.hook(path, io, _record(site, rows))
        hidden = None
        starts = [row.start for row in rows]
        for layer_index in range(starts[0], model.n_layers + 1):
            joining = [row for row, first in zip(rows, starts) if first == layer_index]
            if joining:
                start = _starts(target, joining, layer_index, offset, end)
                hidden = start if hidden is None else torch.cat([hidden, start])
            if layer_index < model.n_layers:
                hidden = _run_layer(model, forward, target, layers[layer_index], layer_index, hidden, offset,
                                    bases[:hidden.shape[0]], end)
        last = torch.tensor([target.lengths[row.base] - 1 for row in rows])
        at = hidden[torch.arange(len(rows), device=hidden.device), (last - offset).to(hidden.device)]
        return _logits(model, at[:, None], token_rows, last, ids=ids)


def _run_whole(model, target: TargetRun, rows: list[Row], offset: int, record=(), grad: bool = False):
    """Rows as whole forwards of their images or inputs, batched; each edit by a hook on its own row."""
    inner: dict[tuple[str, str], list] = {}
    for index, row in enumerate(rows):
        for edit in row.edits:
            inner.setdefault(locate(model, edit.site)[:2], []).append((index, edit))
    token_rows = None if target.token_rows is None else [target.token_rows[row.base] for row in rows]
    with run(model, token_rows, grad=grad) as forward:
        for (path, io), entries in inner.items():
            forward.hook(path, io, reporting(model, entries[0][1].site, _edit(entries, 0)))
        for site in record:
            path, io, _ = locate(model, site)
            forward.hook(path, io, _record(site, rows))
        return _whole_logits(model, target.batch, [row.base for row in rows])


def _starts(target: TargetRun, rows: list[Row], layer: int, offset: int, end: int | None = None) -> torch.Tensor:
    """The rows' residuals entering `layer` (`rows pos d_model`, positions offset..end-1), with
    their residual edits applied: gathered from the record at once, edits of given positions
    written with one indexed assignment (others, row by row)."""
    resid = target.resid[layer]
    bases = torch.tensor([row.base for row in rows], device=resid.device)
    start = resid[bases, offset:end].clone()
    width = start.shape[-1]
    at_rows, at_positions, values = [], [], []
    for number, row in enumerate(rows):
        for edit in row.edits:
            if not edit.sets_residual or edit.start != layer:
                continue
            if edit.site.kind == "embed" or edit.positions is None:
                _edit_residual(target, start[number:number + 1], edit, row.base, layer, offset, end)
                continue
            count = len(edit.positions)
            at_rows += [number] * count
            at_positions += [p - offset for p in edit.positions]
            values.append(torch.broadcast_to(torch.as_tensor(edit.value), (1, count, width))[0])
    if values:
        start[torch.tensor(at_rows, device=start.device), torch.tensor(at_positions, device=start.device)] = \
            torch.cat(values).to(start)
    return start


def _edit_residual(target, start: torch.Tensor, edit: Edit, base: int, layer: int, offset: int, end) -> None:
    """Apply a residual edit to one row's starting residual (`1 pos d_model`), in place."""
    positions = _relative(edit.positions, offset)
    if edit.site.kind == "embed":
        # resid_pre.0 is the embedding plus terms that do not depend on it
        # (GPT-2's position embeddings): move it by the embedding's change.
        embed = target.embed[base:base + 1, offset:end].clone()
        assign_part(embed, Site("embed"), edit.value, positions)
        start += embed - target.embed[base:base + 1, offset:end]
    else:
        assign_part(start, Site("resid_pre", layer), edit.value, positions)


def _relative(positions: list[int] | None, offset: int):
    """Absolute positions as a `1 n` index into a forward that starts at `offset`."""
    return None if positions is None else torch.tensor([[p - offset for p in positions]])


def _run_layer(model, forward, target, layer, index, hidden, offset, bases, end=None):
    """One decoder layer on `hidden` (`rows pos d_model`, the rows of prompts `bases`, positions
    offset..end-1), reusing the record's earlier keys."""
    attn = submodule(layer, model.arch.attn)
    _, arguments = target.call(index, offset, bases, end)
    if offset:
        keys, values = target.kv[index]
        if target.several:
            picked = bases.to(keys.device)
            keys, values = keys[picked], values[picked]
        else:
            rows = hidden.shape[0]
            keys, values = keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1)
        forward.attach(attn, "mechnb_prefix", (keys[:, :, :offset], values[:, :, :offset]))
    out = layer(hidden, **arguments)
    return out[0] if isinstance(out, tuple) else out


def _record(site: Site, rows: list[Row]):
    """A hook function storing each active row's value of `site` in `row.recorded`."""

    def keep(value):
        for index, row in enumerate(rows[: value.shape[0]]):
            part = read_part(value[index:index + 1], site, None)
            row.__dict__.setdefault("recorded", {})[site.name] = part.clone()

    return keep


def _edit(entries: list, offset: int):
    """A hook function that applies each row's edit at one module to that row only."""

    def edit(value):
        value = value.clone()
        for row, entry in entries:
            if row < value.shape[0]:  # a row joins the batch at its start layer
                assign_part(value[row:row + 1], entry.site, entry.value,
                            _relative(entry.positions, offset))
        return value

    return edit
