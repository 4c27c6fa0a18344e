"""The reference of every magic and API call, kept in one place.

`%mechnb help` prints it as text and the README's table is generated from it, so
the two cannot disagree (a test compares them). Each entry names the magic's usage
(empty for calls that have no magic), the API call and what it does in one line.

    >>> print(help_text())                 # what %mechnb help shows
    >>> python -m mechnb.notebook.reference         # rewrites the README's table from ENTRIES

Gotchas: a new magic or API call belongs here first; the README table sits between
the two `reference` comment markers and is overwritten, so edit it here.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Entry:
    """One row: a magic's usage (or ""), the API call (or ""), what it does."""

    magic: str
    api: str
    what: str


ENTRIES = [
    Entry("%mechnb load [NAME] [--device D] [--dtype T] [--device-map auto] [--remote] [--as VAR]",
          "mechnb.load(name=None, device=None, dtype=None, device_map=None, remote=False, **hf_kwargs)",
          "load and wrap a model: no NAME for the embedded SmolLM2-135M-Instruct (offline), a hub id, "
          "a local directory or a .gguf file (GPT-2, Llama, Mistral, Qwen2/3, GPT-NeoX, Gemma 2/3); "
          "--device-map auto spreads it over every local GPU, --remote runs it on NDIF"),
    Entry("%mechnb use VAR", "", "make a Model loaded from Python the session's model"),
    Entry("%mechnb info", "model.info()", "layers, heads, d_model, d_head, vocab, device, dtype, memory"),
    Entry("%mechnb top PROMPT [-k K]", "model.top(prompt, k=10)",
          "next-token table: rank, token, token_id, prob, logit"),
    Entry("%mechnb unload", "", "drop the session's model"),
    Entry("%mechnb serve [--port N] [--allow-exec] [--stop]", "mechnb.agent.server.HTTPServer(Toolbox(model))",
          "the model's experiments as an MCP server (HTTP, 127.0.0.1, a token), with a live log of calls"),
    Entry("%mechnb help", "", "this reference"),
    Entry("%%trace PROMPT [--grad]", "with model.trace(prompts):",
          "run once: model[site] reads a site (.save() keeps it), model[site] = value writes one"),
    Entry("", "model.cache(prompts, sites)", "run once, keep sites; cache[site] with index and positions"),
    Entry("%ablate SITE... [--mode zero|mean|resample] [--ref {prompts}] [--positions P] [--seed N]",
          "model.ablate(sites, mode, ref, positions)", "ablate until removed, in every later forward"),
    Entry("", "model.hook(site, fn)", "a persistent user function on a site's value"),
    Entry("%interventions [--clear] [--remove N...]",
          "model.interventions, model.remove(...), model.clear(kind=None), with model.ablated(...):",
          "list, remove and scope the active interventions"),
    Entry("%patch --clean C --corrupt X --answer A --wrong W --sites S... [--per-position|--all-positions] "
          "[--method exact|attribution] [--metric logit_diff|prob|logprob|kl] [--normalize] [--noising] "
          "[--batch-size N] [-o NAME]",
          "model.patch(clean, corrupt, sites, answer, wrong, metric, per_position, method, normalize, direction)",
          "activation or attribution patching, batched: a heatmap and a Result"),
    Entry("%path_patch --clean C --corrupt X --senders S... --receivers R... --answer A --wrong W "
          "[--freeze heads|all|none] [--metric M] [--normalize] [--noising] [--batch-size N] [-o NAME]",
          "model.path_patch(clean, corrupt, senders, receivers, answer, wrong, ...)",
          "the senders' effect through the receivers only"),
    Entry("%attention PROMPT [--layers 20:26] [--heads 0:4] [-o NAME]", "model.attention(prompts, layers, heads)",
          "attention patterns as circuitsvis views, offline"),
    Entry("%activations SITE|{direction} PROMPT|{prompts} [--site resid_post.L] [-o NAME]",
          "model.activations(site_or_direction, prompts)", "tokens coloured by a neuron, a head or a direction"),
    Entry("%lens PROMPT [-k K] [-o NAME]", "model.logit_lens(prompt, k=1)",
          "the logit lens: every layer decoded through the unembedding"),
    Entry("%dla PROMPT --answer A [--wrong W] [-o NAME]", "model.dla(prompt, answer, wrong)",
          "direct logit attribution per head and MLP"),
    Entry("%heads [--detect induction previous_token duplicate_token] [--n-samples N] [--seq-len N] "
          "[--seed S] [-o NAME]", "model.detect_heads(kind=all three)",
          "head detector scores in [0, 1]"),
    Entry("%explore [PROMPT] [--answer A] [--wrong W]", "model.explore(prompt)",
          "a widget: next tokens, attention, live head ablation"),
    Entry("", "model.collect(site, texts, n_tokens, store=None)",
          "activations for SAEs, in memory or memory-mapped on disk"),
    Entry("", "mechnb.sae.train(store, kind, d_sae, k), mechnb.sae.load(dir)",
          "train or load (SAELens layout) a sparse autoencoder"),
    Entry("%features PROMPT --sae SAE [-k K] [-o NAME]",
          "model.attach(sae), model.features(prompt, sae), sae.dashboard(f, model, texts)",
          "SAE features as sites sae.L.F, the top features per token, dashboards"),
    Entry("", "sae.record_contexts(model, texts), sae.label(features, labeler)",
          "feature labels from top contexts, scored by simulation"),
    Entry("", "mechnb.transcoders.train(model, texts, width, k, cross_layer=False), tcs.evaluate(model, texts), "
          "mechnb.transcoders.load(dir), model.attach(tcs)",
          "transcoders for every layer, or a cross-layer transcoder, from one pass; their features as sites tc.L.F"),
    Entry("%graph PROMPT --transcoders TCS [--target T] [--max-feature-nodes N] [--max-logits N] "
          "[--batch-size N] [--no-sink] [--widget] [-o NAME]",
          "model.graph(prompt, tcs) -> AttributionGraph (.scores, .df, .top(), .plot(), .widget(), .save())",
          "attribution graphs over transcoders or a CLT, the attention sink left out; the live graph ablates "
          "its selection on the real model"),
    Entry("%attribute PROMPT [--method gim|gradient|grad_x_input|integrated_gradients] [--target T] "
          "[--steps N] [-o NAME]",
          "model.attribute(prompt, target, method, steps, baseline, sites), with model.gim():",
          "which tokens (or components) drive a logit; GIM's backward rules"),
    Entry("%circuit --clean C --corrupt X --answer A --wrong W [--method eap|eap-ig|gim|exact] "
          "[--level edge|node] [--steps N] [--metric M] [--top 2%] [--fractions F...] [--no-faithfulness] "
          "[--batch-size N] [-o NAME]",
          "model.circuit(clean, corrupt, answer, wrong, method, level, steps, metric) -> Circuit "
          "(.df, .top(), .plot(), .faithfulness(), .save())",
          "circuit discovery over every head's q/k/v input, MLP and the logits; faithfulness, CPR and CMD"),
    Entry("%stability {circuit} [--resamples N] [--top 1%]", "circuit.stability(), circuit.quality(), "
          "result.stability()", "fidelity and stability of a circuit or a result, one table"),
    Entry("%generate PROMPT|{prompts} [--max-new-tokens N] [--compare] [--sample] [--temperature T] "
          "[--top-p P] [--seed S] [--stream] [--no-cache] [-o NAME]",
          "model.generate(prompts, max_new_tokens, do_sample, temperature, top_p, seed, compare, stream, "
          "cache, sites) (.activations[site]: row token ...)",
          "continue prompts with the active interventions, through the key/value cache (--compare: also "
          "without them, one batch; --no-cache: recompute the whole sequence each step)"),
    Entry("%steer SITE {vector}|sae.L.F [--scale S] [--positions P], %steer --clear",
          "model.steering_vector(positive, negative, site), model.steer(site, vector, scale), "
          "with model.steered(...):, model.clear(\"steer\")",
          "activation addition, persistent like an ablation"),
    Entry("%causal_trace PROMPT --subject S [--answer A] [--kind hidden|mlp|attn] [--samples N] [--noise X] "
          "[--window W] [-o NAME]",
          "model.causal_trace(prompt, subject, answer, noise, samples, kind, window)",
          "Meng et al.'s causal tracing, batched on the patching engine: a layer x token heatmap"),
    Entry("", "model.edit(prompt, subject, target) -> WeightEdit (.report(), .revert()), model.edits",
          "ROME rank-one fact edits, reverted bit for bit"),
    Entry("%ov head.L.H [-k K] [--vocab N]", "model.ov(layer, head) -> FactoredMatrix (.top_pairs(k=10, vocab=8192))",
          "what a head copies, from its weights: top source -> output tokens, copying score"),
    Entry("%qk head.L.H [-k K] [--vocab N]", "model.qk(layer, head) -> FactoredMatrix (.top_pairs(k=10, vocab=8192))",
          "what a head attends to, from its weights"),
    Entry("%composition [--kind q|k|v] [-o NAME]", "model.composition(kind)",
          "composition scores of every head into every later head"),
    Entry("%coactivation SITE {texts} [--components N] [--method pca|kmeans] [-o NAME]",
          "model.coactivation(site, texts, components, method)", "co-activating directions and clusters of units"),
    Entry("", "mechnb.causal.CausalModel(variables, parents, mechanisms, template), "
              "cm.counterfactuals(n, intervene, seed), data.filter(model)",
          "a high-level causal model, its counterfactual pairs, kept where the model is right"),
    Entry("%interchange {data} SITE... [--variable V] [--featurizer full|pca|{f}] [-k K] [--compare values|top1] "
          "[--batch-size N] [-o NAME]",
          "model.interchange(data, sites, variable, featurizer, k) -> InterchangeResult (.examples(site), .best)",
          "interchange intervention accuracy per site and position, one batched sweep; @'{field}' positions"),
    Entry("%das {data} SITE [--variable V] [-k K] [--kind das|boundless|dbm] [--epochs N] [--batch-size N] "
          "[--lr X] [--test X] [--seed S] [-o NAME]",
          "model.das(data, site, variable, k, kind) -> featurizer (.meta['iia'], .plot(), .save()), "
          "mechnb.causal.load(dir)",
          "DAS, Boundless DAS or DBM at one site, trained above it only; held-out IIA"),
    Entry("", "mechnb.causal.probe(data, sites, variable, iia=...), mechnb.causal.export_mib(f, dir, task)",
          "linear probes beside IIA; MIB's dataset records and submission layout"),
]

