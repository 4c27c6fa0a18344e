"""Plain-language names for SAE features, scored by how well they predict activations.

Automated interpretability (Bills et al. 2023, "LLMs as meta-interpreters"): show a
labeller the contexts where a feature fires most, ask for a short description, then
check the description by simulation: given only the label, the labeller judges
held-out contexts (half where the feature fires, half where it does not), and the
score is the correlation between its judgements and the true activations.

    >>> sae.record_contexts(model, python_docs("eval"))      # top and quiet contexts per feature
    >>> sae.label(range(20), labeler="local")                # the embedded instruct model
    >>> sae.label([5, 9], labeler="http://127.0.0.1:8000/v1")  # an OpenAI-compatible server
    >>> sae.label([5], labeler=lambda prompt: my_llm(prompt))

Labellers: `"local"` (SmolLM2-135M-Instruct, offline; it judges by the probability
it gives "Yes"), a URL speaking the OpenAI chat completions API (judgements are
numbers 0-10 parsed from its replies), or a function from prompt text to reply
text. Image concepts (`mechnb.vision.concepts`: `concepts.record(sae)` sets the contexts)
go to a URL or a function as chat content parts with the images as PNG data URLs (for a
multimodal model), and to the local model as a summary in words (class distribution,
where in the image the feature fires), judged from each held-out image's class. Labels and scores are cached on disk per SAE, feature and labeller, and saved
after every feature, so an interrupted or failed run keeps what it had.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

from ..core.errors import LabelError, SAEError

WINDOW_BEFORE, WINDOW_AFTER = 12, 4
_LOCAL = {}


def record_contexts(sae, model, texts, n_tokens: int = 20_000, per_feature: int = 40, context: int = 64) -> dict:
    """Keep, for every feature, its top-activating contexts and as many quiet ones."""
    from .store import collect, documents_of, take_documents, windows as windows_of

    documents = list(take_documents(documents_of(texts), n_tokens, model))
    windows = windows_of(model, documents, context, n_tokens)
    store = collect(model, sae.site, windows, n_tokens=n_tokens, context=context, progress=False)
    x = store.rows(0, len(store)).to(sae.W_enc.device, sae.W_enc.dtype)
    # Collection keeps positions 1.. of each window, window after window: row of (window, position).
    first_row, count = [], 0
    for ids in windows:
        first_row.append(count)
        count += len(ids) - 1
    owners = [(w, p) for w, ids in enumerate(windows) for p in range(1, len(ids))][: len(x)]
    best_values = torch.full((per_feature, sae.d_sae), -1.0)
    best_rows = torch.zeros((per_feature, sae.d_sae), dtype=torch.long)
    active_rows, active_features, active_values = [], [], []
    with torch.no_grad():
        for start in range(0, len(x), 2048):
            acts = sae.encode(x[start:start + 2048]).float().cpu()
            values = torch.cat([best_values, acts])
            rows = torch.cat([best_rows, torch.arange(start, start + len(acts))[:, None].expand_as(acts)])
            top = values.topk(per_feature, dim=0)
            best_values, best_rows = top.values, rows.gather(0, top.indices)
            # Every row is encoded once, here; windows read their feature's values from these
            # (sparse: a few active features a token) instead of encoding their rows again.
            row, feature = acts.nonzero(as_tuple=True)
            active_rows.append(row + start)
            active_features.append(feature)
            active_values.append(acts[row, feature])
    by_feature = _ByFeature(torch.cat(active_rows), torch.cat(active_features), torch.cat(active_values),
                            sae.d_sae)
    generator = torch.Generator().manual_seed(0)
    quiet_pool = torch.randperm(len(x), generator=generator)[: 4 * per_feature]
    with torch.no_grad():
        quiet_acts = sae.encode(x[quiet_pool]).float().cpu()
    pieces: dict[int, str] = {}

    def token(i: int) -> str:
        if i not in pieces:
            pieces[i] = model.tokenizer.decode([i])
        return pieces[i]

    def window_of(row, feature):
        window, position = owners[row]
        ids = windows[window]
        start = max(1, position - WINDOW_BEFORE)
        stop = min(len(ids), position + WINDOW_AFTER)
        rows = [r for r in range(first_row[window] + start - 1, first_row[window] + stop - 1) if r < len(x)]
        values = by_feature.values(feature, rows)
        return {"tokens": [token(t) for t in ids[start:stop]], "values": values, "focus": position - start,
                "activation": max(values) if values else 0.0}

    contexts = {}
    for feature in range(sae.d_sae):
        positive = [window_of(int(r), feature) for v, r in zip(best_values[:, feature], best_rows[:, feature]) if v > 0]
        if not positive:
            continue
        quiet_rows = quiet_pool[quiet_acts[:, feature] <= 0][: len(positive)]
        negative = [window_of(int(r), feature) for r in quiet_rows]
        contexts[feature] = {"positive": positive, "negative": negative}
    sae.contexts = contexts
    return contexts


class _ByFeature:
    """Non-zero activations grouped by feature: `values(feature, rows)` reads one feature's
    activation at given rows (0 where it is silent) without encoding them again."""

    def __init__(self, rows, features, values, d_sae: int):
        order = torch.argsort(features * (int(rows.max()) + 1 if len(rows) else 1) + rows)
        self.rows, self.data = rows[order], values[order]
        self.bounds = torch.cat([torch.zeros(1, dtype=torch.long),
                                 torch.bincount(features, minlength=d_sae).cumsum(0)]).tolist()

    def values(self, feature: int, rows: list[int]) -> list[float]:
        lo, hi = self.bounds[feature], self.bounds[feature + 1]
        if lo == hi or not rows:
            return [0.0] * len(rows)
        own, data = self.rows[lo:hi], self.data[lo:hi]
        wanted = torch.tensor(rows)
        at = torch.searchsorted(own, wanted).clamp(max=hi - lo - 1)
        return torch.where(own[at] == wanted, data[at], 0.0).tolist()


def label(sae, features, labeler="local", n_examples: int = 20, cache_dir=None):
    """Labels and simulation scores for `features`; see the module docstring.

    Returns a DataFrame: `feature`, `label`, `score` (correlation of the labeller's
    judgements with the true activations on held-out contexts), `shuffled_score` (the
    same label judged on another feature's contexts: what chance looks like),
    `n_examples`.
    """
    import pandas as pd

    contexts = getattr(sae, "contexts", None)
    if not contexts:
        raise SAEError(f"{sae.name} has no recorded contexts: run sae.record_contexts(model, texts) first")
    features = [features] if isinstance(features, int) else list(features)
    missing = [f for f in features if f not in contexts]
    if missing:
        message = (f"features {missing[:10]}{' ...' if len(missing) > 10 else ''} never fired in the "
                   f"recorded contexts (or are out of range 0-{sae.d_sae - 1})")
        if len(missing) == len(features):
            raise SAEError(f"{message}: record more text or pick features that fire")
        import warnings

        warnings.warn(f"{message}: they are left out", stacklevel=3)
        features = [f for f in features if f in contexts]
    ask, judge, name, multimodal = _labeller(labeler)
    path = _cache_path(sae, name, cache_dir)
    cached = json.loads(path.read_text()) if path.exists() else {}
    rows = []
    for feature in features:
        key = f"{feature}|{n_examples}"
        if key not in cached:
            found = contexts[feature]
            shown, held = found["positive"][: n_examples // 2], found["positive"][n_examples // 2: n_examples]
            if "image" in shown[0]:  # image concepts (mechnb.vision.concepts)
                prompt = _explain_images(shown, found.get("summary", ""), multimodal)
            else:
                prompt = _explain_prompt(shown)
            text = ask(prompt).strip().split("\n")[0].strip()
            if not text:
                raise LabelError(f"the labeller returned an empty label for feature {feature}")
            trials = held + found["negative"][: len(held)]
            judged = judge(text, trials)
            actual = [c["activation"] for c in trials]
            score = _correlation(judged, actual)
            # Chance level: the same judgements against the activations shuffled among the contexts.
            generator = torch.Generator().manual_seed(feature)
            shuffled_score = sum(_correlation(judged, [actual[i] for i in torch.randperm(len(actual),
                                                                                         generator=generator)])
                                 for _ in range(20)) / 20
            cached[key] = {"label": text, "score": score, "shuffled_score": shuffled_score, "n_examples": len(shown)}
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(cached, indent=1))
        rows.append({"feature": feature, **cached[key]})
    return pd.DataFrame(rows, columns=["feature", "label", "score", "shuffled_score", "n_examples"])


def _explain_prompt(contexts) -> str:
    lines = ["Here are text excerpts where a feature of a language model is active. The token "
             "where it is most active is marked with [[ ]].", ""]
    for i, c in enumerate(contexts, 1):
        tokens = list(c["tokens"])
        tokens[c["focus"]] = f"[[{tokens[c['focus']]}]]"
        lines.append(f"{i}. {''.join(tokens).strip()}")
    lines += ["", "In a few words, what does this feature detect? Answer with a short label only."]
    return "\n".join(lines)


def _judge_prompt(label_text: str, context, multimodal: bool = False):
    if "image" in context:  # the image itself to a multimodal labeller; its class in words to a text one
        question = f"A feature of an image model detects: {label_text}.\n"
        if not multimodal:
            return (question + f"The image shows a handwritten {context['class']}.\n"
                    "Is this feature active on the image? Answer Yes or No.")
        from ..vision.concepts import png_data_url

        return [{"type": "text", "text": question + "Is this feature active on this image?"},
                {"type": "image_url", "image_url": {"url": png_data_url(context["image"])}}]
    return (f"A feature of a language model detects: {label_text}.\n"
            f"Text: {''.join(context['tokens']).strip()}\n"
            "Is this feature active in the text? Answer Yes or No.")


def _explain_images(contexts, summary: str, multimodal: bool):
    """The labelling prompt for image concepts: the images (multimodal) or the summary in words."""
    ask = "In a few words, what does this feature detect? Answer with a short label only."
    if not multimodal:  # the shortest question the 135M local model answers on topic
        return (f"A feature of an image model fires on handwritten digits ({summary}). In at most six words, "
                "what does it detect?")
    from ..vision.concepts import png_data_url

    parts = [{"type": "text", "text": "Here are the images where a feature of an image model is most active, "
                                      f"strongest first ({summary})."}]
    for context in contexts:
        parts.append({"type": "image_url", "image_url": {"url": png_data_url(context["image"])}})
    return parts + [{"type": "text", "text": ask}]


def _asking(prompt, suffix: str):
    """`prompt` (text, or chat content parts) with `suffix` added to its last text."""
    if isinstance(prompt, str):
        return prompt + suffix
    return prompt + [{"type": "text", "text": suffix.strip()}]


def _labeller(labeler):
    """`(ask(prompt) -> text, judge(label, contexts) -> numbers, name, multimodal)` for a labeller.

    A function or a URL is multimodal: for image concepts its prompts are chat content parts
    (`[{"type": "text", ...}, {"type": "image_url", ...}]`); the local model reads words only."""
    if labeler == "local":
        return _local_ask, _local_judge, "local", False
    if callable(labeler):
        def judge(label_text, contexts):
            return [_number(labeler(_asking(_judge_prompt(label_text, c, True), " Then rate 0-10.")))
                    for c in contexts]

        return labeler, judge, getattr(labeler, "__qualname__", "callable"), True
    if isinstance(labeler, str) and re.match(r"https?://", labeler):
        def ask(prompt):
            return _chat(labeler, prompt)

        def judge(label_text, contexts):
            return [_number(_chat(labeler, _asking(_judge_prompt(label_text, c, True),
                                                   " Reply with one number from 0 (no) to 10 (strongly).")))
                    for c in contexts]

        return ask, judge, labeler, True
    raise LabelError(f"labeler must be 'local', a function of the prompt text, or an http(s) URL of an "
                     f"OpenAI-compatible server, got {labeler!r}")


def _chat(url: str, prompt: str) -> str:
    import urllib.error
    import urllib.request

    endpoint = url.rstrip("/")
    if not endpoint.endswith("/chat/completions"):
        endpoint += "/chat/completions"
    body = json.dumps({"model": "default", "messages": [{"role": "user", "content": prompt}],
                       "max_tokens": 32, "temperature": 0}).encode()
    request = urllib.request.Request(endpoint, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            reply = json.loads(response.read())
        return reply["choices"][0]["message"]["content"]
    except (urllib.error.URLError, OSError) as error:
        raise LabelError(f"the labeller at {endpoint} could not be reached ({getattr(error, 'reason', error)}); "
                         "labels finished so far are kept in the cache") from None
    except (KeyError, IndexError, ValueError) as error:
        raise LabelError(f"the labeller at {endpoint} did not answer like the OpenAI chat API: {error!r}") from None


def _local():
    """The embedded model the local labeller runs on: one this process has loaded already, if
    it is `unmodified` (no intervention, edit or running trace: the same answers, without a
    second copy in memory, 540 MB), else one of the labeller's own."""
    from ..core.loading import EMBEDDED_NAME, load
    from ..core.model import live_models

    for model in live_models():
        if model.name == EMBEDDED_NAME and not model.remote and model.dtype == torch.float32 \
                and model.unmodified:
            return model
    if "model" not in _LOCAL:
        _LOCAL["model"] = load()
    return _LOCAL["model"]


def _chat_text(model, prompt: str) -> str:
    return model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)


