"""ROME (Meng et al. 2022): rewrite one fact with a rank-one change to one MLP's weights.

An MLP's output projection acts as a key-value memory: the key is its input at the
subject's last token (`neuron.L`), the value what it writes into the residual stream.
ROME finds

- the key `k*`: the MLP input at the subject's last token, averaged over the prompt
  and the prompt behind a few short texts the model writes itself (so the key is the
  subject's, not one sentence's);
- the value `v*`: the MLP output that makes the target follow the prompt, found by
  gradient descent on a vector added at that token, with a KL term that keeps what the
  model says about "{subject} is a" and a penalty on the vector's norm;
- the update `W += (v* - W k*) (C^-1 k*)^T / (k*^T C^-1 k*)`, where `C` is the second
  moment of keys over ordinary text (Python's own documentation here, packed into
  128-token windows, cached per model and layer on disk): the change is largest for
  this key and small for keys unlike it, so other facts stay.

    >>> e = model.edit("The Eiffel Tower is located in the city of", subject="Eiffel Tower",
    ...                target=" Rome")
    >>> e.report()          # efficacy, paraphrases, neighbourhood, generations before/after
    >>> e.revert()          # the weights exactly as before

The default layer is the peak of the MLP causal trace at the subject's last token.
Several edits stack; reverting them in any order leaves the weights of the remaining
ones, and reverting all restores the original weights bit for bit.
"""

from __future__ import annotations

import time

import torch

from ..core.arch import submodule
from ..core.batch import Batch
from ..core.checks import is_int
from ..core.devices import is_offloaded
from ..core.engine import last_logits, run
from ..core.errors import EditError
from ..core.model import language_only
from ..core.remote import local_only
from .causal_tracing import subject_positions

PREFIX_SEEDS = ("The", "Therefore", "Because", "I", "You")
SETTINGS = ("steps", "lr", "kl_factor", "weight_decay", "clamp", "cov_tokens")
NEIGHBOUR_SUBJECTS = ("the Colosseum", "Big Ben", "the Statue of Liberty", "the Brandenburg Gate",
                      "the Sydney Opera House", "the Golden Gate Bridge", "the Kremlin")


class WeightEdit:
    """One applied ROME edit: what it changed, how it scored, and how to undo it."""

    def __init__(self, model, layer: int, module, delta: torch.Tensor, checks: dict, meta: dict):
        self.model, self.layer, self.module, self.delta = model, layer, module, delta
        self.checks, self.meta = checks, meta
        self.active = True

    def __repr__(self) -> str:
        state = "active" if self.active else "reverted"
        return (f"<mechnb.WeightEdit {self.meta['subject']!r}: {self.meta['answer']!r} -> "
                f"{self.meta['target']!r} at layer {self.layer}, {state}>")

    def revert(self) -> None:
        """Remove this edit; the other active edits stay (see the module docstring)."""
        if not self.active:
            raise EditError("this edit has already been reverted")
        self.active = False
        self.model.weight_edits.revert(self)

    def report(self):
        """Efficacy, paraphrases, neighbourhood and generations, before and after.

        Returns a `Result` whose `.df` has one row per check (`check`, `prompt`,
        `before`, `after`, `ok`) and whose `.meta` holds the summary: `efficacy`
        (target probability before and after), `paraphrase_success` (paraphrases
        where the target is now more likely than the old answer), `neighbourhood_kept`
        (neighbour prompts whose top answer did not change) and `generations`.
        """
        from ..display.results import Result

        if not self.active:
            raise EditError("this edit has been reverted: its report describes an active edit")
        after = _measure(self.model, self.meta, generations=True)
        return _report(self.checks, after, self.meta, Result)


DEFAULTS = dict(steps=25, lr=0.5, kl_factor=0.0625, weight_decay=0.5, clamp=4.0, cov_tokens=20_000)


