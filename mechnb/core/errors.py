"""Errors mechnb raises: one class per kind, all subclasses of `MechnbError`, all defined here.

Every message names the bad value, says what is valid, and what to do next, in one
line, because in a notebook the message is all the user sees: the magics print it
without a traceback (see `mechnb.notebook.magics`). Every class is exported from
`mechnb` (`mechnb.PatchError`), so `except mechnb.MechnbError` catches them all and
`except mechnb.SAEError` one kind.

The kinds follow where the mistake is: a site (`SiteError`), prompts or token ids
(`PromptError`), the model (`ModelError`), a trace's use (`TraceError`), a magic's
words (`MagicError`), memory (`MemoryBudgetError`), NDIF (`RemoteError`), and the
arguments of one method (`PatchError`, `LensError`, `SAEError`, ...). Errors that are
also `ValueError`s are bad arguments: fixing the call fixes them.
"""


class MechnbError(Exception):
    """Base of every error mechnb raises on purpose."""


# -- the model and its vocabulary (mechnb.core) -------------------------------------------

class SiteError(MechnbError, ValueError):
    """A site string that does not parse, names something this model lacks, or cannot be
    used where it is given (a pattern where a vector is needed)."""


class PromptError(MechnbError, ValueError):
    """Prompts or token ids that cannot be run: empty, not strings, longer than the model
    takes, ids outside its vocabulary, or pairs whose tokens do not line up."""


class ArgumentError(MechnbError, ValueError):
    """An argument of a core call (a count, a batch size, a function) that is not valid."""


class ModelError(MechnbError):
    """A model that cannot be found, loaded or wrapped, or no model loaded yet."""


class TraceError(MechnbError):
    """A trace that failed or is used where it cannot be (nested, or a site read outside
    one); the model is left exactly as before it."""


class InterventionError(MechnbError, ValueError):
    """An intervention that cannot be made, applied or removed (a failing hook function)."""


class MetricError(MechnbError, ValueError):
    """A metric, or the answer tokens it needs, that cannot be used."""


class MemoryBudgetError(MechnbError, MemoryError):
    """A sweep that ran out of memory even one item at a time (see `mechnb.core.memory`)."""


class RemoteError(MechnbError):
    """A remote (NDIF) run that cannot start or failed, or a method that needs local weights."""


class DistributedError(MechnbError):
    """A job over several processes that cannot start, or a rank that failed, stopped or timed out
    (`mechnb.core.distributed`, `mechnb.launch`)."""


class OutOfMemoryWarning(UserWarning):
    """A sweep ran out of memory and continued with smaller chunks."""


# -- pictures (mechnb.display) -----------------------------------------------------------

class ViewError(MechnbError, ValueError):
    """A view, a widget or a result display that cannot be made from what it was given."""


class ResultError(MechnbError, ValueError):
    """A result that cannot do what was asked of it (recompute itself, compare shapes)."""


# -- methods (mechnb.methods, mechnb.sae, mechnb.circuits) -------------------------------

class PatchError(MechnbError, ValueError):
    """Prompts, sites or options that a patching experiment cannot use."""


class AttributionError(MechnbError, ValueError):
    """An attribution method, target, baseline or GIM setting that cannot be used."""


class LensError(MechnbError, ValueError):
    """Arguments of the logit lens or direct logit attribution that cannot be used."""


class HeadError(MechnbError, ValueError):
    """A head detector kind or setting that cannot be used."""


class SteerError(MechnbError, ValueError):
    """A steering vector, scale or contrast that cannot be used."""


class GenerationError(MechnbError, ValueError):
    """Prompts or decoding settings that generation cannot use."""


class CausalTraceError(MechnbError, ValueError):
    """A prompt, subject or setting that causal tracing cannot use."""


class EditError(MechnbError, ValueError):
    """A prompt, subject, target or setting that a weight edit cannot use."""


class WeightError(MechnbError, ValueError):
    """A head, kind or option that a weight analysis (OV, QK, composition) cannot use."""


class CoactivationError(MechnbError, ValueError):
    """A site, texts or setting that coactivation analysis cannot use."""


class CircuitError(MechnbError, ValueError):
    """Prompts, answers, metrics or options that circuit discovery cannot use."""


class SAEError(MechnbError, ValueError):
    """An SAE, its configuration or its data that cannot be used."""


class StoreError(SAEError):
    """An activation store, or a collection, that cannot be used as asked."""


class LabelError(SAEError):
    """A labeller that cannot be reached or used."""


class TranscoderError(MechnbError, ValueError):
    """A transcoder set, its files or its training data that cannot be used."""


class GraphError(MechnbError, ValueError):
    """A prompt, transcoder set or option that an attribution graph cannot use."""


class BottleneckError(MechnbError, ValueError):
    """Concepts, labels or settings a concept bottleneck (`mechnb.vision`) cannot use."""


class CausalError(MechnbError, ValueError):
    """A causal model, counterfactual dataset, alignment or featurizer that causal abstraction
    (`mechnb.causal`) cannot use: a cycle, a mechanism's value outside its variable, a
    position an example lacks, a rank wider than its site, a featurizer of another model."""


class CounterfactualWarning(UserWarning):
    """Counterfactual pairs whose interchange changes nothing: they are counted, and IIA on
    them measures nothing but the base's own answer."""


class TimeBudgetError(MechnbError, TimeoutError):
    """A sweep that ran past the time it was given (`mechnb.core.memory.time_budget`): it stops
    between chunks, the model as before it."""


class AgentError(MechnbError, ValueError):
    """A tool call, server setting, language model endpoint or report that the MCP server or
    the investigation loop (`mechnb.agent`) cannot use."""


class MagicError(MechnbError, ValueError):
    """Arguments to a magic that do not parse."""


__all__ = [name for name, value in dict(globals()).items()
           if isinstance(value, type) and issubclass(value, (MechnbError, Warning))]
