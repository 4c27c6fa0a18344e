"""The reliability battery: bad input to every magic and every public API call.

Each case throws one bad input and checks two things:

1. a clear mechnb error: a `MechnbError` of the expected kind whose one-line message
   names what was wrong and what is valid (through the magics: one printed line, no
   traceback), never a raw TypeError, IndexError, KeyError, AttributeError or
   RuntimeError from torch, nnsight or Python;
2. a clean model (`Guard.assert_clean`): the interventions it had, no hook left on any
   module nor among torch's global hooks, no `mechnb_*` attribute left on a module, the
   same modules and nnsight wrapper, weights and `.grad` untouched, no trace open, and
   the next forward's logits, plain and traced, equal to a clean forward's, bit for bit.

Inputs that are unusual but meaningful (unicode and HTML in prompts, multi-token
answers where the first token is used, NaN written in one trace) must work, and any
HTML they produce must keep the prompt's markup escaped. Interrupted sweeps
(KeyboardInterrupt from a metric, a hook, a progress bar or a stream callback) must
leave the model clean too.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

import mechnb
from conftest import PARIS, PROMPT, clean_logits
from mechnb import (ArgumentError, CausalError, CausalTraceError, CircuitError, CoactivationError, EditError, GenerationError,
                    HeadError, InterventionError, LensError, MechnbError, MetricError, ModelError, PatchError,
                    PromptError, SAEError, SiteError, SteerError, StoreError, TraceError, ViewError, WeightError)
from mechnb.core.interventions import Intervention
from mechnb.sae import SAE

CORRUPT = PROMPT.replace("John gave", "Mary gave")
EVIL = "<script>alert(1)</script> café 日本語 🙂"
RAW_MARKUP = "<script>alert(1)"
NAN = torch.full((32,), float("nan"))
ONE_INF = torch.ones(32).index_fill(0, torch.tensor([3]), float("-inf"))
ANSWERS = dict(answer=" Mary", wrong=" John")
QUIET = dict(progress=False)

HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


# -- the model's state: what a failed call must leave as it found it ---------------------


def traced_logits(model) -> torch.Tensor:
    """The logits of PROMPT through a mechnb trace (nnsight), as every method runs."""
    return model.cache(PROMPT, "logits")["logits"]


def module_hooks(model) -> dict:
    """Every hook registered on every module (and parameter), by module name."""
    found = {}
    for name, module in model.hf.named_modules():
        found[name] = tuple(tuple(getattr(module, table, {}) or {}) for table in HOOK_TABLES)
    for name, parameter in model.hf.named_parameters():
        found["param " + name] = tuple(parameter._backward_hooks or {})
    return found


def global_hooks() -> dict:
    """torch's hooks on every module (`register_module_forward_hook` and kin)."""
    import torch.nn.modules.module as module_module

    return {name: tuple(value) for name, value in vars(module_module).items()
            if name.startswith("_global_") and isinstance(value, dict)}


def mechnb_attributes(model) -> dict:
    """The `mechnb_*` attributes (records, prefixes, GIM rules, splits) on every module."""
    return {name: sorted(k for k in vars(module) if k.startswith("mechnb_"))
            for name, module in model.hf.named_modules()}


class Baseline:
    """A model's clean state, taken once per model: weights, modules and logits."""

    def __init__(self, model):
        self.weights = {k: v.detach().clone() for k, v in model.hf.state_dict().items()}
        self.modules = [name for name, _ in model.hf.named_modules()]
        self.plain = clean_logits(model)
        self.traced = traced_logits(model)


class Models:
    """The battery's models, built once and rebuilt only after a case left one dirty."""

    def __init__(self, factory):
        self.factory, self.built = factory, {}

    def get(self, name: str):
        if name not in self.built:
            model = self.factory(name)
            self.built[name] = (model, Baseline(model))
        return self.built[name]

    def discard(self, name: str) -> None:
        self.built.pop(name, None)


class Guard:
    """A model and its state before one case; `assert_clean()` checks it after the case."""

    def __init__(self, models: Models, name: str):
        self.name = name
        self.model, self.baseline = models.get(name)
        model = self.model
        self.interventions = list(model.interventions)
        self.hooks = module_hooks(model)
        self.global_hooks = global_hooks()
        self.attributes = mechnb_attributes(model)
        self.nn = model.nn
        self.checked = False

    def assert_clean(self) -> None:
        model, baseline = self.model, self.baseline
        assert model._trace is None and model.context is None, "a trace was left open"
        assert len(model.interventions) == len(self.interventions) and all(
            a is b for a, b in zip(model.interventions, self.interventions)), model.interventions
        assert module_hooks(model) == self.hooks, "hooks left on modules"
        assert global_hooks() == self.global_hooks, "global torch hooks left"
        assert mechnb_attributes(model) == self.attributes, "mechnb_* attributes left on modules"
        assert model.nn is self.nn, "the nnsight wrapper was replaced"
        assert [name for name, _ in model.hf.named_modules()] == baseline.modules, "modules added"
        assert model.edits == [] and model.weight_edits._base == {}, "a weight edit was left"
        assert torch.is_grad_enabled() and not model.hf.training, "autograd or training mode switched"
        assert model.hf.config._attn_implementation == "mechnb"
        assert all(p.grad is None for p in model.hf.parameters()), "gradients left on weights"
        for key, value in model.hf.state_dict().items():
            assert torch.equal(value, baseline.weights[key]), f"weight {key} changed"
        assert torch.equal(clean_logits(model), baseline.plain), "the next plain forward differs"
        assert torch.equal(traced_logits(model), baseline.traced), "the next traced forward differs"
        self.checked = True


@pytest.fixture(scope="module")
def models(tiny_factory):
    return Models(tiny_factory)


@pytest.fixture
def guard(models):
    """`guard(name)` -> a `Guard` of the battery's model `name`; a model left unchecked
    (its case failed) is rebuilt for the next case, so one failure stays one failure."""
    made = []

    def make(name: str = "llama") -> Guard:
        made.append(Guard(models, name))
        return made[-1]

    yield make
    for each in made:
        if not each.checked:
            models.discard(each.name)


def assert_clear(error: BaseException, kind: type, texts) -> None:
    """A mechnb error of `kind`, one line, holding every text in `texts`."""
    message = str(error)
    assert isinstance(error, MechnbError) and isinstance(error, kind), (type(error), message)
    assert "\n" not in message and 20 < len(message) < 800, message
    for text in texts:
        assert text in message, (text, message)


# -- helpers for the cases ---------------------------------------------------------------


def random_sae(d_in: int = 32, site: str | None = "resid_post.1", seed: int = 0) -> SAE:
    """A topk SAE with random weights that fire (no training: these cases need no quality)."""
    torch.manual_seed(seed)
    sae = SAE(d_in, 16, kind="topk", k=2, site=site)
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.W_dec.normal_()
        sae.b_enc.fill_(1.0)
    return sae


_circuits: dict = {}


def circuit_of(model):
    """One small eap circuit per model (computed on first use)."""
    if _circuits.get(id(model), (None,))[0] is not model:
        _circuits[id(model)] = (model, model.circuit(PROMPT, CORRUPT, " Mary", " John", method="eap"))
    return _circuits[id(model)][1]