@local_only
@language_only
def edit(model, prompt: str, subject: str, target: str, layer: int | None = None, method: str = "rome",
         paraphrases=None, neighbours=None, **settings) -> WeightEdit:
    """Rewrite a fact with ROME: a rank-one update of one MLP's output projection.

    Args:
        prompt: the fact's prompt (`"The Eiffel Tower is located in the city of"`).
        subject: the subject, a substring of the prompt (`"Eiffel Tower"`).
        target: the new answer (`" Rome"`; several tokens are fine).
        layer: the MLP to edit (default: the MLP causal trace's peak at the subject).
        method: `rome`.
        paraphrases, neighbours: prompts for the report (defaults: the prompt behind
            short prefixes; the prompt with other landmarks as subject).
        settings: the optimisation's `steps` (25), `lr` (0.5), `kl_factor` (0.0625),
            `weight_decay` (0.5), `clamp` (4.0) and `cov_tokens` (20,000: tokens behind
            the key statistics).

    Returns:
        A `WeightEdit` (active): `.report()`, `.revert()`. Example:
        `model.edit(prompt, subject="Eiffel Tower", target=" Rome").report()`.
    """
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise EditError(f"unknown edit settings {', '.join(unknown)}: the settings are {', '.join(SETTINGS)}")
    settings = {**DEFAULTS, **settings}
    steps, lr, kl_factor = settings["steps"], settings["lr"], settings["kl_factor"]
    weight_decay, clamp, cov_tokens = settings["weight_decay"], settings["clamp"], settings["cov_tokens"]
    start_time = time.perf_counter()
    if method != "rome":
        raise EditError(f"unknown edit method {method!r}: mechnb implements 'rome'")
    for name, value in dict(steps=steps, cov_tokens=cov_tokens, lr=lr, kl_factor=kl_factor,
                            weight_decay=weight_decay, clamp=clamp).items():
        whole = name in ("steps", "cov_tokens")
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)) \
                or not 0 <= value < float("inf") or (whole and value < 1):
            raise EditError(f"{name} must be a {'positive integer' if whole else 'finite number >= 0'}, "
                            f"got {value!r}")
    if not isinstance(prompt, str) or not prompt:
        raise EditError("edit needs a non-empty prompt")
    if not isinstance(target, str) or not target.strip():
        raise EditError("edit needs a non-empty target string, e.g. target=' Rome'")
    subject_at = subject_positions(model, prompt, subject)
    if layer is None:
        trace = model.causal_trace(prompt, subject, kind="mlp", samples=3, positions=[subject_at[-1]])
        layer = int(trace.values[:, 0].argmax())
    if not is_int(layer) or not 0 <= layer < model.n_layers:
        raise EditError(f"layer {layer!r} out of range: this model has layers 0-{model.n_layers - 1}")
    down = submodule(submodule(model.hf, model.arch.layers)[layer], model.arch.mlp_down)
    if is_offloaded(down):
        # accelerate loads an offloaded weight afresh for every forward: an edit would be lost.
        raise EditError(f"layer {layer}'s MLP is offloaded by the device_map (its weights live on the "
                        f"CPU or disk between forwards), so an edit would not stay: load with a "
                        f"device_map that keeps model layer {layer} on a device, or edit another layer")
    target_ids = model.tokenizer.encode(target, add_special_tokens=False)
    answer_id = int(model.top(prompt, k=1).token_id[0])
    paraphrases = list(paraphrases) if paraphrases is not None else _default_paraphrases(prompt)
    neighbours = list(neighbours) if neighbours is not None else _default_neighbours(prompt, subject)
    meta = {"prompt": prompt, "subject": subject, "target": target, "target_ids": target_ids,
            "target_id": target_ids[0], "answer_id": answer_id,
            "answer": model.tokenizer.decode([answer_id]), "layer": layer, "paraphrases": paraphrases,
            "neighbours": neighbours}
    before = _measure(model, meta, generations=True)

    contexts = [""] + [f"{text}. " for text in _prefixes(model)]
    key = _key(model, layer, contexts, prompt, subject)
    value = _value(model, layer, contexts, prompt, subject, target_ids, steps, lr, kl_factor, weight_decay, clamp)
    inverse = _inverse_second_moment(model, layer, cov_tokens)
    with torch.no_grad():
        current = down(key[None].to(down.weight.dtype))[0].float()
    # All on the MLP's own device: with a device_map, layers and caches live on several.
    key, value, inverse = key.to(current.device), value.to(current.device), inverse.to(current.device)
    left = inverse @ key
    right = (value - current) / (left @ key)
    update = torch.outer(right, left)  # d_model d_mlp: as a Linear weight (out, in)
    if type(down).__name__ == "Conv1D":
        update = update.T  # GPT-2 stores (in, out)
    update = update.to(down.weight.dtype)
    made = WeightEdit(model, layer, down, update, before, {**meta, "seconds": None})
    model.weight_edits.apply(made)
    made.meta["seconds"] = round(time.perf_counter() - start_time, 3)
    return made


def _prefixes(model) -> list[str]:
    """Short texts the model writes itself from a few seed words (seeded, reproducible)."""
    texts = model.generate(list(PREFIX_SEEDS), max_new_tokens=8, do_sample=True, seed=0, top_p=0.95)
    return [seed + text.replace("\n", " ").strip(" .").rstrip() for seed, text in
            zip(PREFIX_SEEDS, texts.df.continuation)]


