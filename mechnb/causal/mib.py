"""MIB's formats: counterfactual datasets in, trained featurizers out.

The Mechanistic Interpretability Benchmark's causal-variable track (Mueller et al. 2025;
github.com/aaronmueller/MIB, code in CausalAbstraction) stores a counterfactual dataset as
records of two fields, `input` (the base: the causal model's input variables and
`raw_input`, the prompt) and `counterfactual_inputs` (a list of such dicts, the sources),
and scores a submission laid out as

    {TASK}_{MODEL}_{VARIABLE}/
        {UNIT}_featurizer            torch.save of {"model_info": ..., "state_dict": ...}
        {UNIT}_inverse_featurizer    the same, for the inverse
        {UNIT}_indices               JSON: the feature indices swapped, or null

where `MODEL` is the transformers class (`LlamaForCausalLM`) and `UNIT` names a residual
stream entering a layer, `ResidualStream(Layer-{L},Token-{id})` (mechnb's `resid_pre.L`,
so `resid_post.L` is layer L+1's), or a head's output, `AttentionHead(Layer-{L},Head-{H},
Token-{id})` (`head.L.H`). Subspace featurizers (DAS, PCA, Boundless DAS at its hard
boundary) write `SubspaceFeaturizerModule` with the basis as `rotation_matrix` and the
state of `torch.nn.utils.parametrizations.orthogonal` that MIB rebuilds; full vectors and
unit masks write `IdentityFeaturizerModule`, the units in `_indices`.

    >>> mechnb.causal.write_mib(data, "gender.json")                  # or .parquet
    >>> data = mechnb.causal.read_mib("gender.json", cm, ["gender"])
    >>> mechnb.causal.export_mib(das, "submission", task="gender_task")
    >>> mechnb.causal.import_mib("submission/gender_task_LlamaForCausalLM_gender")

Gotchas: MIB's files are torch pickles; mechnb writes plain dicts of tensors, strings and
numbers, and reads them with `torch.load(weights_only=True)`, which loads nothing else. MIB
loads SAE featurizers from SAELens by name, so they do not export.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..core.errors import CausalError
from .data import Counterfactuals, Example

_FOLDER = re.compile(r"^(?P<task>.+)_(?P<model>[A-Za-z0-9]+(?:ForCausalLM|LMHeadModel|Model))_(?P<variable>.+)$")
UNIT = re.compile(r"^(ResidualStream\(Layer-(?P<layer>\d+),Token-(?P<token>[^)]*)\)|"
                  r"AttentionHead\(Layer-(?P<head_layer>\d+),Head-(?P<head>\d+),Token-(?P<head_token>[^)]*)\))$")


# -- datasets ---------------------------------------------------------------------------------

def records(data: Counterfactuals, model=None) -> list[dict]:
    """The examples as MIB records (`input`, `counterfactual_inputs`), `raw_input` the prompt."""
    cm = data.causal_model

    def record(setting):
        made, _ = cm.render(cm.run(setting)) if cm.template is not None else (None, None)
        return {**setting, "raw_input": made if isinstance(made, str) else None}

    return [{"input": record(e.base), "counterfactual_inputs": [record(e.sources[name]) for name in data.variables]}
            for e in data.examples]


def write_mib(data: Counterfactuals, path) -> Path:
    """Write the examples in MIB's form: JSON (a list of records) or, for a `.parquet` path,
    parquet (pandas with pyarrow). Returns the path."""
    path = Path(path)
    made = records(data)
    if path.suffix == ".parquet":
        import pandas as pd

        _parquet_engine()
        pd.DataFrame(made).to_parquet(path, index=False)
    else:
        path.write_text(json.dumps(made, indent=1, default=str))
    return path


def read_mib(path, causal_model, variables) -> Counterfactuals:
    """A `Counterfactuals` from MIB records in JSON (a list, or one record a line) or parquet.

    Args:
        path: the file.
        causal_model: the `CausalModel` its inputs belong to (extra keys in a record are
            ignored; `raw_input`, when present, must be what the template renders).
        variables: the intervened variables, one per counterfactual input, in order.
    """
    path = Path(path)
    if not path.is_file():
        raise CausalError(f"no file {path}: give a JSON or parquet file of MIB records")
    names = [variables] if isinstance(variables, str) else list(variables)
    if path.suffix == ".parquet":
        import pandas as pd

        _parquet_engine()
        rows = pd.read_parquet(path).to_dict("records")
    else:
        text = path.read_text()
        try:
            rows = json.loads(text)
        except json.JSONDecodeError:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        if isinstance(rows, dict):
            rows = [rows]
    examples = []
    for number, row in enumerate(rows):
        if not isinstance(row, dict) or "input" not in row or "counterfactual_inputs" not in row:
            raise CausalError(f"record {number} of {path} lacks input or counterfactual_inputs: MIB records have both")
        sources = list(row["counterfactual_inputs"])
        if len(sources) != len(names):
            raise CausalError(f"record {number} of {path} has {len(sources)} counterfactual inputs for the "
                              f"{len(names)} variables {names}: give one variable per counterfactual input")
        base = _setting(causal_model, row["input"], number, path)
        examples.append(Example(base, {name: _setting(causal_model, source, number, path)
                                       for name, source in zip(names, sources)}))
    if not examples:
        raise CausalError(f"{path} holds no records")
    return Counterfactuals(causal_model, examples, names, meta={"source": str(path)})


def _setting(cm, given, number: int, path) -> dict:
    """A record's input dict as a setting of the causal model's inputs, its prompt checked."""
    given = dict(given)
    missing = [name for name in cm.inputs if name not in given]
    if missing:
        raise CausalError(f"record {number} of {path} lacks the inputs {missing} of the causal model "
                          f"(it has {sorted(k for k in given if k != 'raw_input')})")
    setting = {name: _plain(given[name]) for name in cm.inputs}
    raw = given.get("raw_input")
    if isinstance(raw, str) and isinstance(cm.template, str):
        made, _ = cm.render(cm.run(setting))
        if made != raw:
            raise CausalError(f"record {number} of {path}: its raw_input {raw!r:.60} is not what the template renders, "
                              f"{made!r:.60}; use the template the data was made with")
    return setting


def _plain(value):
    """A value read from parquet as the plain Python value a causal model lists (lists as tuples)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    return tuple(_plain(v) for v in value) if isinstance(value, list) else value