def load_broken_sae(cfg: str, weights: bytes = b"not safetensors"):
    """`mechnb.sae.load` of a directory laid out like an SAE whose files are broken as given."""
    with tempfile.TemporaryDirectory(prefix="mechnb-bad-sae-") as path:
        with open(os.path.join(path, "cfg.json"), "w") as file:
            file.write(cfg)
        with open(os.path.join(path, "sae_weights.safetensors"), "wb") as file:
            file.write(weights)
        return mechnb.sae.load(path)


def nested_traces(model):
    with model.trace(PROMPT):
        with model.trace(PROMPT):
            pass


def write_in_trace(model, site, value):
    with model.trace(PROMPT):
        model[site] = value
        model["logits"].save()


def read_out_of_order(model):
    with model.trace(PROMPT):
        model["resid_post.2"].save()
        model["resid_post.0"].save()


def steered_block(model, vector):
    with model.steered("resid_pre.1", vector):
        model.top(PROMPT)


def gim_block(model, **rules):
    with model.gim(**rules):
        model.top(PROMPT)


def case(model_name, call, kind, *texts, id):
    return pytest.param(model_name, call, kind, texts, id=id)


L = "llama"

# -- 1. prompts, sites, traces and caches -----------------------------------------------

TRACE_CASES = [
    case(L, lambda m: m.cache(None, "logits"), PromptError, "got NoneType", "non-empty list of strings",
         id="cache-prompt-None"),
    case(L, lambda m: m.cache(5, "logits"), PromptError, "got int 5", "a string or a non-empty list",
         id="cache-prompt-int"),
    case(L, lambda m: m.cache({"a": 1}, "logits"), PromptError, "got dict", "list of strings",
         id="cache-prompt-dict"),
    case(L, lambda m: m.cache([], "logits"), PromptError, "got an empty list", "non-empty list",
         id="cache-prompt-empty-list"),
    case(L, lambda m: m.cache(torch.tensor([[-5]]), "logits"), PromptError, "token id -5", "0 or more",
         id="cache-token-id-negative"),
    case(L, lambda m: m.cache(torch.tensor([[10 ** 7]]), "logits"), PromptError, "token id 10000000",
         "ids 0-49151", id="cache-token-id-huge"),
    case(L, lambda m: m.cache(PROMPT, None), SiteError, "not NoneType", "'resid_post.5'", id="cache-site-None"),
    case(L, lambda m: m.cache(PROMPT, "resid_post."), SiteError, "bad layer ''", "an int, a range",
         id="cache-site-missing-layer"),
    case(L, lambda m: m.cache(PROMPT, "resid_post.99"), SiteError, "layer 99 out of range", "layers 0-2",
         id="cache-layer-huge"),
    case(L, lambda m: m.cache(PROMPT, "head.1.99999999999999999999"), SiteError,
         "head 99999999999999999999 out of range", "heads 0-3", id="cache-head-huge"),
    case(L, lambda m: m.cache(PROMPT, "resid_post.1@x"), SiteError, "bad positions @x", "@-1",
         id="cache-bad-positions"),
    case(L, lambda m: m.cache(PROMPT, "resid_post.1")["resid_post.1@99"], SiteError, "position 99 out of range",
         "14 tokens", id="cache-position-huge"),
    case(L, lambda m: m.cache(PROMPT, "sae.1.2"), SiteError, "no SAE is attached", "model.attach(sae)",
         id="cache-sae-feature-without-sae"),
    case("gpt_neox", lambda m: m.cache(PROMPT, "resid_mid.1"), SiteError, "in parallel",
         "use resid_pre or resid_post", id="cache-resid-mid-of-parallel-neox"),
    case("gpt2", lambda m: m.cache("hello " * 200, "logits"), PromptError, "201 tokens", "128 positions",
         id="cache-gpt2-prompt-beyond-its-positions"),
    case(L, lambda m: m.top(PROMPT, k=0), ArgumentError, "k, the tokens listed, must be a positive int", "got 0",
         id="top-k-zero"),
    case(L, nested_traces, TraceError, "already running", "do not nest", id="trace-nested"),
    case(L, read_out_of_order, SiteError, "resid_post.0", "in the order the model computes them",
         id="trace-read-out-of-order"),
    case(L, lambda m: write_in_trace(m, "head.1.2", torch.ones(5)), SiteError, "shape (5,)",
         "broadcasts to (1, 14, 8)", id="trace-write-wrong-shape"),
    case(L, lambda m: write_in_trace(m, "head.1.2", "x"), SiteError, "cannot write str 'x'",
         "a number or a tensor", id="trace-write-string"),
]

# -- 2. interventions: ablate, hook, steer, remove ---------------------------------------

INTERVENTION_CASES = [
    case(L, lambda m: m.ablate(None), SiteError, "not NoneType", "'resid_post.5'", id="ablate-site-None"),
    case(L, lambda m: m.ablate("head.1.0", mode="average"), InterventionError, "unknown ablation mode 'average'",
         "zero, mean, resample", id="ablate-unknown-mode"),
    case(L, lambda m: m.ablate("head.1.0", mode="mean"), InterventionError, "needs reference prompts", "ref=[",
         id="ablate-mean-without-ref"),
    case(L, lambda m: m.ablate("head.1.0", mode="mean", ref=5), PromptError, "got int 5", "list of strings",
         id="ablate-mean-ref-int"),
    case(L, lambda m: m.ablate("head.1.0", mode="resample", ref=[PROMPT], seed="x"), InterventionError,
         "seed must be an int", "'x'", id="ablate-seed-string"),
    case(L, lambda m: m.ablate("logits"), SiteError, "ablating the logits", "ablate a component",
         id="ablate-logits"),
    case(L, lambda m: m.hook("head.1.0", 5), InterventionError, "hook takes a function", "got int",
         id="hook-not-callable"),
    case(L, lambda m: m.remove(5), InterventionError, "got 5", "model.interventions", id="remove-int"),
    case(L, lambda m: m.steer("resid_pre.1", NAN), SteerError, "NaN or infinite", "steering vector",
         id="steer-nan-vector"),
    case(L, lambda m: m.steer("resid_pre.1", ONE_INF), SteerError, "NaN or infinite", "steering vector",
         id="steer-vector-with-one-inf"),
    case(L, lambda m: m.steer("resid_pre.1", torch.ones(5)), SteerError, "shape (5,)", "steer with a (32,) vector",
         id="steer-vector-wrong-width"),
    case(L, lambda m: m.steer("resid_pre.1", torch.ones(32), scale=float("inf")), SteerError,
         "scale must be a number", "got inf", id="steer-scale-inf"),
    case(L, lambda m: m.steer("pattern.1", torch.ones(32)), SiteError, "pattern.1",
         "not a vector-valued site", id="steer-pattern-site"),
    case(L, lambda m: steered_block(m, NAN), SteerError, "NaN or infinite", "steering vector",
         id="steered-nan-vector"),
    case(L, lambda m: m.steering_vector(["a"], ["b"], "head.1.0"), SiteError, "'head.1.0'",
         "one residual-stream site", id="steering-vector-head-site"),
]