def _key(model, layer: int, contexts, prompt: str, subject: str) -> torch.Tensor:
    """The MLP input at the subject's last token, averaged over the contexts: `d_mlp`."""

    texts = [context + prompt for context in contexts]
    cache = model.cache(texts, f"neuron.{layer}")
    values = cache[f"neuron.{layer}"].float()
    keys = [values[i, subject_positions(model, text, subject)[-1]] for i, text in enumerate(texts)]
    return torch.stack(keys).mean(0)


def _value(model, layer, contexts, prompt, subject, target_ids, steps, lr, kl_factor, weight_decay,
           clamp) -> torch.Tensor:
    """The MLP output at the subject's last token that makes the target follow (`d_model`)."""

    tokenizer = model.tokenizer
    rows, where, answers = [], [], []
    for context in contexts:
        text = context + prompt
        ids = tokenizer(text)["input_ids"]
        rows.append(ids + target_ids[:-1])
        where.append(subject_positions(model, text, subject)[-1])
        answers.append((len(ids) - 1, target_ids))
    essence = f"{subject} is a"
    essence_ids = tokenizer(essence)["input_ids"]
    rows.append(essence_ids)
    where.append(subject_positions(model, essence, subject)[-1])
    batch = Batch.of_ids(tokenizer, rows)
    module = submodule(submodule(model.hf, model.arch.layers)[layer], model.arch.mlp_out)
    delta = torch.zeros(model.d_model, requires_grad=True)
    index = torch.arange(len(rows))
    position = torch.tensor(where)
    captured = {}

    def add(value):
        captured["value"] = value[index, position].detach()
        edited = value.clone()
        edited[index, position] = edited[index, position] + delta.to(value)
        return edited

    optimiser = torch.optim.Adam([delta], lr=lr)
    with run(model, batch.tokens) as forward:
        forward.hook(module, "output", add)
        reference = torch.log_softmax(model.hf(**batch.inputs(model.device), use_cache=False)
                                      .logits[-1, len(essence_ids) - 1].float(), -1)
    start = captured["value"][0].float()
    for _ in range(steps):
        # Only `delta` needs a gradient: with the weights frozen (grad=True), the layers below
        # the edit record nothing for autograd, and the layers above keep only what it needs.
        with run(model, batch.tokens, grad=True) as forward:
            forward.hook(module, "output", add)
            logits = model.hf(**batch.inputs(model.device), use_cache=False).logits.float()
            logprobs = torch.log_softmax(logits, -1)
            nll = torch.stack([-logprobs[i, last + torch.arange(len(ids)), torch.tensor(ids)].mean()
                               for i, (last, ids) in enumerate(answers)]).mean()
            essence_logprobs = logprobs[-1, len(essence_ids) - 1]
            kl = (reference.exp() * (reference - essence_logprobs)).sum()
            loss = nll + kl_factor * kl + weight_decay * delta.norm() ** 2 / start.norm() ** 2
            (grad,) = torch.autograd.grad(loss, [delta])
        delta.grad = grad
        optimiser.step()
        with torch.no_grad():
            limit = clamp * start.norm()
            if delta.norm() > limit:
                delta.mul_(limit / delta.norm())
        if nll.item() < 0.05:
            break
    return (start + delta.detach().to(start.device)).float()


def _inverse_second_moment(model, layer: int, n_tokens: int) -> torch.Tensor:
    """`C^-1` for keys of `layer` over Python's documentation, cached on disk.

    The keys are collected as `Model.collect` collects a site: documents packed into
    full 128-token windows (no padding to compute: batches of whole documents cut at
    600 characters were 44 % padding), each window's first position (the attention
    sink) left out. They come `_KEYS_AT_ONCE` rows at a time (each piece starts at a
    document); the products are summed in float64.
    """
    from safetensors.torch import load_file, save_file

    from ..datasets import python_docs
    from ..core.embedded import cache_root

    name = "".join(c if c.isalnum() else "-" for c in model.name)
    path = cache_root() / "rome" / f"{name}-layer{layer}-{n_tokens}-packed.safetensors"
    if path.exists():
        moment = load_file(str(path))["moment"]
    else:
        from ..sae.store import collect

        moment = torch.zeros(model.d_mlp, model.d_mlp, dtype=torch.float64)
        documents, count = iter(python_docs("train")), 0
        while count < n_tokens:
            keys = collect(model, f"neuron.{layer}", documents, n_tokens=min(_KEYS_AT_ONCE, n_tokens - count),
                           batch_size=16, progress=False).data
            if not len(keys):
                break
            moment += (keys.T @ keys).double().cpu()
            count += len(keys)
        moment = (moment / count).float()
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        save_file({"moment": moment}, str(partial))
        partial.replace(path)
    ridge = 1e-4 * moment.diagonal().mean()
    return torch.linalg.inv(moment.double() + ridge * torch.eye(len(moment), dtype=torch.float64)).float()


