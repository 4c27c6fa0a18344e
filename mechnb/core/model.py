"""The model base: a causal language model wrapped for interpretability, and its state.

`ModelBase` holds what every method works on: the transformers model (`.hf`), wrapped in
an nnsight `TransformersModel` (`.nn`), its tokenizer, its architecture map (`.arch`)
and the attention hook points that give every site of `mechnb.core.sites` a module; and
the state a session changes: the persistent interventions, the active weight edits, the
attached SAEs (as interventions) and the running trace. It offers the core verbs: read
and write sites in a trace, cache sites, the next-token table, and add or remove
interventions. Every method (patching, circuits, SAEs, ...) lives in its own module and
is a method of `mechnb.Model`, this class's subclass (see `mechnb.model`).

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

Any other `torch.nn.Module` (`ModelBase(module, plain=True)`, what `mechnb.load(module)`
makes) is wrapped in nnsight's plain `NNsight`: its sites are its module paths
(`fc1.output`, `output`), its prompts tensors (`mechnb.core.modules`), and the methods
that need a transformer of the architecture table raise one `ModelError` line
(`require_transformer`, `@transformer_only`; `@language_only` methods too).

Gotchas: attention always runs through mechnb's eager function (`mechnb.core.hookpoints`),
so patterns are real probabilities even if the model was loaded for `sdpa`. State is
changed only through the methods here (`add`, `remove`, `clear`, `weight_edits`,
`attach_module`): no method reaches into another's private attributes.
"""

from __future__ import annotations

import weakref

from .errors import ArgumentError, InterventionError, PromptError, SiteError, TraceError
from .interventions import Scoped


class _Registry(weakref.WeakSet):
    """The models alive in this process. A remote trace pickles mechnb's code by value, with
    the globals it reads: the registry travels empty (the models it holds, their modules
    included, stay here; NDIF could not resolve them)."""

    def __reduce__(self):
        return _Registry, ()


_LIVE = _Registry()


def live_models() -> list:
    """The models (`ModelBase` and subclasses) alive in this process."""
    return list(_LIVE)


def language_only(method):
    """Mark a method (a function of the model) that works on tokens only: on a vision model
    or a plain torch module it raises one `ModelError` line (`ModelBase.require_language`)
    before anything runs."""
    import functools

    @functools.wraps(method)
    def checked(model, *args, **kwargs):
        model.require_language(method.__name__)
        return method(model, *args, **kwargs)

    return checked


def transformer_only(method):
    """Mark a method that needs a transformer of the architecture table (layers, heads, a
    residual stream; language or vision): on a plain torch module it raises one `ModelError`
    line (`ModelBase.require_transformer`) before anything runs."""
    import functools

    @functools.wraps(method)
    def checked(model, *args, **kwargs):
        model.require_transformer(method.__name__)
        return method(model, *args, **kwargs)

    return checked