# -- 3. patching -------------------------------------------------------------------------


def patch(m, clean=PROMPT, corrupt=CORRUPT, sites="resid_pre.*", **options):
    return m.patch(clean, corrupt, sites, **{**ANSWERS, **QUIET, **options})


def path_patch(m, senders="head.0.*", receivers="head.2.1", clean=PROMPT, corrupt=CORRUPT, **options):
    return m.path_patch(clean, corrupt, senders, receivers, **{**ANSWERS, **QUIET, **options})


PATCH_CASES = [
    case(L, lambda m: patch(m, method="exactly"), PatchError, "unknown method 'exactly'", "exact, attribution",
         id="patch-unknown-method"),
    case(L, lambda m: patch(m, metric="accuracy"), MetricError, "unknown metric 'accuracy'", "logit_diff, prob",
         id="patch-unknown-metric"),
    case(L, lambda m: patch(m, answer=None), MetricError, "needs an answer token", "answer=' Mary'",
         id="patch-no-answer"),
    case(L, lambda m: patch(m, answer=10 ** 9), MetricError, "token id 1000000000 out of range", "ids 0-49151",
         id="patch-answer-id-huge"),
    case(L, lambda m: patch(m, corrupt="Hello"), PatchError, "different lengths (14 and 1)",
         "the same number of tokens", id="patch-pair-of-different-lengths"),
    case(L, lambda m: patch(m, clean=[PROMPT, "Hello world"], corrupt=[CORRUPT, "Hello there"],
                            per_position=True), PatchError, "lengths [14, 2]", "per_position=False",
         id="patch-per-position-pairs-of-different-lengths"),
    case(L, lambda m: patch(m, clean=5, corrupt=6), PatchError, "got int 5", "a string or a list of strings",
         id="patch-prompts-int"),
    case(L, lambda m: patch(m, sites=None), SiteError, "not NoneType", "'resid_post.5'", id="patch-sites-None"),
    case(L, lambda m: patch(m, sites=["resid_pre.*", "head.*.*"]), PatchError, "different shapes [(3,), (3, 4)]",
         "separate calls", id="patch-sites-of-different-grids"),
    case(L, lambda m: patch(m, corrupt=PROMPT, normalize=True), PatchError, "cannot normalize",
         "normalize=False", id="patch-normalize-equal-metrics"),
    case(L, lambda m: patch(m, batch_size=-2), MechnbError, "batch_size", "positive integer", "got -2",
         id="patch-batch-size-negative"),
    case(L, lambda m: patch(m, metric=lambda logits: logits), MetricError, "shape (1, 49152)",
         "one number per row", id="patch-metric-of-wrong-shape"),
    case(L, lambda m: path_patch(m, freeze="some"), PatchError, "unknown freeze 'some'", "heads, all, none",
         id="path-patch-unknown-freeze"),
    case(L, lambda m: path_patch(m, receivers=None), SiteError, "not NoneType", "'resid_post.5'",
         id="path-patch-receivers-None"),
    case(L, lambda m: path_patch(m, receivers="logits"), PatchError, "logits cannot be a receiver",
         "name heads", id="path-patch-receiver-logits"),
    case(L, lambda m: path_patch(m, corrupt="Hi"), PatchError, "different lengths (14 and 1)", "Reword",
         id="path-patch-pair-of-different-lengths"),
]

# -- 4. seeing inside: attention, activations, lens, dla, heads, explorer ----------------

VIEW_CASES = [
    case(L, lambda m: m.attention([]), PromptError, "got an empty list", "non-empty",
         id="attention-prompt-empty-list"),
    case(L, lambda m: m.attention(PROMPT, layers=99), ViewError, "layer 99 out of range", "layers 0-2",
         id="attention-layer-huge"),
    case(L, lambda m: m.attention(PROMPT, layers=1.5), ViewError, "got 1.5", "a non-empty list of ints",
         id="attention-layers-float"),
    case(L, lambda m: m.activations("neuron.1.5", None), PromptError, "got NoneType", "list of strings",
         id="activations-prompts-None"),
    case(L, lambda m: m.activations(torch.ones(5), PROMPT, site="resid_post.1"), ViewError, "shape (5,)",
         "d_model=32", id="activations-direction-wrong-width"),
    case(L, lambda m: m.activations(NAN, PROMPT, site="resid_post.1"), ViewError, "NaN or infinite",
         "finite d_model vector", id="activations-direction-nan"),
    case(L, lambda m: m.logit_lens(PROMPT, k=0), LensError, "got 0", "an int in 1-49152", id="lens-k-zero"),
    case(L, lambda m: m.logit_lens(PROMPT, k=10 ** 9), LensError, "got 1000000000", "1-49152", id="lens-k-huge"),
    case(L, lambda m: m.dla(PROMPT, 10 ** 9), MetricError, "token id 1000000000 out of range", "ids 0-49151",
         id="dla-answer-id-huge"),
    case(L, lambda m: m.detect_heads(None), HeadError, "unknown head kind None", "induction",
         id="heads-kind-None"),
    case(L, lambda m: m.detect_heads([]), HeadError, "needs a head kind", "induction", id="heads-kind-empty-list"),
    case(L, lambda m: m.detect_heads(seq_len=2.5), HeadError, "seq_len=2.5", "integers", id="heads-seq-len-float"),
    case("gpt2", lambda m: m.detect_heads(n_samples=1, seq_len=100), PromptError, "200 tokens", "128 positions",
         id="heads-sequences-beyond-gpt2-positions"),
    case(L, lambda m: m.explore(5), MechnbError, "prompt is a string", "got int 5", id="explore-prompt-int"),
]

# -- 5. gradients and circuits -----------------------------------------------------------


def circuit(m, clean=PROMPT, corrupt=CORRUPT, answer=" Mary", wrong=" John", **options):
    return m.circuit(clean, corrupt, answer, wrong, **{"method": "eap", **options})