# Rows of keys collected at once: two batches of 16 full windows (127 rows each), 12 MB
# for a d_mlp of 1,536.
_KEYS_AT_ONCE = 2 * 16 * 127


def _default_paraphrases(prompt: str) -> list[str]:
    lowered = prompt[0].lower() + prompt[1:]
    return [f"Here is a fact. {prompt}", f"In short, {lowered}", f"Did you know? {prompt}"]


def _default_neighbours(prompt: str, subject: str) -> list[str]:
    found = [prompt.replace(subject, other) for other in NEIGHBOUR_SUBJECTS if other.lower() != subject.lower()]
    return [text[0].upper() + text[1:] for text in found[:5]]


def _measure(model, meta: dict, generations: bool) -> dict:
    """Probabilities and top answers on the prompt, paraphrases and neighbours."""
    out = {"prompt": _probs(model, meta["prompt"], meta)}
    out["paraphrases"] = [_probs(model, p, meta) for p in meta["paraphrases"]]
    out["neighbours"] = [_probs(model, p, meta) for p in meta["neighbours"]]
    if generations:
        texts = [meta["prompt"]] + meta["paraphrases"][:1]
        out["generations"] = model.generate(texts, max_new_tokens=20).df.continuation.tolist()
    return out


def _probs(model, prompt: str, meta: dict) -> dict:
    batch = Batch.of(model.tokenizer, prompt)
    with run(model, batch.tokens):
        probs = torch.softmax(last_logits(model, batch)[0].float(), -1)
    top = int(probs.argmax())
    return {"target": probs[meta["target_id"]].item(), "answer": probs[meta["answer_id"]].item(),
            "top": model.tokenizer.decode([top]), "top_id": top}


def _report(before: dict, after: dict, meta: dict, Result):
    import pandas as pd

    rows = [{"check": "efficacy", "prompt": meta["prompt"], "before": before["prompt"]["target"],
             "after": after["prompt"]["target"], "ok": after["prompt"]["target"] > after["prompt"]["answer"]}]
    for text, b, a in zip(meta["paraphrases"], before["paraphrases"], after["paraphrases"]):
        rows.append({"check": "paraphrase", "prompt": text, "before": b["target"], "after": a["target"],
                     "ok": a["target"] > a["answer"]})
    for text, b, a in zip(meta["neighbours"], before["neighbours"], after["neighbours"]):
        rows.append({"check": "neighbourhood", "prompt": text, "before": b["top"], "after": a["top"],
                     "ok": a["top_id"] == b["top_id"]})
    df = pd.DataFrame(rows)
    paraphrase = df[df.check == "paraphrase"]
    neighbourhood = df[df.check == "neighbourhood"]
    summary = {
        "title": f"ROME edit at layer {meta['layer']}: {meta['subject']!r} {meta['answer']!r} -> {meta['target']!r}",
        "efficacy": {"before": before["prompt"]["target"], "after": after["prompt"]["target"]},
        "paraphrase_success": int(paraphrase.ok.sum()), "n_paraphrases": len(paraphrase),
        "neighbourhood_kept": float(neighbourhood.ok.mean()) if len(neighbourhood) else None,
        "generations": {"before": before.get("generations"), "after": after.get("generations")},
        "axes": ["check"], "layer": meta["layer"]}
    values = torch.tensor([float(r["ok"]) for r in rows])

    def html(result):
        import html as escape

        gens = summary["generations"]
        lines = "".join(f"<tr><td>{escape.escape(t)}</td><td>{escape.escape(b or '')}</td>"
                        f"<td>{escape.escape(a or '')}</td></tr>"
                        for t, b, a in zip([meta["prompt"]] + meta["paraphrases"][:1],
                                           gens["before"] or [], gens["after"] or []))
        return (f"<b>{escape.escape(summary['title'])}</b>"
                f"{df.to_html(index=False, float_format=lambda v: f'{v:.3f}')}"
                f"<table><tr><th>prompt</th><th>before</th><th>after</th></tr>{lines}</table>")

    return Result(values, df, summary, html=html)