SITES = ("sites: embed, resid_pre.L, resid_mid.L, resid_post.L, attn_out.L, mlp_out.L, head.L[.H], "
         "neuron.L[.N], pattern.L[.H], logits; L may be 0:5 or *; positions @-1, @3:7, @'John', "
         "@'{field}' (a causal template's field)")

_WIDTH = 96
BEGIN = "<!-- reference: generated from mechnb/notebook/reference.py by `python -m mechnb.notebook.reference` -->"
END = "<!-- /reference -->"


def help_text() -> str:
    """The reference as plain text, for `%mechnb help`: each magic, what it does, its API call."""
    lines = ["mechnb magics (API calls after `API:`)"]
    for entry in ENTRIES:
        if entry.magic:
            lines += _wrap_usage(entry.magic)
        else:
            lines += textwrap.wrap(f"API: {entry.api}", _WIDTH, initial_indent="  ", subsequent_indent="       ")
        lines += textwrap.wrap(entry.what, _WIDTH, initial_indent="        ", subsequent_indent="        ")
        if entry.magic and entry.api:
            lines += textwrap.wrap(f"API: {entry.api}", _WIDTH, initial_indent="        ",
                                   subsequent_indent="          ")
    lines += textwrap.wrap(SITES, _WIDTH, subsequent_indent="       ")
    return "\n".join(lines) + "\n"