GRADIENT_CASES = [
    case(L, lambda m: m.attribute(PROMPT, method="saliency"), MechnbError, "unknown attribution method 'saliency'",
         "gim, gradient, grad_x_input", id="attribute-unknown-method"),
    case(L, lambda m: m.attribute(PROMPT, steps="3"), MechnbError, "steps must be an integer", "got '3'",
         id="attribute-steps-string"),
    case(L, lambda m: m.attribute(PROMPT, method="integrated_gradients", baseline=torch.ones(5), steps=2),
         MechnbError, "shape (5,)", "give (32,)", id="attribute-baseline-wrong-width"),
    case(L, lambda m: m.attribute(PROMPT, method="integrated_gradients", baseline=NAN, steps=2), MechnbError,
         "NaN or infinite", "a finite tensor", id="attribute-baseline-nan"),
    case(L, lambda m: gim_block(m, softmax_temperature=None), MechnbError, "softmax_temperature",
         "finite number, got None", id="gim-temperature-None"),
    case(L, lambda m: gim_block(m, q_scale="x"), MechnbError, "q_scale", "finite number, got 'x'",
         id="gim-q-scale-string"),
    case(L, lambda m: circuit(m, method="acdc"), CircuitError, "unknown circuit method 'acdc'",
         "eap, eap-ig, gim, exact", id="circuit-unknown-method"),
    case(L, lambda m: circuit(m, method="exact"), CircuitError, "method='exact'", "level='node'",
         id="circuit-exact-at-edge-level"),
    case(L, lambda m: circuit(m, answer=" Marylandia"), CircuitError, "' Marylandia' is 2 tokens",
         "give a one-token answer", id="circuit-multi-token-answer"),
    case(L, lambda m: circuit(m, answer={" Mary", " Marylandia"}), CircuitError, "' Marylandia' is 2 tokens",
         "a set of one-token answers", id="circuit-multi-token-answer-in-a-set"),
    case(L, lambda m: circuit(m, corrupt="Hi"), CircuitError, "different lengths (14 and 1)", "Reword",
         id="circuit-pair-of-different-lengths"),
    case(L, lambda m: circuit(m, clean=5, corrupt=6), CircuitError, "got int 5", "a list of strings",
         id="circuit-prompts-int"),
    case(L, lambda m: circuit_of(m).top("x%"), CircuitError, "'x%'", "e.g. '2%'", id="circuit-top-bad-percentage"),
    case(L, lambda m: circuit_of(m).faithfulness(["x"]), CircuitError, "got ['x']", "a list of numbers",
         id="circuit-faithfulness-words"),
]

# -- 6. generation, causal tracing, editing ----------------------------------------------

GENERATION_CASES = [
    case(L, lambda m: m.generate(5), GenerationError, "a prompt or a list", "non-empty prompt strings",
         id="generate-prompt-int"),
    case(L, lambda m: m.generate("Hi", max_new_tokens=0), GenerationError, "max_new_tokens",
         "positive integer, got 0", id="generate-max-new-tokens-zero"),
    case(L, lambda m: m.generate("Hi", temperature="hot"), GenerationError, "temperature must be > 0", "'hot'",
         id="generate-temperature-string"),
    case(L, lambda m: m.generate("Hi", seed="x"), GenerationError, "seed must be an integer", "got 'x'",
         id="generate-seed-string"),
    case(L, lambda m: m.generate("Hi", max_new_tokens=2, stream=lambda texts: 1 / 0), GenerationError,
         "the stream function raised ZeroDivisionError", "list of continuations", id="generate-stream-raises"),
    case("gpt2", lambda m: m.generate(PROMPT, max_new_tokens=200), PromptError, "214 tokens", "128 positions",
         id="generate-beyond-gpt2-positions"),
    case(L, lambda m: m.causal_trace(PARIS, "Eiffel Tower", kind=["mlp"]), CausalTraceError,
         "unknown kind ['mlp']", "hidden, mlp, attn", id="causal-kind-list"),
    case(L, lambda m: m.causal_trace(PARIS, "Louvre"), CausalTraceError, "'Louvre' does not occur",
         "in the prompt", id="causal-subject-absent"),
    case(L, lambda m: m.causal_trace(PARIS, "Eiffel Tower", noise=float("inf")), CausalTraceError,
         "noise must be a positive finite number", "inf", id="causal-noise-inf"),
    case(L, lambda m: m.causal_trace(PARIS, "Eiffel Tower", layers=1, samples=1), CausalTraceError,
         "layers must be None", "got 1", id="causal-layers-int"),
    case(L, lambda m: m.causal_trace(PARIS, "Eiffel Tower", positions=[99], samples=1), CausalTraceError,
         "positions must be None (all) or a non-empty list of ints in 0-9", "[99]", id="causal-position-huge"),
    case(L, lambda m: m.causal_trace(PARIS, "Eiffel Tower", positions=[], samples=1), CausalTraceError,
         "positions must be None", "got []", id="causal-positions-empty"),
    case(L, lambda m: m.causal_trace(PARIS, "Eiffel Tower", samples=1, batch_size=-1), MechnbError,
         "batch_size", "got -1", id="causal-batch-size-negative"),
    case(L, lambda m: m.edit(PARIS, "Eiffel Tower", " Rome", method="memit"), EditError,
         "unknown edit method 'memit'", "'rome'", id="edit-unknown-method"),
    case(L, lambda m: m.edit(PARIS, "Eiffel Tower", " Rome", layer=99), EditError, "layer 99 out of range",
         "layers 0-2", id="edit-layer-huge"),
    case(L, lambda m: m.edit(PARIS, "Eiffel Tower", " Rome", layer=1, steps="x"), EditError,
         "steps must be a positive integer", "got 'x'", id="edit-steps-string"),
    case(L, lambda m: m.edit(PARIS, "Eiffel Tower", " Rome", layer=1, learning_rate=0.1), EditError,
         "unknown edit settings learning_rate", "steps, lr", id="edit-unknown-setting"),
]

# -- 7. weights and co-activation --------------------------------------------------------

WEIGHT_CASES = [
    case(L, lambda m: m.ov(99, 0), WeightError, "layer 99 out of range", "layers 0-2", id="ov-layer-huge"),
    case(L, lambda m: m.ov(0, 99), WeightError, "head 99 out of range", "heads 0-3", id="ov-head-huge"),
    case("gpt2", lambda m: m.qk(0, -4), WeightError, "head -4 out of range", "heads 0-3",
         id="qk-head-negative-gpt2"),
    case(L, lambda m: m.ov(0, 0).top_pairs(3, vocab=-1), WeightError, "vocab", "got -1",
         id="ov-top-pairs-vocab-negative"),
    case(L, lambda m: m.composition("z"), WeightError, "'q', 'k' or 'v'", "got 'z'", id="composition-unknown-kind"),
    case(L, lambda m: m.coactivation("mlp_out.1", [PROMPT], method="ica"), CoactivationError, "unknown method 'ica'",
         "'pca' or 'kmeans'", id="coactivation-unknown-method"),
    case(L, lambda m: m.coactivation("mlp_out.1", 5), CoactivationError, "non-empty list of non-empty texts",
         "coactivation", id="coactivation-texts-int"),
    case(L, lambda m: m.coactivation("mlp_out.1", [PROMPT], max_tokens="all"), CoactivationError,
         "max_tokens must be a positive integer", "got 'all'", id="coactivation-max-tokens-string"),
    case(L, lambda m: m.coactivation("mlp_out.1", ["Hi"]), CoactivationError, "fewer than 2 tokens", "give more text",
         id="coactivation-one-token"),
]

# -- 8. sparse autoencoders --------------------------------------------------------------