def _local_ask(prompt: str) -> str:
    """The local model's greedy answer, decoded with transformers' key/value cache: its own
    model has no interventions, so the tokens are those `model.generate` gives, without
    recomputing a prompt of hundreds of tokens at every step."""
    from ..core.batch import Batch

    model = _local()
    batch = Batch.of(model.tokenizer, _chat_text(model, prompt))
    with torch.no_grad():
        out = model.hf.generate(**batch.inputs(model.device), max_new_tokens=12, do_sample=False,
                                top_p=None, top_k=None, temperature=None,
                                pad_token_id=model.tokenizer.eos_token_id)
    return model.tokenizer.decode(out[0, batch.input_ids.shape[1]:], skip_special_tokens=True)


def _local_judge(label_text: str, contexts) -> list[float]:
    """P(Yes) against P(No) for each context, in one batch."""
    from ..core.batch import Batch
    from ..core.engine import last_logits, run

    model = _local()
    batch = Batch.of(model.tokenizer, [_chat_text(model, _judge_prompt(label_text, c)) for c in contexts])
    with run(model, batch.tokens):
        logits = last_logits(model, batch).float()
    yes, no = (model.tokenizer.encode(word, add_special_tokens=False)[0] for word in ("Yes", "No"))
    return torch.softmax(logits[:, [yes, no]], -1)[:, 0].tolist()


def _number(text: str) -> float:
    match = re.search(r"-?\d+(\.\d+)?", text or "")
    return float(match.group()) if match else 0.0


def _correlation(predicted, actual) -> float:
    p, a = torch.tensor(predicted, dtype=torch.float64), torch.tensor(actual, dtype=torch.float64)
    if len(p) < 2 or p.std() == 0 or a.std() == 0:
        return 0.0
    p, a = p - p.mean(), a - a.mean()
    return float((p * a).sum() / (p.norm() * a.norm()))


def _cache_path(sae, labeller_name: str, cache_dir) -> Path:
    from ..core.embedded import cache_root

    digest = hashlib.sha256(sae.W_dec.detach().float().cpu().numpy().tobytes()[:1 << 20]).hexdigest()[:12]
    who = hashlib.sha256(labeller_name.encode()).hexdigest()[:8]
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "labels"
    return root / f"{sae.name}-{digest}-{who}.json"
