"""The `Model`: a causal language model wrapped for interpretability.

`mechnb.load()` (see `mechnb.loading`) returns one; `Model(hf_model, tokenizer)` wraps
a model built in code. A `Model` holds the transformers model wrapped in an nnsight
`TransformersModel` (`.nn`), its architecture map (`.arch`), and attention hook points
so that every site of `mechnb.sites` can be read and written:

    >>> model = mechnb.load()
    >>> model.top("The Eiffel Tower is located in the city of").token[0]
    ' Paris'
    >>> cache = model.cache(["When Mary and John went to the store, John gave a drink to"],
    ...                     ["resid_pre.5", "pattern.3", "head.9.6"])
    >>> cache["pattern.3"].shape          # batch head pos_q pos_k
    torch.Size([1, 9, 14, 14])
    >>> with model.trace("Hello world"):
    ...     model["head.9.6"] = 0
    ...     logits = model["logits"].save()

Gotchas: nothing here touches the network unless `name` is a hub id that is not in
the local Hugging Face cache. Weights load only through safetensors (transformers'
default) or GGUF. Attention always runs through mechnb's eager function
(`mechnb.hookpoints`), so patterns are real probabilities even if the model was
loaded for `sdpa`.
"""

from __future__ import annotations

from .errors import SiteError, TraceError