SAE_CASES = [
    case(L, lambda m: m.collect("resid_post.*", [PROMPT], 10, **QUIET), StoreError, "resid_post.* names 3",
         "one site", id="collect-range-site"),
    case(L, lambda m: m.collect("resid_post.1", [PROMPT], "10", **QUIET), StoreError,
         "n_tokens must be a positive integer", "got '10'", id="collect-n-tokens-string"),
    case(L, lambda m: m.collect("resid_post.1", None, 10, **QUIET), StoreError, "got NoneType",
         "a list of strings", id="collect-texts-None"),
    case(L, lambda m: m.collect("resid_post.1", [PROMPT], 10, context=0, **QUIET), StoreError,
         "context", "integer >= 2, got 0", id="collect-context-zero"),
    case(L, lambda m: m.collect("resid_post.1", [PROMPT], 10, batch_size=-1, **QUIET), MechnbError,
         "batch_size", "got -1", id="collect-batch-size-negative"),
    case(L, lambda m: m.attach(random_sae(), site="resid_post.*"), SAEError, "not resid_post.*",
         "a whole per-token site", id="attach-range-site"),
    case(L, lambda m: m.attach(random_sae(), site="neuron.1"), SAEError, "32-wide", "neuron.1 of tiny-llama is 64 wide",
         id="attach-wrong-width"),
    case(L, lambda m: m.features(PROMPT, None), SAEError, "a mechnb SAE", "None", id="features-sae-None"),
    case(L, lambda m: m.features(PROMPT, random_sae(d_in=64)), SAEError, "64-wide", "got width 32",
         id="features-sae-of-another-width"),
    case(L, lambda m: mechnb.sae.train([1, 2, 3]), SAEError, "an ActivationStore", "got list",
         id="sae-train-list"),
    case(L, lambda m: mechnb.sae.train(torch.full((10, 4), float("nan")), **QUIET), StoreError,
         "NaN or infinite", "collect again", id="sae-train-nan-activations"),
    case(L, lambda m: mechnb.sae.train(torch.zeros(0, 4), kind="relu", d_sae=8, **QUIET), SAEError,
         "holds 0 activations", "collect more text", id="sae-train-empty-store"),
    case(L, lambda m: mechnb.sae.train(torch.randn(10, 4), kind="relu", d_sae=-3, **QUIET), SAEError,
         "d_sae must be a positive integer", "got -3", id="sae-train-d-sae-negative"),
    case(L, lambda m: mechnb.sae.load(None), SAEError, "a directory, a release name or a hub repo id", "NoneType",
         id="sae-load-None"),
    case(L, lambda m: mechnb.sae.load("/no/such/sae"), SAEError, "is not an SAE directory",
         "no such directory", id="sae-load-missing-directory"),
    case(L, lambda m: load_broken_sae("{not json"), SAEError, "cannot read",
         "JSONDecodeError", id="sae-load-broken-json"),
    case(L, lambda m: load_broken_sae('{"d_in": 4}'), SAEError, "sae_weights.safetensors", "mechnb-bad-sae",
         id="sae-load-broken-weights"),
]

# -- 9. causal abstraction ---------------------------------------------------------------


def pronoun_data(n=8, **options):
    from test_causal_model import pronoun_model

    return pronoun_model().counterfactuals(n, intervene="gender", seed=0, **options)


def trained_elsewhere(model_name=None, site="resid_post.2@-1"):
    from mechnb.causal import Subspace

    made = Subspace(torch.linalg.qr(torch.randn(32, 2))[0])
    made.site, made.variable, made.model_name = site, "gender", model_name
    return made


CAUSAL_CASES = [
    case(L, lambda m: mechnb.causal.CausalModel({"a": [0, 1], "b": [0, 1]}, parents={"a": ["b"], "b": ["a"]},
                                                mechanisms={"a": lambda b: b, "b": lambda a: a}),
         CausalError, "a cycle", "remove one of these parent links", id="causal-model-cyclic"),
    case(L, lambda m: mechnb.causal.CausalModel({"a": [0, 1], "b": [0, 1]}, parents={"b": ["a"]},
                                                mechanisms={"b": lambda a: a + 1}).run({"a": 1}),
         CausalError, "gives b = 2", "not one of its values (0, 1)", id="causal-mechanism-outside-its-values"),
    case(L, lambda m: m.interchange(pronoun_data(), "resid_post.1@'{place}'", **QUIET), CausalError,
         "template field {place} is not in", "its fields: {name}", id="interchange-field-missing"),
    case(L, lambda m: m.das(pronoun_data(), "resid_post.1@-1", k=40, **QUIET), CausalError,
         "k=40 is larger than resid_post.1's width, 32", "at most 32", id="das-k-wider-than-the-site"),
    case(L, lambda m: pronoun_data(16).filter(m, compare="top1", quiet=True), CausalError,
         "gets none of the 16 examples right", "a model that does the task", id="filter-leaves-nothing"),
    case(L, lambda m: m.interchange(pronoun_data(), trained_elsewhere("gpt2-small"), **QUIET), CausalError,
         "trained on gpt2-small, not tiny-llama", "model_name = None", id="interchange-featurizer-of-another-model"),
    case(L, lambda m: m.interchange(pronoun_data(), "resid_post.1@-1", featurizer=trained_elsewhere(), **QUIET),
         CausalError, "trained at resid_post.2@-1, not resid_post.1", "featurizer.site = None",
         id="interchange-featurizer-of-another-site"),
    case(L, lambda m: m.das(pronoun_data(), "resid_post.1@-1", kind="ica", **QUIET), CausalError,
         "unknown kind 'ica'", "das, boundless, dbm", id="das-unknown-kind"),
    case(L, lambda m: m.das(pronoun_data(), "resid_post.*@-1", **QUIET), CausalError, "das trains at one site",
         "names 3", id="das-range-site"),
    case(L, lambda m: m.interchange(pronoun_data(), "resid_post.1@-1", featurizer="sae", **QUIET), CausalError,
         "featurizer='sae'", "model.attach(sae) first", id="interchange-sae-none-attached"),
    case(L, lambda m: m.interchange(pronoun_data(), "resid_post.1@-1", compare="top3", **QUIET), CausalError,
         "unknown compare 'top3'", "'values'", id="interchange-unknown-compare"),
]

API_CASES = (TRACE_CASES + INTERVENTION_CASES + PATCH_CASES + VIEW_CASES + GRADIENT_CASES + GENERATION_CASES
             + WEIGHT_CASES + SAE_CASES + CAUSAL_CASES)


@pytest.mark.parametrize("name, call, kind, texts", API_CASES)
def test_bad_input_to_the_api_fails_clearly_and_leaves_the_model_clean(guard, name, call, kind, texts):
    g = guard(name)
    with pytest.raises(MechnbError) as caught:
        call(g.model)
    assert_clear(caught.value, kind, texts)
    g.assert_clean()


# -- loading -----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, kind, texts", [
    pytest.param(dict(name="./no/such/model"), ModelError, ["no such file or directory", "a hub id"],
                 id="load-missing-directory"),
    pytest.param(dict(name="missing.gguf"), ModelError, ["no such GGUF file", "missing.gguf"],
                 id="load-missing-gguf"),
    pytest.param(dict(name="nobody/no-such-model-xyz"), ModelError,
                 ["not in the local Hugging Face cache", "HF_HUB_OFFLINE"], id="load-hub-id-offline"),
    pytest.param(dict(dtype="float8"), ModelError, ["unknown dtype 'float8'", "float32, float16, bfloat16"],
                 id="load-unknown-dtype"),
    pytest.param(dict(device="banana"), ModelError, ["unknown device 'banana'", "'cpu', 'cuda'"],
                 id="load-unknown-device"),
    pytest.param(dict(device=-5), ModelError, ["unknown device -5", "torch.device"], id="load-negative-device"),
    pytest.param(dict(device="cuda:7"), ModelError, ["'cuda:7'", "device='cpu'"], id="load-missing-gpu"),
    pytest.param(dict(name=123), ModelError, ["got 123", "hub id, a directory or a .gguf"], id="load-int-name"),
    pytest.param(dict(name=" "), ModelError, ["got ' '", "with no name"], id="load-blank-name"),
    pytest.param(dict(bogus_option=3), ModelError, ["bogus_option", "from_pretrained"], id="load-unknown-option"),
])
def test_bad_load_fails_clearly_without_the_network(monkeypatch, kwargs, kind, texts):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MechnbError) as caught:
        mechnb.load(**kwargs)
    assert_clear(caught.value, kind, texts)