def _wrap_usage(usage: str) -> list[str]:
    """A magic's usage in lines of at most `_WIDTH`, never breaking inside `[...]` or `{...}`."""
    lines = ["  "]
    for word in re.findall(r"\[[^\]]*\]|\{[^}]*\}\S*|\S+", usage):
        if len(lines[-1]) + len(word) + 1 > _WIDTH and lines[-1].strip():
            lines.append("       ")
        lines[-1] += ("" if not lines[-1].strip() else " ") + word
    return lines


def markdown_table() -> str:
    """The reference as the README's markdown table."""

    def cell(text: str) -> str:
        return f"`{text.replace('|', chr(92) + '|')}`" if text else ""

    rows = ["| magic | API | what |", "|---|---|---|"]
    rows += [f"| {cell(e.magic)} | {cell(e.api)} | {e.what} |" for e in ENTRIES]
    return "\n".join(rows)


def readme_block() -> str:
    """The README's generated block, markers included."""
    return f"{BEGIN}\n{markdown_table()}\n{END}"


def rewrite_readme(path: Path) -> bool:
    """Replace the block between the markers in `path`; True when the file changed."""
    text = path.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"{path} has no reference block: put {BEGIN!r} and {END!r} where the table goes")
    new = pattern.sub(lambda _: readme_block(), text)
    path.write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":
    readme = Path(__file__).resolve().parent.parent.parent / "README.md"
    print(f"{readme}: {'rewritten' if rewrite_readme(readme) else 'already up to date'}")