class ModelBase:
    """A causal LM ready for interpretability: sites, traces, caches, interventions.

    Args:
        hf_model: a transformers causal LM of a supported architecture.
        tokenizer: its tokenizer.
        name: a label for displays (default: the config's name or model type).
        remote: run every trace on NDIF, on the hub model named by
            `hf_model.name_or_path`; `hf_model` is then only its structure (on the
            `meta` device, as `mechnb.load(name, remote=True)` builds it), and methods
            that need the weights here raise `RemoteError` (see `mechnb.core.remote`).

        plain: wrap any `torch.nn.Module` (`tokenizer` None): its sites are its module
            paths, its inputs tensors (see `mechnb.core.modules`).
        example: for a plain module, an input run once (a tensor, a tuple or a dict, as
            the forward takes): `info()` shows each module's output shape, and sites are
            read in the order this forward computes them.

    A model spread over devices by accelerate (`from_pretrained(device_map=...)` or
    `accelerate.dispatch_model`) works as it is; see `mechnb.core.devices`.
    Example: `ModelBase(torch.nn.Sequential(...), plain=True, example=torch.zeros(1, 4))`.
    """

    def __init__(self, hf_model, tokenizer=None, name: str | None = None, remote: bool = False,
                 plain: bool = False, example=None):
        from .arch import arch_for, plain_arch
        from .hookpoints import install

        self.arch = plain_arch(hf_model) if plain else arch_for(hf_model.config).rooted(hf_model)
        hf_model.eval()
        self.remote = bool(remote)
        self.hf = hf_model
        # A plain module's output shape and execution rank of each site, from the example forward.
        self.shapes: dict[str, tuple] = {}
        self.execution_order: dict[str, int] = {}
        if plain:
            from .modules import ModuleReader

            if self.remote:
                from .errors import RemoteError

                raise RemoteError("remote=True runs hub models on NDIF; a torch module you built runs here: "
                                  "drop remote=True")
            tokenizer = ModuleReader()
        elif self.remote:
            from .remote import wrap

            # NDIF runs the stock model: no hook points, no attention function of ours.
            self.nn = wrap(hf_model, tokenizer)
        elif not plain:
            from . import residual

            install(hf_model, self.arch)
            residual.install(hf_model, self.arch, self.arch.resid_mid_for(hf_model.config))
        if self.arch.vision:
            from .images import ImageReader

            # The image reader plays the tokenizer's part: `Batch.of` hands it the images.
            tokenizer = ImageReader(self.arch, hf_model.config, tokenizer)
        self.tokenizer = tokenizer
        if not self.remote:
            self._rewrap()
        self.name = name or getattr(getattr(hf_model, "config", None), "_name_or_path", "") or self.arch.name
        from .edits import WeightEdits

        self.weight_edits = WeightEdits()
        self._trace = None
        self._context = None  # set only by `mechnb.core.engine.run`
        self._installed: list = []  # (intervention, torch hook handle), in order added
        if plain and example is not None:
            from .modules import record

            self.shapes, self.execution_order = record(self, example)
        _LIVE.add(self)

    # -- dimensions ---------------------------------------------------------

    @property
    def config(self):
        """The transformers config (a plain module has none: `ModelError`)."""
        self.require_transformer("config")
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
        """Tokens a language model predicts over; an image classifier's number of classes."""
        if self.arch.vision:
            return self.n_classes or 0
        return self.config.vocab_size

    @property
    def reads_images(self) -> bool:
        """True for a vision model (inputs are images; positions `[CLS]` and patches)."""
        return self.arch.vision

    @property
    def n_classes(self) -> int | None:
        """An image classifier's number of classes (None for a language model or a backbone)."""
        return self.config.num_labels if self.arch.vision and self.arch.unembed else None

    @property
    def classes(self) -> list[str]:
        """An image classifier's class names, by index (`config.id2label`)."""
        labels = getattr(self.config, "id2label", None) or {}
        return [str(labels.get(i, labels.get(str(i), i))) for i in range(self.n_classes or 0)]

    @property
    def is_plain(self) -> bool:
        """True for a plain torch module (sites are module paths; see `mechnb.core.modules`)."""
        return self.arch.plain

    def require_transformer(self, method: str) -> None:
        """`ModelError` when this is a plain torch module: `method` needs a transformer of
        the architecture table (`mechnb.core.arch.ARCHS`)."""
        if self.arch.plain:
            from .arch import SUPPORTED_MODEL_TYPES
            from .errors import ModelError

            raise ModelError(f"{method} needs a transformer from the architecture table ({', '.join(SUPPORTED_MODEL_TYPES)}); "
                             f"{self.name} is a plain torch module, whose sites are its module paths: use trace, "
                             "cache, ablate, hook and steer on them (model.info() lists them)")

    def require_language(self, method: str) -> None:
        """`ModelError` when this is a vision model or a plain module: `method` works on tokens only."""
        if self.arch.plain:
            from .errors import ModelError

            raise ModelError(f"{method} needs a language model; {self.name} is a plain torch module, which "
                             "reads tensors, not tokens: use trace, cache, ablate, hook and steer on its module "
                             "paths (model.info() lists them)")
        if self.arch.vision:
            from .errors import ModelError

            raise ModelError(f"{method} needs a language model; {self.name} is a {self.arch.name} image "
                             f"{'classifier' if self.n_classes else 'model'}, which reads images, not tokens")

    @property
    def device(self):
        """The device inputs go to: the embedding's (CPU for a remote model). A model
        spread by `device_map` computes each layer on its own device (`devices`)."""
        import torch

        from .devices import input_device

        if self.remote:
            return torch.device("cpu")
        if self.arch.plain:
            from .devices import execution_device

            return execution_device(self.hf) or torch.device("cpu")
        return input_device(self.hf)

    @property
    def devices(self) -> list[str]:
        """Every device the model runs on, in model order (`"disk"` for offloaded layers)."""
        from .devices import devices

        return ["ndif"] if self.remote else devices(self.hf)

    @property
    def dtype(self):
        import torch

        return next(self.hf.parameters(), torch.empty(0)).dtype

    @property
    def parallel_attn_mlp(self) -> bool:
        """True when attention and MLP read the same residual (no `resid_mid`)."""
        return self.arch.resid_mid_for(self.config) is None

    @property
    def resid_mid_path(self) -> str:
        """The module (relative to a layer) whose input is `resid_mid`."""
        return self.arch.resid_mid_for(self.config)

    @property
    def context(self):
        """The `Context` of the forward now running (its prompts' tokens), or None."""
        return self._context

    def info(self) -> dict:
        """Dimensions, device, dtype and memory of the model, as a dict. A plain module's
        has no dimensions but `modules`: a DataFrame of its module paths (`path`, `kind`,
        `output` shape, known when it was loaded with `example=`)."""
        n_params = sum(p.numel() for p in self.hf.parameters())
        n_bytes = sum(p.numel() * p.element_size() for p in self.hf.parameters())
        if self.arch.plain:
            from .modules import table

            return {
                "name": self.name,
                "architecture": f"plain torch module ({self.arch.name})",
                "modules": table(self),
                "parameters": f"{n_params / 1e6:.3g} M",
                "device": self._where(),
                "dtype": str(self.dtype).removeprefix("torch."),
                "memory": f"{n_bytes / 2**20:.2g} MiB",
            }
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

    def require_local(self, method: str) -> None:
        """`RemoteError` when this model is remote: `method` (a key of
        `mechnb.core.remote.UNAVAILABLE`) needs the model in this process."""
        if self.remote:
            from .remote import unavailable

            raise unavailable(method)

    def __repr__(self) -> str:
        if self.arch.plain:
            return f"<mechnb.Model {self.name}: a plain torch module ({self.arch.name}), on {self._where()}>"
        return (f"<mechnb.Model {self.name}: {self.arch.name}, {self.n_layers} layers, "
                f"{self.n_heads} heads, d_model {self.d_model}, on {self._where()}>")

    # -- tokens -------------------------------------------------------------

    def tokens(self, prompt) -> list[str]:
        """The prompt's token strings, as positions count them (an image's position labels)."""
        from .batch import Batch

        self.require_transformer("tokens")
        return Batch.of(self.tokenizer, prompt).tokens[0]

    # -- traces -------------------------------------------------------------

    def trace(self, prompts, grad: bool = False):
        """A `with` block running the model on `prompts`; read and write sites inside it.

        Args:
            prompts: a string or a list of strings (padded on the right).
            grad: keep autograd on (off by default).

        Returns:
            A `mechnb.core.trace.Trace`; `.batch` has the tokens. Inside the block,
            `model[site]` reads (call `.save()` to keep it) and `model[site] = v` writes.
            On a remote model the block runs on NDIF (see `mechnb.core.remote`).
        """
        if grad:
            self.require_local("trace(grad=True)")
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
    # mechnb is not installed (see `mechnb.core.remote`).
    def __getitem__(self, site):
        return self._active(site).read(site)

    def __setitem__(self, site, value) -> None:
        self._active(site).write(site, value)

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
            A `mechnb.core.cache.Cache`: `cache["resid_pre.5"]` is `batch pos d_model`,
            `cache["pattern.3"]` `batch head pos_q pos_k`, `cache["head.9.6"]`
            `batch pos d_head`, `cache["neuron.4.17"]` `batch pos`, `cache["logits"]`
            `batch pos vocab`. Example: `model.cache(prompts, "resid_post.*", batch_size=32)`.
        """
        from .cache import cache

        return cache(self, prompts, sites, batch_size=batch_size)

    def top(self, prompt: str, k: int = 10):
        """The k most likely next tokens after `prompt` (a string, or its token ids `1 pos`, such as
        a graph's `input_ids`; for an image classifier: the k most likely classes of one image,
        `prompt` an image).

        Returns:
            A DataFrame with columns `rank` (1 = most likely), `token`, `token_id`,
            `prob`, `logit`, sorted by probability (a classifier's: `rank`, `class`,
            `class_id`, `prob`, `logit`). Example: `model.top("The sky is", 5)`.
        """
        import nnsight
        import pandas as pd
        import torch

        from .checks import is_int

        self.require_transformer("top")
        if self.reads_images:
            from .images import top_classes

            return top_classes(self, prompt, k)
        if not isinstance(prompt, str) and not (torch.is_tensor(prompt) and prompt.ndim == 2 and len(prompt) == 1):
            raise PromptError(f"top takes one prompt string (or its token ids, 1 x pos), got {type(prompt).__name__}")
        if not is_int(k) or k < 1:
            raise ArgumentError(f"k, the tokens listed, must be a positive int, got {k!r}")
        k = min(k, self.vocab_size)
        found = []
        with self.trace(prompt):
            found.append(self["logits@-1"].save())
            # Saved as a whole so that a remote run (mechnb.core.remote) sends the list back.
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

    # -- persistent interventions ---------------------------------------------

    @property
    def interventions(self) -> list:
        """The active interventions, in the order they apply."""
        return [intervention for intervention, _ in self._installed]

    @property
    def unmodified(self) -> bool:
        """True when the model computes what its weights as loaded compute: no active
        intervention or weight edit, and no trace or mechnb forward running."""
        return not self._installed and not self.edits and self._trace is None and self._context is None

    def interventions_table(self):
        """The active interventions as a DataFrame (`#`, kind, site, detail)."""
        import pandas as pd

        rows = [{"#": i, **intervention.describe()} for i, intervention in enumerate(self.interventions)]
        return pd.DataFrame(rows, columns=["#", "kind", "site", "detail"])

    def add(self, interventions) -> list:
        """Activate interventions (an `Intervention` or a list); returns them."""
        self.require_local("add")
        from .interventions import Intervention, install

        items = [interventions] if isinstance(interventions, Intervention) else list(interventions)
        for intervention in items:
            self._installed.append((intervention, install(self, intervention)))
        return items

    def remove(self, interventions) -> None:
        """Deactivate the given interventions (others stay)."""
        from .interventions import Intervention

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

    def clear(self, kind: str | None = None) -> None:
        """Remove every active intervention (the model is as loaded), or every one of a
        `kind`: `"ablate"`, `"hook"`, `"steer"`, `"sae"` or `"transcoder"` (`model.clear("steer")`)."""
        from .interventions import KINDS

        if kind is not None and kind not in KINDS:
            raise InterventionError(f"unknown intervention kind {kind!r}: use one of {', '.join(KINDS)}, "
                                    "or no kind to remove them all")
        self.remove([i for i in self.interventions if kind is None or i.kind == kind])

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
        self.require_local("ablate")
        from .interventions import ablations

        return self.add(ablations(self, sites, mode, ref, positions, seed))

    def hook(self, site, fn) -> list:
        """Run `fn(value) -> value` on a site's value in every forward, until removed.

        `value` is the part the site names (`head.9.6@-1` gives `batch d_head`).
        Returns the `Hook` interventions added (one per site of a range).
        """
        self.require_local("hook")
        from .interventions import Hook
        from .sites import parse

        if not callable(fn):
            raise InterventionError(f"hook takes a function of the site's tensor, got {type(fn).__name__}")
        return self.add([Hook(concrete, fn=fn) for concrete in parse(site).expand(self)])

    def ablated(self, *args, **kwargs) -> Scoped:
        """`with model.ablated(...):` the ablations `ablate(...)` makes (the same arguments),
        active inside the block only."""
        return Scoped(self, self.ablate(*args, **kwargs))

    def hooked(self, *args, **kwargs) -> Scoped:
        """`with model.hooked(site, fn):` the hook `hook(site, fn)` adds, inside the block only."""
        return Scoped(self, self.hook(*args, **kwargs))

    # -- weight edits and attached modules -------------------------------------------

    @property
    def edits(self) -> list:
        """The active weight edits (`mechnb.methods.rome.WeightEdit`), oldest first."""
        return list(self.weight_edits)

    @property
    def saes(self) -> list:
        """The attached SAEs (each attached by an intervention of kind `sae`)."""
        return [i.sae for i in self.interventions if i.kind == "sae"]

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

    @property
    def transcoder_sets(self) -> list:
        """The attached transcoder sets (`mechnb.transcoders.splice`), oldest first."""
        found = []
        for intervention in self.interventions:
            if intervention.kind == "transcoder" and all(t is not intervention.tcs for t in found):
                found.append(intervention.tcs)
        return found

    def transcoders_at(self, site):
        """The attached transcoder set a concrete feature site (`tc.14.5`, `tc.NAME.14.5`) refers to."""
        from .sites import parse

        site = parse(site)
        for tcs in self.transcoder_sets:
            if (site.owner is None or tcs.name == site.owner) and site.layer in tcs:
                return tcs
        raise SiteError(f"no attached transcoder set covers {site}: attached are "
                        f"{[t.name for t in self.transcoder_sets]}")

    def attach_module(self, path: str, name: str, module) -> None:
        """Add `module` as submodule `name` of the module at `path` (an attached SAE), so
        that traces see it: the nnsight wrapper is rebuilt around the changed model."""
        self.attach_modules([(path, name, module)])

    def attach_modules(self, placements) -> None:
        """`attach_module` for several `(path, name, module)`, the wrapper rebuilt once."""
        from .arch import submodule

        for path, name, module in placements:
            submodule(self.hf, path).add_module(name, module)
        self._rewrap()

    def detach_module(self, path: str, name: str) -> None:
        """Remove submodule `name` of the module at `path` (see `attach_module`)."""
        self.detach_modules([(path, name)])

    def detach_modules(self, placements) -> None:
        """`detach_module` for several `(path, name)`, the wrapper rebuilt once."""
        from .arch import submodule

        for path, name in placements:
            delattr(submodule(self.hf, path), name)
        self._rewrap()

    def _rewrap(self) -> None:
        import nnsight

        if self.arch.vision or self.arch.plain:
            # nnsight's TransformersModel builds a pipeline, which wants an image processor:
            # the plain wrapper runs any module on its inputs.
            self.nn = nnsight.NNsight(self.hf)
        else:
            self.nn = nnsight.TransformersModel(self.hf, tokenizer=self.tokenizer)