# -- inputs that must work: unicode and HTML, multi-token answers, NaN in one trace ---------


def html_of(result) -> str:
    """What a notebook shows of a result (its mimebundle's HTML)."""
    return result._repr_mimebundle_()["text/html"]


def escaped(html: str) -> bool:
    """The prompt is in the page, as text: its markup escaped, as JSON (`\\u003c`) or as
    HTML (`&lt;`); tokens may split it (`<`, `script`, `>`), so the word is checked alone."""
    return RAW_MARKUP not in html and "alert" in html and ("\\u003c" in html or "&lt;" in html)


UNICODE_CASES = [
    pytest.param(lambda m: html_of(m.attention(EVIL)), id="attention"),
    pytest.param(lambda m: html_of(m.activations("neuron.1.5", [EVIL, PROMPT])), id="activations-two-prompts"),
    pytest.param(lambda m: html_of(m.attribute(EVIL, method="grad_x_input")), id="attribute"),
    pytest.param(lambda m: html_of(m.generate(EVIL, max_new_tokens=2)), id="generate"),
    pytest.param(lambda m: html_of(m.features(EVIL, random_sae())), id="sae-features"),
    pytest.param(lambda m: html_of(m.coactivation("mlp_out.1", [EVIL, PROMPT], components=2)), id="coactivation"),
]


@pytest.mark.parametrize("call", UNICODE_CASES)
def test_unicode_and_markup_in_prompts_work_and_stay_escaped(guard, call):
    g = guard()
    assert escaped(call(g.model))
    g.assert_clean()


def lens_and_top(m):
    lens = m.logit_lens(EVIL)
    assert lens.values.shape == (3, len(m.tokens(EVIL)))
    assert "alert" in "".join(lens.df.token)
    return m.top(EVIL, k=3)


def explorer_status(m):
    explorer = m.explore(EVIL)
    assert explorer.error is None and RAW_MARKUP not in explorer.status.value + explorer.table_view.value
    return explorer.table


@pytest.mark.parametrize("call", [
    pytest.param(lens_and_top, id="lens-and-top"),
    pytest.param(lambda m: patch(m, clean=EVIL, corrupt=EVIL).df, id="patch"),
    pytest.param(lambda m: m.causal_trace(EVIL, "日本語", samples=1).df, id="causal-trace"),
    pytest.param(explorer_status, id="explorer"),
])
def test_unicode_and_markup_prompts_run_like_any_other(guard, call):
    g = guard()
    out = call(g.model)
    assert len(out) > 0
    g.assert_clean()


def test_a_multi_token_answer_uses_its_first_token_and_says_so(guard):
    g = guard()
    result = patch(g.model, answer=" Marylandia", per_position=False)
    first = g.model.tokenizer.encode(" Marylandia", add_special_tokens=False)[0]
    same = patch(g.model, answer=first, per_position=False)
    assert torch.equal(result.values, same.values)
    assert any("only the first" in note and "Maryland" in note for note in result.meta["notes"])
    g.assert_clean()


def test_nan_written_in_one_trace_stays_in_that_trace(guard):
    g = guard()
    with g.model.trace(PROMPT):
        g.model["resid_post.1@-1"] = float("nan")
        logits = g.model["logits"].save()
    assert torch.isnan(logits[0, -1]).all()  # (earlier rows too: eager attention adds -inf to a NaN score)
    g.assert_clean()


def test_nan_ablation_references_are_refused(guard):
    g = guard()
    (hook,) = g.model.hook("resid_pre.1", lambda value: value * float("nan"))
    with pytest.raises(MechnbError) as caught:
        g.model.ablate("mlp_out.1", mode="mean", ref=[PROMPT])
    assert_clear(caught.value, InterventionError, ["reference values of mlp_out.1", "NaN or infinite"])
    assert g.model.interventions == [hook]
    g.model.remove(hook)
    g.assert_clean()


def test_a_view_of_nan_activations_fails_clearly(guard):
    g = guard()
    (hook,) = g.model.hook("resid_post.0", lambda value: value * float("nan"))
    result = g.model.attention(PROMPT)
    assert torch.isnan(result.values[1:]).all()
    with pytest.raises(MechnbError) as caught:
        html_of(result)
    assert_clear(caught.value, MechnbError, ["cannot show NaN or infinite values", "result's .values"])
    g.model.remove(hook)
    g.assert_clean()


# -- path patching where a receiver precedes a sender, or a sender has positions ----------


def test_receivers_below_a_sender_keep_the_target_run(guard):
    g = guard()
    result = path_patch(g.model, senders="head.*.*", receivers="head.1.1")
    corrupt = result.meta["corrupt_metric"]
    assert torch.allclose(result.values[2], torch.full((4,), corrupt))  # layer 2 writes after head 1.1
    assert torch.allclose(result.values[1, [0, 2, 3]], torch.full((3,), corrupt))  # heads beside it
    assert abs(result.values[1, 1].item() - corrupt) > 1e-5  # the receiver itself, patched
    g.assert_clean()


@pytest.mark.parametrize("senders", ["head.0.*@-1", "head.0.*@10:", "head.1.*@5:7"])
def test_path_patching_a_sender_at_some_positions_through_the_residual_is_patching(guard, senders):
    g = guard()
    through = path_patch(g.model, senders=senders, receivers="resid_pre.2", freeze="none")
    direct = patch(g.model, sites=senders, per_position=False)
    assert torch.allclose(through.values, direct.values, atol=1e-6)
    g.assert_clean()


# -- failing user hooks --------------------------------------------------------------------


def boom(value):
    raise ValueError("boom")


def trace_block(m):
    with m.trace(PROMPT):
        m["logits"].save()


@pytest.mark.parametrize("call", [
    pytest.param(lambda m: m.top(PROMPT), id="top"),
    pytest.param(trace_block, id="trace"),
    pytest.param(lambda m: patch(m), id="patch"),
    pytest.param(lambda m: m.generate(PROMPT, max_new_tokens=2), id="generate"),
    pytest.param(lambda m: circuit(m), id="circuit"),
    pytest.param(lambda m: m.causal_trace(PARIS, "Eiffel Tower", samples=1), id="causal-trace"),
])
def test_a_failing_hook_function_is_named_and_leaves_the_model_clean(guard, call):
    g = guard()
    (hook,) = g.model.hook("head.1.0", boom)
    with pytest.raises(MechnbError) as caught:
        call(g.model)
    assert_clear(caught.value, InterventionError,
                 ["the hook at head.1.0 (boom) raised ValueError: boom", "remove the hook"])
    assert g.model.interventions == [hook]
    g.model.remove(hook)
    g.assert_clean()