def _parquet_engine() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise CausalError("parquet needs pyarrow (pip install pyarrow), or use a .json path") from None


# -- featurizers ------------------------------------------------------------------------------

def unit_name(featurizer, token: str | None = None) -> str:
    """MIB's unit id of a featurizer's site (`ResidualStream(Layer-5,Token-last_token)`)."""
    from ..core.sites import parse

    site = parse(featurizer.site)
    if token is None:
        token = _token(site)
    if site.kind == "resid_pre":
        return f"ResidualStream(Layer-{site.layer},Token-{token})"
    if site.kind == "resid_post":
        return f"ResidualStream(Layer-{site.layer + 1},Token-{token})"
    if site.kind == "head" and site.index is not None:
        return f"AttentionHead(Layer-{site.layer},Head-{site.index},Token-{token})"
    raise CausalError(f"MIB's units are residual streams entering a layer and heads' outputs; {site} is neither: "
                      "train at resid_pre.L, resid_post.L or head.L.H to export")


def _token(site) -> str:
    if site.positions is None:
        return "all"
    if site.positions.field:
        return f"{site.positions.field}_last_token"
    if site.positions.index == -1:
        return "last_token"
    return re.sub(r"\W+", "_", site.positions.text).strip("_")


def _modules(featurizer) -> tuple[dict, dict, list | None]:
    """`(model_info, state_dict, indices)` as MIB's Featurizer.save_modules writes them."""
    from torch.nn.utils.parametrizations import orthogonal

    basis = featurizer.tensors().get("basis")
    if basis is not None:
        layer = _RotateLayer(basis.detach().cpu().float())
        rotate = orthogonal(layer)
        state = {f"rotate.{name}": value.detach().clone() for name, value in rotate.state_dict().items()}
        info = {"featurizer_class": "SubspaceFeaturizerModule", "inverse_featurizer_class":
                "SubspaceInverseFeaturizerModule", "n_features": int(basis.shape[1]),
                "additional_config": {"rotation_matrix": rotate.weight.detach().clone(), "requires_grad": False}}
        return info, state, None
    if getattr(featurizer, "sae", None) is not None:
        raise CausalError("MIB loads SAE featurizers from SAELens by name, not from files: export DAS, PCA, "
                          "Boundless DAS, full-vector or unit-mask featurizers")
    indices = featurizer.tensors().get("indices")
    info = {"featurizer_class": "IdentityFeaturizerModule", "inverse_featurizer_class": "IdentityInverseFeaturizerModule",
            "n_features": featurizer.width, "additional_config": {}}
    return info, {}, None if indices is None else [int(i) for i in indices.tolist()]