class Model:
    """A causal LM ready for interpretability: sites, traces, caches (see the module doc).

    Args:
        hf_model: a transformers causal LM of a supported architecture.
        tokenizer: its tokenizer.
        name: a label for displays (default: the config's name or model type).
        remote: run every trace on NDIF, on the hub model named by
            `hf_model.name_or_path`; `hf_model` is then only its structure (on the
            `meta` device, as `mechnb.load(name, remote=True)` builds it), and methods
            that need the weights here raise `RemoteError` (see `mechnb.remote`).

    A model spread over devices by accelerate (`from_pretrained(device_map=...)` or
    `accelerate.dispatch_model`) works as it is; see `mechnb.devices`.

    Example: `Model(LlamaForCausalLM(config), tokenizer)` wraps a model built in code.
    """

    def __init__(self, hf_model, tokenizer, name: str | None = None, remote: bool = False):
        import nnsight

        from .arch import arch_for
        from .hookpoints import install

        self.arch = arch_for(hf_model.config)
        hf_model.eval()
        self.remote = bool(remote)
        self.hf = hf_model
        if self.remote:
            from .remote import wrap

            # NDIF runs the stock model: no hook points, no attention function of ours.
            self.nn = wrap(hf_model, tokenizer)
        else:
            install(hf_model, self.arch)
            self.nn = nnsight.TransformersModel(hf_model, tokenizer=tokenizer)
        self.tokenizer = tokenizer
        self.name = name or getattr(hf_model.config, "_name_or_path", "") or self.arch.name
        self._trace = None
        self._context = None  # the prompts of the running forward, for hook positions
        self._edits: list = []  # active weight edits (mechnb.rome), oldest first
        self._edit_base: dict = {}  # id(module) -> its weight before the first active edit
        self._installed: list = []  # (intervention, torch hook handle), in order added

    # -- dimensions ---------------------------------------------------------

    @property
    def config(self):
        """The transformers config."""
        return self.hf.config

    @property
    def n_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def n_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def n_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.n_heads

    @property
    def d_model(self) -> int:
        return self.config.hidden_size

    @property
    def d_head(self) -> int:
        return getattr(self.config, "head_dim", None) or self.d_model // self.n_heads

    @property
    def d_mlp(self) -> int:
        for attr in ("intermediate_size", "n_inner"):
            value = getattr(self.config, attr, None)
            if value:
                return value
        return 4 * self.d_model

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def device(self):
        """The device inputs go to: the embedding's (CPU for a remote model). A model
        spread by `device_map` computes each layer on its own device (`devices`)."""
        import torch

        from .devices import input_device

        if self.remote:
            return torch.device("cpu")
        return input_device(self.hf, self.arch)

    @property
    def devices(self) -> list[str]:
        """Every device the model runs on, in model order (`"disk"` for offloaded layers)."""
        from .devices import devices

        return ["ndif"] if self.remote else devices(self.hf)

    @property
    def dtype(self):
        return next(self.hf.parameters()).dtype

    @property
    def parallel_attn_mlp(self) -> bool:
        """True when attention and MLP read the same residual (no `resid_mid`)."""
        return self.arch.resid_mid_for(self.config) is None

    @property
    def resid_mid_path(self) -> str:
        """The module (relative to a layer) whose input is `resid_mid`."""
        return self.arch.resid_mid_for(self.config)

    def info(self) -> dict:
        """Dimensions, device, dtype and memory of the model, as a dict."""
        n_params = sum(p.numel() for p in self.hf.parameters())
        n_bytes = sum(p.numel() * p.element_size() for p in self.hf.parameters())
        return {
            "name": self.name,
            "architecture": f"{self.arch.name} ({type(self.hf).__name__})",
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "d_model": self.d_model,
            "d_head": self.d_head,
            "d_mlp": self.d_mlp,
            "vocab_size": self.vocab_size,
            "parameters": f"{n_params / 1e6:.1f} M",
            "device": self._where(),
            "dtype": str(self.dtype).removeprefix("torch."),
            "memory": f"{n_bytes / 2**20:.0f} MiB",
        }

    def _where(self) -> str:
        """Where the model runs, in words: `cpu`, `cuda:0, cuda:1 (device_map)`, `NDIF (...)`."""
        if self.remote:
            from .remote import host

            return f"NDIF ({host()})"
        found = self.devices
        return found[0] if len(found) == 1 else f"{', '.join(found)} (device_map)"

    def _needs_local(self, method: str) -> None:
        """`RemoteError` when this model is remote: `method` needs the model here."""
        if self.remote:
            from .remote import unavailable

            raise unavailable(method)

    def __repr__(self) -> str:
        return (f"<mechnb.Model {self.name}: {self.arch.name}, {self.n_layers} layers, "
                f"{self.n_heads} heads, d_model {self.d_model}, on {self._where()}>")

    # -- tokens -------------------------------------------------------------

    def tokens(self, prompt: str) -> list[str]:
        """The prompt's token strings, as positions count them."""
        from .batch import Batch

        return Batch.of(self.tokenizer, prompt).tokens[0]

    # -- traces -------------------------------------------------------------

    def trace(self, prompts, grad: bool = False):
        """A `with` block running the model on `prompts`; read and write sites inside it.

        Args:
            prompts: a string or a list of strings (padded on the right).
            grad: keep autograd on (off by default).

        Returns:
            A `mechnb.trace.Trace`; `.batch` has the tokens. Inside the block,
            `model[site]` reads (call `.save()` to keep it) and `model[site] = v` writes.
            On a remote model the block runs on NDIF (see `mechnb.remote`).
        """
        if grad:
            self._needs_local("trace(grad=True)")
        from .trace import Trace

        return Trace(self, prompts, grad=grad)

    def _enter_trace(self, trace) -> None:
        if self._trace is not None:
            raise TraceError("a trace of this model is already running: traces do not nest; "
                             "finish the open `with model.trace(...)` block first")
        self._trace = trace

    def _leave_trace(self, trace) -> None:
        if self._trace is trace:
            self._trace = None

    def _active(self, site):
        if self._trace is None:
            raise TraceError(
                f"model[{str(site)!r}] reads or writes a value during a run of the model: use "
                "it inside `with model.trace(prompt):` or a %%trace cell, or "
                f"model.cache(prompt, {str(site)!r}) outside one"
            )
        return self._trace

    # Through the trace's own methods, not an import: on NDIF this code runs where
    # mechnb is not installed (see `mechnb.remote`).
    def __getitem__(self, site):
        return self._active(site).read(site)

    def __setitem__(self, site, value) -> None:
        self._active(site).write(site, value)

    # -- persistent interventions ---------------------------------------------

    @property
    def interventions(self) -> list:
        """The active interventions, in the order they apply."""
        return [intervention for intervention, _ in self._installed]

    def add(self, interventions) -> list:
        """Activate interventions (an `Intervention` or a list); returns them."""
        self._needs_local("add")
        from .interventions import Intervention, install

        items = [interventions] if isinstance(interventions, Intervention) else list(interventions)
        for intervention in items:
            self._installed.append((intervention, install(self, intervention)))
        return items

    def remove(self, interventions) -> None:
        """Deactivate the given interventions (others stay)."""
        from .interventions import Intervention, InterventionError

        items = [interventions] if isinstance(interventions, Intervention) else interventions
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, Intervention) for i in items):
            raise InterventionError(f"remove takes interventions from model.interventions (one or a list), "
                                    f"got {interventions!r:.60}; model.clear() removes them all")
        keep = []
        for intervention, handle in self._installed:
            if any(intervention is item for item in items):
                handle.remove()
            else:
                keep.append((intervention, handle))
        self._installed = keep

    def clear(self) -> None:
        """Remove every active intervention: the model is as loaded."""
        for _, handle in self._installed:
            handle.remove()
        self._installed = []

    def ablate(self, sites, mode: str = "zero", ref=None, positions=None, seed: int = 0) -> list:
        """Ablate sites until removed: `zero`, `mean` or `resample` over reference prompts.

        Args:
            sites: a site or list of sites (`head.9.6`, `neuron.5.1`, `mlp_out.*`,
                `resid_pre.3@-1`, ...); ranges expand to one ablation per site.
            mode: `zero`; `mean` (the mean over every real token of `ref`); or
                `resample` (per-token draws from `ref`'s tokens, seeded by `seed`).
            ref: reference prompts for mean and resample.
            positions: positions for every site (`-1`, `"3:7"`, `slice(0, 4)`,
                `"'John'"`); default all, or those in the site string.
            seed: the seed of resample's draws (the same draws on every forward).

        Returns:
            The `Ablate` interventions added. Example: `model.ablate("head.9.6")`.
        """
        self._needs_local("ablate")
        from .interventions import ablations

        return self.add(ablations(self, sites, mode, ref, positions, seed))

    def hook(self, site, fn) -> list:
        """Run `fn(value) -> value` on a site's value in every forward, until removed.

        `value` is the part the site names (`head.9.6@-1` gives `batch d_head`).
        Returns the `Hook` interventions added (one per site of a range).
        """
        self._needs_local("hook")
        from .interventions import Hook
        from .sites import parse

        if not callable(fn):
            raise SiteError(f"hook takes a function of the site's tensor, got {type(fn).__name__}")
        return self.add([Hook(concrete, fn=fn) for concrete in parse(site).expand(self)])

    def ablated(self, sites, mode: str = "zero", ref=None, positions=None, seed: int = 0):
        """`with model.ablated(...):` ablations active inside the block only."""
        return _Scoped(self, self.ablate(sites, mode=mode, ref=ref, positions=positions, seed=seed))

    def hooked(self, site, fn):
        """`with model.hooked(site, fn):` a hook active inside the block only."""
        return _Scoped(self, self.hook(site, fn))

    def steer(self, site, vector, scale: float = 1.0, positions=None) -> list:
        """Add `scale * vector` to a site's value in every forward, until removed.

        Args:
            site: a vector-valued site (`resid_pre.12`, `mlp_out.3`, `head.9.6`, ranges).
            vector: a tensor as wide as the site (`d_model`), or an attached SAE feature
                (`"sae.12.1234"`: its decoder direction).
            scale: the multiplier (0 leaves the model as it is).
            positions: positions (`-1`, `"3:7"`, a slice); default every position.

        Returns:
            The `Steer` interventions added. Example: `model.steer("resid_pre.12", v, 8)`.
        """
        self._needs_local("steer")
        from .steering import steerings

        return self.add(steerings(self, site, vector, scale, positions))

    def steered(self, site, vector, scale: float = 1.0, positions=None):
        """`with model.steered(...):` steering active inside the block only."""
        return _Scoped(self, self.steer(site, vector, scale=scale, positions=positions))

    def steering_vector(self, positive, negative, site, positions=-1):
        """Mean activation of the `positive` prompts minus that of the `negative` ones at
        `site` (`d_model`), at each prompt's last token (`positions=-1`) or averaged over
        its tokens (`"mean"`). See `mechnb.steering`."""
        from .steering import steering_vector

        return steering_vector(self, positive, negative, site, positions=positions)

    def generate(self, prompts, max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int | None = None, compare: bool = False, stream=None):
        """Continue prompts with every active intervention applied at every step.

        Args:
            prompts: a prompt or a list of them (one batch).
            max_new_tokens: tokens to add (rows stop early at end-of-sequence).
            do_sample, temperature, top_p, seed: greedy by default; sampling draws from
                softmax(logits / temperature) cut to the top_p mass, seeded by `seed`.
            compare: each prompt also without interventions, in the same batch.
            stream: True shows continuations as they grow; a function receives the list
                of texts after each step.

        Returns:
            A `Result`: `.values` token ids `row token` (-1 padded); `.df` with `prompt`,
            `interventions`, `continuation`, `n_tokens`. Example:
            `model.generate("The Eiffel Tower is in", max_new_tokens=10).df.continuation[0]`.
        """
        self._needs_local("generate")
        from .generation import generate

        return generate(self, prompts, max_new_tokens=max_new_tokens, do_sample=do_sample,
                        temperature=temperature, top_p=top_p, seed=seed, compare=compare, stream=stream)

    def causal_trace(self, prompt: str, subject: str, answer=None, noise: float = 3.0, samples: int = 10,
                     kind: str = "hidden", window: int = 10, seed: int = 0, layers=None, positions=None,
                     batch_size: int | None = None):
        """Causal tracing (Meng et al. 2022): corrupt the subject's embeddings with noise,
        restore one state at a time from the clean run, report the answer's probability.

        Args:
            prompt: the fact's prompt; subject: a substring of it (`"Eiffel Tower"`).
            answer: the answer token (default: the clean run's top prediction).
            noise: the noise's standard deviation in units of the embeddings' std.
            samples: noise draws averaged (seeded from `seed`).
            kind: `hidden` (resid_post), `mlp` or `attn` (outputs over `window` layers
                centred on each layer).
            layers, positions: restrict the grid (default all).
            batch_size: restored runs per batched forward (default from a 256 MiB
                budget); a chunk that runs out of memory is halved and run again.

        Returns:
            A `Result`, `layer pos` probabilities (a heatmap; subject tokens starred);
            `.meta` has `clean_prob` and `corrupt_prob`. See `mechnb.causal`.
        """
        self._needs_local("causal_trace")
        from .causal import causal_trace

        return causal_trace(self, prompt, subject, answer=answer, noise=noise, samples=samples, kind=kind,
                            window=window, seed=seed, layers=layers, positions=positions, batch_size=batch_size)

    def edit(self, prompt: str, subject: str, target: str, layer: int | None = None, method: str = "rome",
             paraphrases=None, neighbours=None, **settings):
        """Rewrite a fact with ROME: a rank-one update of one MLP's output projection.

        Args:
            prompt: the fact's prompt (`"The Eiffel Tower is located in the city of"`).
            subject: the subject, a substring of the prompt (`"Eiffel Tower"`).
            target: the new answer (`" Rome"`; several tokens are fine).
            layer: the MLP to edit (default: the MLP causal trace's peak at the subject).
            paraphrases, neighbours: prompts for the report (defaults: the prompt behind
                short prefixes; the prompt with other landmarks as subject).
            settings: `steps`, `lr`, `kl_factor`, `weight_decay`, `clamp`, `cov_tokens`.

        Returns:
            A `WeightEdit` (active): `.report()`, `.revert()`. See `mechnb.rome`.
        """
        self._needs_local("edit")
        from .rome import SETTINGS, EditError, edit

        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise EditError(f"unknown edit settings {', '.join(unknown)}: the settings are "
                            f"{', '.join(SETTINGS)}")
        return edit(self, prompt, subject, target, layer=layer, method=method, paraphrases=paraphrases,
                    neighbours=neighbours, **settings)

    @property
    def edits(self) -> list:
        """The active weight edits, oldest first."""
        return list(self._edits)

    def ov(self, layer: int, head: int):
        """The OV circuit of head `layer.head`, `vocab x vocab`, as a `FactoredMatrix`
        (`.top_pairs(k)`, `.eigenvalues()`, `.copying_score()`, `.svd()`). See `mechnb.weights`."""
        self._needs_local("ov")
        from .weights import ov

        return ov(self, layer, head)

    def qk(self, layer: int, head: int):
        """The QK circuit of head `layer.head` (destination x source token scores), factored."""
        self._needs_local("qk")
        from .weights import qk

        return qk(self, layer, head)

    def composition(self, kind: str = "k"):
        """Q-, K- or V-composition scores between every head and every later head: a
        `Result` over (head, later head), a heatmap. See `mechnb.weights`."""
        self._needs_local("composition")
        from .weights import composition

        return composition(self, kind)

    def coactivation(self, site, texts, components: int = 10, method: str = "pca", max_tokens: int = 20_000,
                     seed: int = 0, batch_size: int = 8):
        """Principal components (`pca`) or correlation clusters of units (`kmeans`) of a
        site's activations over the tokens of `texts`. Returns a `Result`: explained
        variance per component with each one's top tokens in context, or the unit
        correlation matrix ordered by cluster. `batch_size`: texts per forward (halved
        when a chunk runs out of memory). See `mechnb.coactivation`."""
        from .coactivation import coactivation

        return coactivation(self, site, texts, components=components, method=method,
                            max_tokens=max_tokens, seed=seed, batch_size=batch_size)

    def interventions_table(self):
        """The active interventions as a DataFrame (`#`, kind, site, detail)."""
        import pandas as pd

        rows = [{"#": i, **intervention.describe()} for i, intervention in enumerate(self.interventions)]
        return pd.DataFrame(rows, columns=["#", "kind", "site", "detail"])

    # -- patching -------------------------------------------------------------

    def patch(self, clean, corrupt, sites, answer=None, wrong=None, metric="logit_diff",
              per_position: bool = True, method: str = "exact", normalize: bool = False,
              batch_size: int | None = None, direction: str = "denoising", progress: bool = True):
        """Activation (or attribution) patching of every site in `sites`.

        Args:
            clean, corrupt: a prompt each, or equal-length lists of prompt pairs (the
                metric averages over pairs). A pair must tokenize to one length.
            sites: a site pattern or a list of patterns of one grid shape
                (`resid_pre.*`, `head.*.*`, `attn_out.*`, `mlp_out.10:20`, ...). A
                pattern with positions (`head.*.*@-1`) patches just those.
            answer, wrong: answer tokens (strings; the first token is used) or ids.
            metric: `logit_diff`, `prob`, `logprob`, `kl`, or f(logits batch vocab) -> batch.
            per_position: sweep every position separately (adds a `pos` axis).
            method: `exact` (batched patched forwards) or `attribution` (one backward).
            normalize: report `(patched - corrupt) / (clean - corrupt)`.
            batch_size: rows per batched forward (default from a 256 MiB budget); a
                chunk that runs out of memory is halved and run again, and the values
                move to CPU chunk by chunk (see `mechnb.memory`).
            direction: `denoising` (clean into corrupt) or `noising` (corrupt into clean).
            progress: a progress bar for sweeps longer than two seconds.

        Returns:
            A `Result`; `.values` is `layer pos` for `resid_pre.*`, `layer head` for
            `head.*.*` (`layer head pos` per position); `.df` has `layer`, `head`
            where relevant, `pos`, `token`, `value`; `.meta` the clean and corrupt
            metrics. Example: `model.patch(clean, corrupt, "resid_pre.*", answer=" Mary", wrong=" John")`.
        """
        self._needs_local("patch")
        from .patching import patch

        return patch(self, clean, corrupt, sites, answer=answer, wrong=wrong, metric=metric,
                     per_position=per_position, method=method, normalize=normalize,
                     batch_size=batch_size, direction=direction, progress=progress)

    def path_patch(self, clean, corrupt, senders, receivers, answer=None, wrong=None,
                   metric="logit_diff", normalize: bool = False, freeze: str = "heads",
                   batch_size: int | None = None, direction: str = "denoising", progress: bool = True):
        """Path patching: each sender's effect on the metric through `receivers` only.

        Each sender (a pattern such as `head.*.*`) is patched from the source run with
        every other head (`freeze="heads"`; `"all"` adds MLP outputs, `"none"`
        freezes nothing) held at its target-run value; the receivers' values in that
        run (`head.L.H`: through its queries, keys and values; `pattern.L.H`: through
        queries and keys; `resid_post.L`: through the residual stream) are then
        patched alone into the target run, and the metric measured. Other arguments
        as in `patch`. Returns a `Result` over the senders' grid.
        """
        self._needs_local("path_patch")
        from .patching import path_patch

        return path_patch(self, clean, corrupt, senders, receivers, answer=answer, wrong=wrong,
                          metric=metric, normalize=normalize, freeze=freeze,
                          batch_size=batch_size, direction=direction, progress=progress)

    # -- gradients ----------------------------------------------------------------

    def gim(self, freeze_norm: bool = True, softmax_temperature: float = 2.0, q_scale: float = 0.25,
            k_scale: float = 0.25, v_scale: float = 0.5, gate_scale: float = 0.5, up_scale: float = 0.5):
        """`with model.gim():` GIM's backward rules on the live model; forward unchanged.

        Norm statistics frozen, the attention softmax's gradient taken at temperature
        `softmax_temperature`, gradients into Q, K, V and the gated MLP's gate and up
        branches scaled. Everything is restored when the block ends. See `mechnb.gim`.
        """
        self._needs_local("gim")
        from .gim import GIM, GIMRules

        return GIM(self, GIMRules(freeze_norm, softmax_temperature, q_scale, k_scale, v_scale,
                                  gate_scale, up_scale))

    def attribute(self, prompt: str, target=None, method: str = "gim", steps: int = 20, baseline=None,
                  sites=None):
        """Attribution of the target token's logit to every input token.

        `method`: `gim`, `gradient`, `grad_x_input` or `integrated_gradients` (with
        `steps` and a `baseline` embedding, default zeros); `target`: a token string
        or id (default: the top prediction). Returns a `Result` (`pos`, `token`,
        `value`) shown as coloured tokens. `sites=` (`head.*.*`, `mlp_out.*`) attributes
        to components instead (value . gradient per site). See `mechnb.attribution`.
        """
        self._needs_local("attribute")
        from .attribution import attribute

        return attribute(self, prompt, target=target, method=method, steps=steps, baseline=baseline,
                         sites=sites)

    def circuit(self, clean, corrupt, answer, wrong=None, method: str = "eap-ig", level: str = "edge",
                steps: int = 5, metric="logit_diff", batch_size: int | None = None):
        """Score every edge (or node) of the model's graph for a clean/corrupt task.

        Args:
            clean, corrupt: a prompt each, or equal-length lists of pairs (scores average
                over pairs). A pair must tokenize to one length; pairs may differ.
            answer, wrong: single-token answers (one for all pairs or one per pair), or
                sets of single tokens (`{" 5", " 6"}`: logit_diff uses their mean logit,
                prob and prob_diff their summed probability).
            method: `eap`, `eap-ig` (integrated over `steps` inputs from corrupt to
                clean), `gim` (eap under GIM's backward rules) or `exact` (node
                patching, `level="node"` only). See `mechnb.circuits.discover`.
            level: `edge` (each writer into each head's q, k, v input, MLP, logits) or
                `node` (heads and MLPs).
            metric: `logit_diff`, `prob`, `logprob`, `prob_diff`, `kl` or a function of
                the last position's logits (`batch vocab -> batch`).
            batch_size: prompt pairs per forward (default 8; rows per forward for
                `exact`); a chunk that runs out of memory is halved and run again.

        Returns:
            A `Circuit`: `.scores` (`upstream downstream`, NaN where no edge; `upstream`
            at node level), `.df`, `.top(n)`, `.plot()`, `.faithfulness()`, `.save()`.
            Example: `model.circuit(clean, corrupt, " Mary", " John").top("2%")`.
        """
        self._needs_local("circuit")
        from .circuits.discover import discover

        return discover(self, clean, corrupt, answer, wrong, method=method, level=level, steps=steps,
                        metric=metric, batch_size=batch_size)

    # -- seeing inside ---------------------------------------------------------

    def attention(self, prompts, layers=None, heads=None):
        """Attention patterns `layer head pos_q pos_k` of a prompt, as circuitsvis views.

        `layers` / `heads`: None (all), an int, a list, or a range string `"20:26"`.
        Shown per layer as circuitsvis `AttentionHeads` with the real tokens.
        """
        self._needs_local("attention")
        from .views import attention

        return attention(self, prompts, layers=layers, heads=heads)

    def activations(self, site_or_direction, prompts, site: str | None = None):
        """Tokens coloured by a neuron, a head (its output norm) or a direction.

        `site_or_direction`: a site (`neuron.12.301`, `head.9.6`) or a `d_model`
        vector, read off the residual site `site`. Returns a `Result` with values
        `batch pos`, shown as circuitsvis `ColoredTokens` / `TextNeuronActivations`.
        """
        from .views import activations

        return activations(self, site_or_direction, prompts, site=site)

    def logit_lens(self, prompt: str, k: int = 1):
        """Every layer's residual decoded through the final norm and unembedding.

        Returns a `Result`: `.values` `layer pos`, the probability of the right next
        token (of the model's final prediction at the last position); `.df` has
        `layer`, `pos`, `token`, `top_token`, `prob`; shown as an annotated heatmap.
        """
        self._needs_local("logit_lens")
        from .lens import logit_lens

        return logit_lens(self, prompt, k=k)

    def dla(self, prompt: str, answer, wrong=None):
        """Direct logit attribution of `answer` (minus `wrong`) to every head and MLP.

        Returns a `Result` with values `layer (head + 1)`, the last column the MLP;
        `.meta` has the embedding, bias and total terms, which sum to the logit
        difference.
        """
        self._needs_local("dla")
        from .lens import dla

        return dla(self, prompt, answer, wrong=wrong)

    def detect_heads(self, kind="induction", n_samples: int = 8, seq_len: int = 24, seed: int = 0,
                     batch_size: int | None = None):
        """Induction, previous-token and duplicate-token scores in [0, 1] per layer and head.

        `kind` is one of them or a list. `batch_size`: sequences per forward (default
        all; halved when a chunk runs out of memory). Returns a `Result` (`layer head`,
        or `kind layer head`); `.meta` has the loss on the first and repeated halves.
        """
        self._needs_local("detect_heads")
        from .heads import detect_heads

        return detect_heads(self, kind, n_samples=n_samples, seq_len=seq_len, seed=seed,
                            batch_size=batch_size)

    # -- sparse autoencoders ------------------------------------------------------

    def collect(self, site, texts, n_tokens: int, batch_size: int | None = None, context: int = 128,
                store=None, progress: bool = True):
        """Activations of `site` over `texts` (strings, or a datasets Dataset with `text`).

        Runs the model only up to the site's layer, drops padding and a leading BOS,
        and returns a `mechnb.sae.ActivationStore` of `n_tokens` rows, in memory or,
        with `store=path`, memory-mapped on disk and resumable. See `mechnb.sae.store`.

        Args:
            site: one per-token site (`resid_post.12`, `mlp_out.3`, `neuron.5`, `head.9.6`).
            texts: strings, lists of token ids (one window each), or a Dataset with `text`.
            n_tokens: rows to keep.
            batch_size: windows per forward (default 16); each batch's values move to
                CPU (or to the file) as it finishes, and a batch that runs out of
                memory is halved and run again.
            context: tokens per window.
            store: a directory for a memory-mapped store (`acts.f32`), written batch
                by batch and resumable; None keeps the rows in memory.
            progress: a progress bar when it takes more than two seconds.

        Returns:
            An `ActivationStore` of `n_tokens width` float32 rows. Example:
            `model.collect("resid_post.12", texts, 100_000, store="acts/")`.
        """
        self._needs_local("collect")
        from .sae.store import collect

        return collect(self, site, texts, n_tokens, batch_size=batch_size, context=context,
                       store=store, progress=progress)

    def features(self, prompt: str, sae, k: int = 5):
        """The `k` most active features of `sae` at each token of `prompt` (a `Result`)."""
        self._needs_local("features")
        from .sae.dashboard import features

        return features(self, prompt, sae, k=k)

    @property
    def saes(self) -> list:
        """The attached SAEs."""
        from .sae.attach import Splice

        return [i.sae for i in self.interventions if isinstance(i, Splice)]

    def attach(self, sae, site=None, name: str | None = None):
        """Splice an SAE in at `site` (default its own): its features become sites `sae.L.F`."""
        self._needs_local("attach")
        from .sae.attach import attach

        return attach(self, sae, site=site, name=name)

    def detach(self, sae) -> None:
        """Remove an attached SAE and the interventions on its features."""
        from .sae.attach import detach

        detach(self, sae)

    def sae_at(self, site, required: bool = True):
        """The attached SAE a feature site (`sae.12.5`, `sae.NAME.5`) refers to."""
        from .sites import parse

        site = parse(site)
        for sae in self.saes:
            if sae.name == site.layer or parse(sae.site).layer == site.layer:
                return sae
        if required:
            raise SiteError(f"no SAE attached for {site}: attached are {[s.name for s in self.saes]}")
        return None

    def _rewrap(self) -> None:
        """Wrap the HF model in nnsight again, so new submodules (an SAE) are traceable."""
        import nnsight

        self.nn = nnsight.TransformersModel(self.hf, tokenizer=self.tokenizer)

    def explore(self, prompt: str = "When Mary and John went to the store, John gave a drink to",
                answer: str | None = " Mary", wrong: str | None = " John"):
        """An interactive explorer widget: next tokens, attention, live head ablation."""
        self._needs_local("explore")
        from .widgets import Explorer

        return Explorer(self, prompt, answer=answer, wrong=wrong)

    # -- one-call methods ---------------------------------------------------

    def top(self, prompt: str, k: int = 10):
        """The k most likely next tokens after `prompt`.

        Returns:
            A DataFrame with columns `rank` (1 = most likely), `token`, `token_id`,
            `prob`, `logit`, sorted by probability. Example: `model.top("The sky is", 5)`.
        """
        import pandas as pd
        import torch

        if not isinstance(prompt, str):
            raise TraceError(f"top takes one prompt string, got {type(prompt).__name__}")
        if not isinstance(k, int) or k < 1:
            raise TraceError(f"k must be a positive int, got {k!r}")
        k = min(k, self.vocab_size)
        import nnsight

        found = []
        with self.trace(prompt):
            found.append(self["logits@-1"].save())
            # Saved as a whole so that a remote run (mechnb.remote) sends the list back.
            nnsight.save(found)
        logits = found[0][0].float().cpu()
        probs = torch.softmax(logits, dim=-1)
        top = probs.topk(k)
        ids = top.indices.tolist()
        return pd.DataFrame({
            "rank": range(1, k + 1),
            "token": [self.tokenizer.decode([i]) for i in ids],
            "token_id": ids,
            "prob": top.values.tolist(),
            "logit": logits[top.indices].tolist(),
        })

    def cache(self, prompts, sites, batch_size: int | None = None):
        """Run the model and keep the values of `sites`.

        Args:
            prompts: a string or a list of strings (padded on the right; the cache
                knows each prompt's real length).
            sites: a site string or a list of them (ranges such as `resid_pre.*`
                allowed). Each is stored whole; index and positions apply on lookup.
            batch_size: prompts per forward (default: all in one). In several chunks,
                each chunk's values move to CPU as it finishes, so the device holds
                one chunk; a chunk that runs out of memory is halved and run again.

        Returns:
            A `mechnb.cache.Cache`: `cache["resid_pre.5"]` is `batch pos d_model`,
            `cache["pattern.3"]` `batch head pos_q pos_k`, `cache["head.9.6"]`
            `batch pos d_head`, `cache["neuron.4.17"]` `batch pos`, `cache["logits"]`
            `batch pos vocab`. Example: `model.cache(prompts, "resid_post.*", batch_size=32)`.
        """
        from .cache import cache

        return cache(self, prompts, sites, batch_size=batch_size)


class _Scoped:
    """Removes the interventions it was given when its `with` block ends, however it ends."""

    def __init__(self, model, interventions):
        self.model, self.interventions = model, interventions

    def __enter__(self):
        return self.interventions

    def __exit__(self, *exc) -> None:
        self.model.remove(self.interventions)