def test_a_hook_returning_the_wrong_shape_is_named(guard):
    g = guard()
    hooks = g.model.hook("head.1.0", lambda value: value[..., :3])
    with pytest.raises(MechnbError) as caught:
        g.model.top(PROMPT)
    assert_clear(caught.value, InterventionError, ["shape (1, 14, 3)", "shape (1, 14, 8)", "shaped like"])
    g.model.remove(hooks)
    g.assert_clean()


# -- interrupted sweeps ----------------------------------------------------------------------


class Interrupt:
    """A function that behaves (returns its argument's first column, or the value) for
    `after` calls, then raises KeyboardInterrupt, as Ctrl-C would, from inside a sweep."""

    def __init__(self, after: int, metric: bool = True):
        self.after, self.metric, self.calls = after, metric, 0

    def __call__(self, value, *rest):
        self.calls += 1
        if self.calls > self.after:
            raise KeyboardInterrupt
        return value[:, 0] if self.metric else value


def bar_interrupts(monkeypatch, method: str = "update", after: int = 1):
    """Every tqdm progress bar raises KeyboardInterrupt on its `after`+1-th `method` call."""
    import tqdm.auto

    real, calls = getattr(tqdm.auto.tqdm, method), []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(tqdm.auto.tqdm, method, interrupted)
    return calls


def hooked_interrupt(site: str, after: int):
    """A setup that adds a hook at `site` interrupting after `after` forwards."""
    return lambda m, monkeypatch: m.hook(site, Interrupt(after, metric=False))


INTERRUPTS = [
    pytest.param(None, lambda m: patch(m, metric=Interrupt(3), batch_size=4), id="patch-by-its-metric"),
    pytest.param(None, lambda m: patch(m, metric=Interrupt(1), method="attribution"),
                 id="attribution-patching-by-its-metric"),
    pytest.param(lambda m, mp: bar_interrupts(mp), lambda m: m.patch(PROMPT, CORRUPT, "head.*.*", batch_size=4,
                                                                     **ANSWERS),
                 id="patch-by-its-progress-bar"),
    pytest.param(None, lambda m: path_patch(m, metric=Interrupt(3), batch_size=2), id="path-patch-by-its-metric"),
    pytest.param(hooked_interrupt("mlp_out.1", 5), lambda m: m.causal_trace(PARIS, "Eiffel Tower", samples=2,
                                                                           batch_size=3),
                 id="causal-trace-by-a-hook"),
    pytest.param(None, lambda m: circuit(m, method="eap-ig", steps=3, metric=Interrupt(3)),
                 id="circuit-eap-ig-by-its-metric"),
    pytest.param(None, lambda m: circuit(m, method="gim", metric=Interrupt(2)), id="circuit-gim-by-its-metric"),
    pytest.param(lambda m, mp: (circuit_of(m), m.hook("resid_pre.2", Interrupt(2, metric=False)))[1],
                 lambda m: circuit_of(m).faithfulness([0.1, 0.5, 1.0]), id="faithfulness-by-a-hook"),
    pytest.param(hooked_interrupt("head.1.0", 0), lambda m: m.attribute(PROMPT, method="gim"),
                 id="attribute-gim-by-a-hook"),
    pytest.param(None, lambda m: m.generate(PROMPT, max_new_tokens=5, stream=Interrupt(2, metric=False)),
                 id="generate-by-its-stream"),
    pytest.param(hooked_interrupt("resid_pre.0", 1), lambda m: m.collect("resid_post.2", [PROMPT] * 40, 300,
                                                                         batch_size=2, context=16, **QUIET),
                 id="collect-by-a-hook"),
    pytest.param(hooked_interrupt("resid_pre.1", 0), lambda m: m.detect_heads(n_samples=2, seq_len=5),
                 id="detect-heads-by-a-hook"),
    pytest.param(lambda m, mp: bar_interrupts(mp), lambda m: m.interchange(pronoun_data(), "resid_post.*@-1",
                                                                           batch_size=2),
                 id="interchange-by-its-progress-bar"),
    pytest.param(lambda m, mp: bar_interrupts(mp, after=2), lambda m: m.das(pronoun_data(20), "resid_post.1@-1",
                                                                            batch_size=4),
                 id="das-by-its-progress-bar"),
]


@pytest.mark.parametrize("setup, call", INTERRUPTS)
def test_an_interrupted_sweep_leaves_the_model_clean(guard, monkeypatch, setup, call):
    g = guard()
    added = setup(g.model, monkeypatch) if setup is not None else None
    with pytest.raises(KeyboardInterrupt):
        call(g.model)
    monkeypatch.undo()
    if isinstance(added, list) and added and isinstance(added[0], Intervention):
        assert g.model.interventions == added
        g.model.remove(added)
    g.assert_clean()


def test_interrupted_sae_training_returns_the_sae_so_far(monkeypatch):
    calls = bar_interrupts(monkeypatch, after=3)
    data = torch.randn(2000, 8)
    sae = mechnb.sae.train(data, kind="topk", d_sae=16, k=2, batch_size=64, log_every=1)
    assert len(calls) == 4 and sae.meta["interrupted"] and sae.meta["steps"] == 4
    assert torch.isfinite(sae.W_enc).all() and len(sae.history) == 4


# -- the magics, through a real IPython shell ------------------------------------------------


@pytest.fixture
def session(shell, guard):
    """The shell with the battery's llama as its session model, and its `Guard`."""
    g = guard()
    shell.user_ns.update(m=g.model, model=g.model, clean=PROMPT, corrupt=CORRUPT, v=torch.ones(32), five=5,
                         evil=EVIL, interrupt=Interrupt(3))
    assert shell.run_cell("%mechnb use m", store_history=False).success
    return shell, g


def run(shell, capsys, source):
    result = shell.run_cell(source, store_history=False)
    captured = capsys.readouterr()
    return result, captured.out, captured.err


PATCH_LINE = '%patch --clean {clean} --corrupt {corrupt} --answer " Mary" --wrong " John" --sites resid_pre.* '
PATH_LINE = ('%path_patch --clean {clean} --corrupt {corrupt} --answer " Mary" --wrong " John" '
             '--senders head.0.* ')
CIRCUIT_LINE = '%circuit --clean {clean} --corrupt {corrupt} --answer " Mary" --wrong " John" '