class _RotateLayer(torch.nn.Module):
    """A weight `width k`, as pyvene's LowRankRotateLayer holds it (MIB rebuilds that class)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.clone())


def export_mib(featurizer, directory, task: str, variable: str | None = None, model_class: str | None = None,
               token: str | None = None) -> Path:
    """Write a trained featurizer in MIB's causal-variable submission layout (module docstring).

    Args:
        featurizer: a featurizer that knows its site (trained by `model.das`, or loaded).
        directory: the submission folder; `{task}_{model_class}_{variable}/` is made in it.
        task: MIB's task name (`4_answer_MCQA`, `ioi_task`, ... or your own).
        variable: the causal variable (default: the featurizer's).
        model_class: the transformers class name (default: from the featurizer's model, e.g.
            `LlamaForCausalLM` for the embedded model, if known; else required).
        token: the token position's id in the unit name (default from the site's positions:
            `last_token` for `@-1`, `name_last_token` for `@'{name}'`).

    Returns the unit's folder. Example: `export_mib(das, "submission", task="gender_task")`.
    """
    if not getattr(featurizer, "site", None):
        raise CausalError("export_mib needs a featurizer that knows its site (one model.das trained, or loaded)")
    variable = variable or featurizer.variable
    model_class = model_class or featurizer.meta.get("model_class")
    if not variable or not model_class:
        raise CausalError("give variable= and model_class= (the transformers class, e.g. LlamaForCausalLM): this "
                          "featurizer does not record them")
    folder = Path(directory) / f"{task}_{model_class}_{variable}"
    folder.mkdir(parents=True, exist_ok=True)
    unit = unit_name(featurizer, token)
    info, state, indices = _modules(featurizer)
    torch.save({"model_info": info, "state_dict": state}, folder / f"{unit}_featurizer")
    torch.save({"model_info": info, "state_dict": state}, folder / f"{unit}_inverse_featurizer")
    (folder / f"{unit}_indices").write_text(json.dumps(indices))
    return folder


def import_mib(folder) -> list:
    """The featurizers of one MIB submission folder (`{TASK}_{MODEL}_{VARIABLE}/`), each with
    its site (`resid_pre.L@...`, `head.L.H@...`; the token id kept in `meta["token"]`), read
    with `torch.load(weights_only=True)`."""
    from .featurizers import Identity, Subspace

    folder = Path(folder)
    files = sorted(folder.glob("*_featurizer")) if folder.is_dir() else []
    units = [f for f in files if not f.name.endswith("_inverse_featurizer")]
    if not units:
        raise CausalError(f"{folder} holds no MIB featurizers ({{UNIT}}_featurizer files)")
    made = []
    for path in units:
        unit = path.name[: -len("_featurizer")]
        matched = UNIT.match(unit)
        if not matched:
            raise CausalError(f"{path.name}: not an MIB unit name (ResidualStream(Layer-L,Token-t) or "
                              "AttentionHead(Layer-L,Head-H,Token-t))")
        saved = torch.load(path, weights_only=True)
        info = saved["model_info"]
        indices_path = folder / f"{unit}_indices"
        indices = json.loads(indices_path.read_text()) if indices_path.is_file() else None
        if info["featurizer_class"] == "SubspaceFeaturizerModule":
            featurizer = Subspace(info["additional_config"]["rotation_matrix"])
        elif info["featurizer_class"] == "IdentityFeaturizerModule":
            featurizer = Identity(info["n_features"], indices)
        else:
            raise CausalError(f"{path.name}: featurizer class {info['featurizer_class']} is not one MIB saves "
                              "(SubspaceFeaturizerModule, IdentityFeaturizerModule)")
        if matched["layer"] is not None:
            featurizer.site = f"resid_pre.{matched['layer']}"
            token = matched["token"]
        else:
            featurizer.site = f"head.{matched['head_layer']}.{matched['head']}"
            token = matched["head_token"]
        featurizer.meta = {"token": token, "unit": unit}
        named = _FOLDER.match(folder.name)
        featurizer.variable = named["variable"] if named else None
        made.append(featurizer.eval())
    return made