MAGIC_CASES = [
    ("%mechnb nonsense", "MagicError", "unknown command 'nonsense'", "valid commands are"),
    ("%mechnb load --dtype float8", "ModelError", "unknown dtype 'float8'", "float32"),
    ("%mechnb load ./no/such/dir", "ModelError", "no such file or directory", "hub id"),
    ("%mechnb load --device banana", "ModelError", "unknown device 'banana'", "'cpu'"),
    ("%mechnb use nothing_here", "MagicError", "'nothing_here' is not a mechnb Model", "mechnb.load()"),
    ("%mechnb info extra", "MagicError", "info takes no arguments", "['extra']"),
    ('%mechnb top "x" -k 0', "ArgumentError", "k, the tokens listed, must be a positive int", "got 0"),
    ("%mechnb top {undefined_name}", "MagicError", "cannot evaluate {undefined_name}", "NameError"),
    ("%%trace\nx = 1", "MagicError", "%%trace takes one prompt", '%%trace "The sky is"'),
    ("%%trace {five}\nx = 1", "PromptError", "got int 5", "list of strings"),
    ('%%trace "hi"\nmodel["head.1.0"] = "x"', "SiteError", "cannot write str 'x' into head.1.0",
     "a number or a tensor"),
    ('%%trace "hi"\nx = (', "MagicError", "syntax error in the %%trace cell", "line 1"),
    ("%ablate", "MagicError", "at least one site", "%ablate head.9.6"),
    ("%ablate head.1.0 --mode mean --ref {five}", "PromptError", "got int 5", "list of strings"),
    ("%interventions --remove x", "MagicError", "--remove takes numbers from the # column", "no intervention"),
    ("%interventions --remove -1", "MagicError", "--remove takes numbers from the # column", "['-1']"),
    ("%patch", "MagicError", "%patch needs --sites", "--sites resid_pre.*"),
    (PATCH_LINE + "--batch-size -2", "ArgumentError", "batch_size", "got -2"),
    ('%patch --clean {clean} --corrupt "Hello" --answer " Mary" --wrong " John" --sites resid_pre.*',
     "PatchError", "different lengths (14 and 1)", "Reword"),
    (PATH_LINE, "MagicError", "%path_patch needs --receivers", "--receivers head.20.3"),
    (PATH_LINE + "--receivers logits", "PatchError", "logits cannot be a receiver", "name heads"),
    ('%attention "x y" --layers x', "SiteError", "bad layer 'x'", "a range such as 0:5"),
    ("%activations neuron.1.5", "MagicError", "takes a site (or {direction}) and a prompt", "{prompts}"),
    ('%lens "x" -k 0', "LensError", "got 0", "an int in 1-49152"),
    ('%dla "x y"', "MagicError", "%dla needs --answer", '--answer " Mary"'),
    ("%heads extra", "MagicError", "%heads takes only options", "['extra']"),
    ("%explore a b", "MagicError", "%explore takes at most one prompt", '%explore "The sky is"'),
    ("%explore {five}", "ViewError", "prompt is a string", "got int 5"),
    ('%features "x"', "MagicError", "%features needs --sae", "got None"),
    ('%attribute "x" --method saliency', "AttributionError", "unknown attribution method 'saliency'",
     "gim, gradient"),
    ("%circuit", "MagicError", "%circuit needs --clean", "--corrupt {corrupt}"),
    (CIRCUIT_LINE + "--method eap --top x% --no-faithfulness", "CircuitError", "'x%'", "e.g. '2%'"),
    (CIRCUIT_LINE + "--method eap --top lots --no-faithfulness", "MagicError", "--top takes a number", "'lots'"),
    ('%generate "x" --max-new-tokens 0', "GenerationError", "max_new_tokens", "positive integer, got 0"),
    ('%generate "x" --seed x', "MagicError", "option --seed of %generate takes a int", "'x'"),
    ("%steer", "MagicError", "%steer takes a site and a vector", "%steer resid_pre.12 {v}"),
    ("%steer resid_pre.1 {v} --scale inf", "SteerError", "scale must be a number", "got inf"),
    ('%causal_trace "x"', "MagicError", "%causal_trace needs --subject", '--subject "Eiffel Tower"'),
    ("%ov head.1", "MagicError", "%ov takes one head", "%ov head.18.6"),
    ("%ov head.1.1 -k 0", "WeightError", "a positive number of pairs", "got 0"),
    ("%ov head.1.1 --vocab -1", "WeightError", "vocab keeps the first token ids", "got -1"),
    ("%qk head.99.1", "WeightError", "layer 99 out of range", "layers 0-2"),
    ("%composition --kind z", "WeightError", "'q', 'k' or 'v'", "got 'z'"),
    ("%coactivation mlp_out.1 {five}", "CoactivationError", "non-empty list of non-empty texts", "coactivation"),
    ("%stability {five}", "MagicError", "%stability takes a circuit", "model.circuit"),
    ("%interchange resid_post.1@-1", "MagicError", "takes a counterfactual dataset", "cm.counterfactuals"),
    ("%das {five} resid_post.1@-1", "MagicError", "takes a counterfactual dataset", "SITE"),
]


@pytest.mark.parametrize("line, kind, first, second", MAGIC_CASES,
                         ids=[c[0].split("\n")[0][:60] for c in MAGIC_CASES])
def test_bad_magic_arguments_print_one_clear_line_and_leave_the_model_clean(session, capsys, line, kind, first,
                                                                            second):
    shell, g = session
    result, out, err = run(shell, capsys, line)
    assert not result.success
    assert isinstance(result.error_in_exec, MechnbError), result.error_in_exec
    assert "Traceback" not in out + err and len(err.strip().splitlines()) == 1, out + err
    assert err.startswith(kind + ": ") and first in err and second in err, err
    g.assert_clean()


@pytest.mark.parametrize("line, check", [
    pytest.param("%attention {evil} -o shown", lambda shell: escaped(html_of(shell.user_ns["shown"])),
                 id="attention"),
    pytest.param("%%trace {evil}\nseen = model['logits'].save()",
                 lambda shell: shell.user_ns["seen"].shape[:2] == (1, len(shell.user_ns["m"].tokens(EVIL))),
                 id="trace"),
])
def test_unicode_and_markup_prompts_work_in_the_magics(session, capsys, line, check):
    shell, g = session
    result, out, err = run(shell, capsys, line)
    assert result.success, (result.error_in_exec, err)
    assert check(shell)
    g.assert_clean()


def test_a_failing_hook_is_one_line_in_the_magics(session, capsys):
    shell, g = session
    (hook,) = g.model.hook("head.1.0", boom)
    for line in ('%mechnb top "Hello"', '%%trace "Hello"\nx = model["logits"].save()', '%lens "Hello"'):
        result, out, err = run(shell, capsys, line)
        assert not result.success and "Traceback" not in out + err, err
        assert err.startswith("InterventionError: the hook at head.1.0 (boom) raised ValueError: boom"), err
    assert run(shell, capsys, "%interventions --remove 0")[0].success
    g.assert_clean()


def test_an_interrupted_magic_sweep_leaves_the_model_and_the_shell_working(session, capsys):
    shell, g = session
    result, out, err = run(shell, capsys, PATCH_LINE + "--metric {interrupt} --batch-size 2")
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    g.assert_clean()
    assert run(shell, capsys, "%mechnb info")[0].success


def test_unloading_the_extension_removes_every_magic(shell, capsys):
    from mechnb.notebook.magics import MechnbMagics

    assert run(shell, capsys, "%unload_ext mechnb")[0].success
    try:
        for kind, names in MechnbMagics.magics.items():
            for name in names:
                assert name not in shell.magics_manager.magics[kind], name
        assert not run(shell, capsys, "%circuit")[0].success
    finally:
        assert run(shell, capsys, "%load_ext mechnb")[0].success
