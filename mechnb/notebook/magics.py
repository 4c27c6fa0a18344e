"""The magics: notebook sugar over the Python API. Each parses, calls one API function, shows.

    %load_ext mechnb
    %mechnb load                       # embedded SmolLM2-135M-Instruct; binds `model`
    %mechnb info
    %mechnb top "The Eiffel Tower is located in the city of" -k 5

    %%trace "When Mary and John went to the store, John gave a drink to"
    h = model["resid_post.5"].save()
    model["head.9.6"] = 0
    logits = model["logits"].save()

Arguments are split like a shell line; `{expr}` alone passes the Python object
(`%%trace {prompts}` passes a list), and inside a longer word it is formatted into
the text, as IPython users expect. Errors of mechnb (`MechnbError`) print as one
line, without a traceback, wherever they are raised in the shell.

The session (one per shell) holds the current model; `%mechnb use {m}` adopts a
model loaded from Python.

Gotchas: `%%trace` runs its cell through `mechnb.notebook.cells` (a new file name per
run, for nnsight, which reads the traced block's source). Names assigned in the cell
survive only when `.save()`d (nnsight).
"""

from __future__ import annotations

import re
import sys

from IPython.core.magic import Magics, cell_magic, line_magic, magics_class, no_var_expand

from ..core.errors import MagicError, MechnbError, ModelError
from .options import parse_options, percentage, split_args
from .reference import help_text


class Session:
    """One per shell: the current model. The only state the magics keep."""

    def __init__(self):
        self.model = None
        self.server = None  # the MCP server `%mechnb serve` started, if any

    def require(self):
        """The current model, or a `ModelError` that says how to get one."""
        if self.model is None:
            raise ModelError("no model loaded: run `%mechnb load` first (or `%mechnb use {model}` "
                             "for a model loaded in Python)")
        return self.model


@magics_class
class MechnbMagics(Magics):
    """`%mechnb` and `%%trace` (see the module docstring)."""

    def __init__(self, shell):
        super().__init__(shell)
        self.session = Session()

    @no_var_expand
    @line_magic
    def mechnb(self, line: str):
        """Load and inspect models: `%mechnb help` lists the commands."""
        words = split_args(line, self.shell.user_ns)
        if not words:
            print(help_text())
            return None
        command, rest = words[0], words[1:]
        handler = getattr(self, f"_cmd_{command}", None) if isinstance(command, str) else None
        if handler is None:
            commands = ", ".join(n[5:] for n in dir(self) if n.startswith("_cmd_"))
            raise MagicError(f"unknown command {command!r} for %mechnb: valid commands are {commands}")
        return handler(rest)

    def _cmd_help(self, words):
        print(help_text())

    def _cmd_load(self, words):
        from ..model import load

        positional, options = parse_options(
            words, {"--device": str, "--dtype": str, "--device-map": str, "--remote": bool, "--as": str},
            "%mechnb load")
        if len(positional) > 1:
            raise MagicError(f"%mechnb load takes at most one model name, got {positional}")
        name = options.pop("as", "model")
        if not name.isidentifier():
            raise MagicError(f"--as takes a Python name, got {name!r}")
        # The old model stays until the new one has loaded: a failed load changes nothing.
        model = load(positional[0] if positional else None, **options)
        self.session.model = model
        self.shell.user_ns[name] = model
        print(f"{model!r} bound to `{name}`")

    def _cmd_use(self, words):
        from ..core.model import ModelBase as Model

        if len(words) != 1 or not isinstance(words[0], (str, Model)):
            raise MagicError("%mechnb use takes one model: `%mechnb use m` or `%mechnb use {m}`")
        model = words[0]
        if isinstance(model, str):
            model = self.shell.user_ns.get(model)
        if not isinstance(model, Model):
            raise MagicError(f"{words[0]!r} is not a mechnb Model: load one with mechnb.load()")
        self.session.model = model

    def _cmd_unload(self, words):
        if words:
            raise MagicError(f"%mechnb unload takes no arguments, got {words}")
        self.session.model = None
        print("model unloaded")

    def _cmd_serve(self, words):
        """`%mechnb serve [--port N] [--allow-exec]`: the session's model as an MCP server over HTTP
        on 127.0.0.1, with the client settings and a live log of the calls (`server = %mechnb serve`
        keeps the server: `.url`, `.token`, `.config()`); `--stop` ends it."""
        from IPython.display import HTML, display

        from ..agent.server import CallLog, HTTPServer
        from ..agent.tools import Toolbox

        positional, options = parse_options(words, {"--port": int, "--allow-exec": bool, "--stop": bool},
                                            "%mechnb serve")
        if positional:
            raise MagicError(f"%mechnb serve takes only options (--port N, --allow-exec, --stop), got {positional}")
        if options.get("stop"):
            if self.session.server is None:
                raise MagicError("no MCP server is running: %mechnb serve starts one")
            self.session.server.stop()
            print(f"stopped {self.session.server!r}")
            self.session.server = None
            return None
        if self.session.server is not None:
            raise MagicError(f"an MCP server is running already ({self.session.server.url}): "
                             "%mechnb serve --stop ends it")
        log = CallLog()
        toolbox = Toolbox(self.session.require(), allow_exec=options.get("allow_exec", False), on_call=log.add)
        server = HTTPServer(toolbox, port=options.get("port", 0))
        self.session.server = server
        display(HTML(server.html()))
        log.handle = display(HTML(log.html()), display_id=True)
        return server

    def _cmd_info(self, words):
        import pandas as pd

        if words:
            raise MagicError(f"%mechnb info takes no arguments, got {words}: it describes the session's model")
        info = self.session.require().info()
        return pd.DataFrame({"value": list(info.values())}, index=list(info.keys()))

    def _cmd_top(self, words):
        positional, options = parse_options(words, {"-k": int}, "%mechnb top")
        if len(positional) != 1 or not isinstance(positional[0], str):
            raise MagicError('%mechnb top takes one prompt in quotes: %mechnb top "The sky is"')
        return self.session.require().top(positional[0], **options)

    @no_var_expand
    @line_magic
    def ablate(self, line: str):
        """`%ablate SITE... [--mode zero|mean|resample] [--ref {prompts}] [--positions P] [--seed N]`"""
        sites, options = self._parse(line, {"--mode": str, "--ref": object, "--positions": str,
                                            "--seed": int}, "%ablate")
        if not sites:
            raise MagicError("%ablate takes at least one site: %ablate head.9.6 --mode mean --ref {prompts}")
        model = self.session.require()
        model.ablate(sites, **options)
        return model.interventions_table()

    @no_var_expand
    @line_magic
    def interventions(self, line: str):
        """`%interventions [--clear] [--remove N...]`: the active interventions as a table."""
        positional, options = self._parse(line, {"--clear": bool, "--remove": list}, "%interventions")
        if positional:
            raise MagicError(f"%interventions takes only --clear or --remove N, got {positional}")
        model = self.session.require()
        if options.get("clear"):
            model.clear()
        if "remove" in options:
            current = model.interventions
            numbers = [str(i) for i in options["remove"]]
            if not all(re.fullmatch(r"\d+", n) and int(n) < len(current) for n in numbers):
                valid = f"(0-{len(current) - 1})" if current else "(none: no intervention is active)"
                raise MagicError(f"--remove takes numbers from the # column {valid}, got {options['remove']}")
            model.remove([current[int(n)] for n in numbers])
        return model.interventions_table()

    _PATCH_OPTIONS = {"--clean": object, "--corrupt": object, "--answer": object, "--wrong": object,
                      "--metric": object, "--method": str, "--normalize": bool, "--noising": bool,
                      "--batch-size": int, "-o": str}

    @no_var_expand
    @line_magic
    def patch(self, line: str):
        """`%patch --clean C --corrupt X --answer A --wrong W --sites S... [--per-position |
        --all-positions] [--method exact|attribution] [--metric M] [--normalize] [--noising] [-o NAME]`"""
        options = self._options(line, {**self._PATCH_OPTIONS, "--sites": list, "--per-position": bool,
                                       "--all-positions": bool}, "%patch")
        output = options.pop("o", None)
        if "sites" not in options:
            raise MagicError("%patch needs --sites, e.g. --sites resid_pre.* or --sites head.*.*")
        if options.pop("all_positions", False):
            options["per_position"] = False
        result = self.session.require().patch(options.pop("clean", None), options.pop("corrupt", None),
                                              options.pop("sites"), **_direction(options))
        return self._keep(result, output)

    @no_var_expand
    @line_magic
    def path_patch(self, line: str):
        """`%path_patch --clean C --corrupt X --senders S... --receivers R... --answer A --wrong W
        [--freeze heads|all|none] [--normalize] [--noising] [-o NAME]`"""
        allowed = {k: v for k, v in self._PATCH_OPTIONS.items() if k != "--method"}
        options = self._options(line, {**allowed, "--senders": list, "--receivers": list,
                                       "--freeze": str}, "%path_patch")
        output = options.pop("o", None)
        for needed in ("senders", "receivers"):
            if needed not in options:
                raise MagicError(f"%path_patch needs --{needed}, e.g. --senders head.*.* --receivers head.20.3")
        result = self.session.require().path_patch(
            options.pop("clean", None), options.pop("corrupt", None), options.pop("senders"),
            options.pop("receivers"), **_direction(options))
        return self._keep(result, output)

    @no_var_expand
    @line_magic
    def attention(self, line: str):
        """`%attention PROMPT [--layers 20:26] [--heads 0:4] [-o NAME]`"""
        prompt, options = self._prompt(line, {"--layers": object, "--heads": object, "-o": str},
                                       "%attention")
        output = options.pop("o", None)
        return self._keep(self.session.require().attention(prompt, **options), output)

    @no_var_expand
    @line_magic
    def activations(self, line: str):
        """`%activations SITE|{direction} PROMPT|{prompts} [--site resid_post.L] [-o NAME]`"""
        positional, options = self._parse(line, {"--site": str, "-o": str}, "%activations")
        if len(positional) != 2:
            raise MagicError("%activations takes a site (or {direction}) and a prompt (or {prompts}): "
                             "%activations neuron.12.301 {prompts}")
        output = options.pop("o", None)
        return self._keep(self.session.require().activations(*positional, **options), output)

    @no_var_expand
    @line_magic
    def lens(self, line: str):
        """`%lens PROMPT [-k K] [-o NAME]`: the logit lens."""
        prompt, options = self._prompt(line, {"-k": int, "-o": str}, "%lens")
        output = options.pop("o", None)
        return self._keep(self.session.require().logit_lens(prompt, **options), output)

    @no_var_expand
    @line_magic
    def dla(self, line: str):
        """`%dla PROMPT --answer A [--wrong W] [-o NAME]`: direct logit attribution."""
        prompt, options = self._prompt(line, {"--answer": object, "--wrong": object, "-o": str}, "%dla")
        output = options.pop("o", None)
        if "answer" not in options:
            raise MagicError('%dla needs --answer, e.g. %dla "..." --answer " Mary" --wrong " John"')
        return self._keep(self.session.require().dla(prompt, **options), output)

    @no_var_expand
    @line_magic
    def heads(self, line: str):
        """`%heads --detect KIND... [--n-samples N] [--seq-len N] [--seed S] [-o NAME]`"""
        options = self._options(line, {"--detect": list, "--n-samples": int, "--seq-len": int,
                                       "--seed": int, "-o": str}, "%heads")
        output = options.pop("o", None)
        if "detect" in options:
            kinds = options.pop("detect")
            options["kind"] = kinds[0] if len(kinds) == 1 else kinds
        return self._keep(self.session.require().detect_heads(**options), output)

    @no_var_expand
    @line_magic
    def attribute(self, line: str):
        """`%attribute PROMPT [--method gim|gradient|grad_x_input|integrated_gradients]
        [--target T] [--steps N] [-o NAME]`: which input tokens drive the prediction."""
        prompt, options = self._prompt(line, {"--method": str, "--target": object, "--steps": int,
                                              "-o": str}, "%attribute")
        output = options.pop("o", None)
        return self._keep(self.session.require().attribute(prompt, **options), output)

    @no_var_expand
    @line_magic
    def circuit(self, line: str):
        """`%circuit --clean C --corrupt X --answer A --wrong W [--method M] [--level L]
        [--steps N] [--metric M] [--top 2%] [--fractions F...] [--no-faithfulness] [-o NAME]`"""
        from IPython.display import display

        options = self._options(line, {"--clean": object, "--corrupt": object, "--answer": object,
                                       "--wrong": object, "--method": str, "--level": str, "--steps": int,
                                       "--metric": str, "--top": percentage, "--fractions": list,
                                       "--no-faithfulness": bool, "--batch-size": int, "-o": str}, "%circuit")
        output, top = options.pop("o", None), options.pop("top", None)
        fractions, skip = options.pop("fractions", None), options.pop("no_faithfulness", False)
        if fractions is not None:
            try:
                fractions = [float(f) for f in fractions]
            except (TypeError, ValueError):
                raise MagicError(f"--fractions takes numbers in (0, 1], got {fractions}") from None
        for needed in ("clean", "corrupt", "answer"):
            if needed not in options:
                raise MagicError(f"%circuit needs --{needed}, e.g. %circuit --clean {{clean}} "
                                 "--corrupt {corrupt} --answer {answers} --wrong {wrongs}")
        circuit = self.session.require().circuit(options.pop("clean"), options.pop("corrupt"),
                                                 options.pop("answer"), **options)
        if not skip:
            display(circuit.faithfulness(fractions) if fractions is not None else circuit.faithfulness())
        if top is not None:
            circuit = circuit.top(top)
        return self._keep(circuit, output)

    @no_var_expand
    @line_magic
    def generate(self, line: str):
        """`%generate PROMPT [--max-new-tokens N] [--compare] [--sample] [--temperature T]
        [--top-p P] [--seed S] [--stream] [--no-cache] [-o NAME]`"""
        prompt, options = self._prompt(line, {"--max-new-tokens": int, "--compare": bool, "--sample": bool,
                                              "--temperature": float, "--top-p": float, "--seed": int,
                                              "--stream": bool, "--no-cache": bool, "-o": str}, "%generate")
        output = options.pop("o", None)
        if "sample" in options:
            options["do_sample"] = options.pop("sample")
        if "no_cache" in options:
            options["cache"] = not options.pop("no_cache")
        return self._keep(self.session.require().generate(prompt, **options), output)

    @no_var_expand
    @line_magic
    def steer(self, line: str):
        """`%steer SITE {vector}|sae.L.F [--scale S] [--positions P]`, or `%steer --clear`."""
        positional, options = self._parse(line, {"--scale": float, "--positions": str, "--clear": bool},
                                          "%steer")
        model = self.session.require()
        if options.pop("clear", False):
            model.clear("steer")
            return None
        if len(positional) != 2:
            raise MagicError("%steer takes a site and a vector: %steer resid_pre.12 {v} --scale 8 "
                             "(or an SAE feature: %steer resid_post.12 sae.12.1234)")
        model.steer(positional[0], positional[1], **options)
        return model.interventions_table()

    @no_var_expand
    @line_magic
    def causal_trace(self, line: str):
        """`%causal_trace PROMPT --subject S [--answer A] [--kind K] [--samples N] [--noise X]
        [--window W] [-o NAME]`"""
        prompt, options = self._prompt(line, {"--subject": str, "--answer": object, "--kind": str,
                                              "--samples": int, "--noise": float, "--window": int,
                                              "-o": str}, "%causal_trace")
        output = options.pop("o", None)
        if "subject" not in options:
            raise MagicError('%causal_trace needs --subject, e.g. --subject "Eiffel Tower"')
        return self._keep(self.session.require().causal_trace(prompt, options.pop("subject"), **options), output)

    def _head(self, line: str, command: str):
        """The head (`head.L.H`) of `%ov` / `%qk`, and the options of `top_pairs`."""
        from ..core.sites import parse

        positional, options = self._parse(line, {"-k": int, "--vocab": int}, command)
        site = parse(positional[0]) if len(positional) == 1 and isinstance(positional[0], str) else None
        if site is None or site.kind != "head" or not isinstance(site.index, int) or not isinstance(site.layer, int):
            raise MagicError(f"{command} takes one head, e.g. {command} head.18.6")
        return site, options

    @no_var_expand
    @line_magic
    def ov(self, line: str):
        """`%ov head.L.H [-k K]`: the OV circuit's top pairs and copying score."""
        from IPython.display import display

        site, options = self._head(line, "%ov")
        circuit = self.session.require().ov(site.layer, site.index)
        pairs = circuit.top_pairs(**options)
        print(f"{circuit.kind}: copying score {circuit.copying_score():.3f} (1 copies, 0 anti-copies); "
              f"top pairs among {pairs.attrs['searched']}")
        display(pairs)
        return circuit

    @no_var_expand
    @line_magic
    def qk(self, line: str):
        """`%qk head.L.H [-k K]`: the QK circuit's top destination x source pairs."""
        from IPython.display import display

        site, options = self._head(line, "%qk")
        circuit = self.session.require().qk(site.layer, site.index)
        display(circuit.top_pairs(**options))
        return circuit

    @no_var_expand
    @line_magic
    def composition(self, line: str):
        """`%composition [--kind q|k|v] [-o NAME]`: composition scores, a heatmap."""
        options = self._options(line, {"--kind": str, "-o": str}, "%composition")
        output = options.pop("o", None)
        return self._keep(self.session.require().composition(**options), output)

    @no_var_expand
    @line_magic
    def coactivation(self, line: str):
        """`%coactivation SITE {texts} [--components N] [--method pca|kmeans] [-o NAME]`"""
        positional, options = self._parse(line, {"--components": int, "--method": str, "-o": str},
                                          "%coactivation")
        if len(positional) != 2:
            raise MagicError("%coactivation takes a site and texts: %coactivation mlp_out.12 {texts}")
        output = options.pop("o", None)
        return self._keep(self.session.require().coactivation(positional[0], positional[1], **options), output)

    @no_var_expand
    @line_magic
    def stability(self, line: str):
        """`%stability {circuit} [--resamples N] [--top 1%]`: fidelity and stability, one table."""
        from ..circuits import Circuit

        positional, options = self._parse(line, {"--resamples": int, "--top": percentage}, "%stability")
        if len(positional) != 1 or not isinstance(positional[0], Circuit):
            raise MagicError("%stability takes a circuit: %stability {circ} (from model.circuit or %circuit)")
        if "resamples" in options:
            options["n_resamples"] = options.pop("resamples")
        return positional[0].quality(**options)

    @no_var_expand
    @line_magic
    def features(self, line: str):
        """`%features PROMPT --sae SAE [-k K] [-o NAME]`: the top SAE features per token."""
        prompt, options = self._prompt(line, {"--sae": object, "-k": int, "-o": str}, "%features")
        from ..sae import SAE

        output = options.pop("o", None)
        model = self.session.require()
        sae = self._named(options.pop("sae", None), model.saes, SAE, "%features needs --sae naming an SAE")
        return self._keep(model.features(prompt, sae, **options), output)

    @no_var_expand
    @line_magic
    def graph(self, line: str):
        """`%graph PROMPT --transcoders TCS [--target T] [--max-feature-nodes N] [--max-logits N]
        [--batch-size N] [--no-sink] [--widget] [-o NAME]`: the attribution graph of a prompt over
        transcoders or a cross-layer transcoder (`--no-sink`: no special token put first, position
        0 kept; `--widget`: drawn live, its selection ablated or scaled on the model)."""
        prompt, options = self._prompt(line, {"--transcoders": object, "--target": object,
                                              "--max-feature-nodes": int, "--max-logits": int, "--batch-size": int,
                                              "--no-sink": bool, "--widget": bool, "-o": str}, "%graph")
        from ..transcoders import TranscoderSet

        output = options.pop("o", None)
        live = options.pop("widget", False)
        if options.pop("no_sink", False):
            options["sink"] = False
        model = self.session.require()
        tcs = self._named(options.pop("transcoders", None), model.transcoder_sets, TranscoderSet,
                          "%graph needs --transcoders naming a TranscoderSet")
        graph = self._keep(model.graph(prompt, tcs, **options), output)
        return graph.widget() if live else graph

    @no_var_expand
    @line_magic
    def interchange(self, line: str):
        """`%interchange {data} SITE... [--variable V] [--featurizer full|pca|{f}] [-k K] [--compare
        values|top1] [--batch-size N] [-o NAME]`: IIA of each site (or of a trained featurizer)."""
        positional, options = self._parse(line, {"--variable": str, "--featurizer": object, "-k": int,
                                                 "--compare": str, "--batch-size": int, "-o": str}, "%interchange")
        data, sites = self._data(positional, "%interchange", "SITE... (or {featurizer})")
        output = options.pop("o", None)
        if isinstance(options.get("featurizer"), str):
            options["featurizer"] = self.shell.user_ns.get(options["featurizer"], options["featurizer"])
        target = sites[0] if len(sites) == 1 and not isinstance(sites[0], str) else sites
        return self._keep(self.session.require().interchange(data, target, **options), output)

    @no_var_expand
    @line_magic
    def das(self, line: str):
        """`%das {data} SITE [--variable V] [-k K] [--kind das|boundless|dbm] [--epochs N] [--batch-size N]
        [--lr X] [--test X] [--seed S] [-o NAME]`: train a featurizer at SITE, report held-out IIA."""
        positional, options = self._parse(line, {"--variable": str, "-k": int, "--kind": str, "--epochs": int,
                                                 "--batch-size": int, "--lr": float, "--test": float, "--seed": int,
                                                 "-o": str}, "%das")
        data, sites = self._data(positional, "%das", "SITE")
        if len(sites) != 1:
            raise MagicError(f"%das trains at one site: %das {{data}} \"resid_post.4@'{{name}}'\", got {len(sites)}")
        output = options.pop("o", None)
        return self._keep(self.session.require().das(data, sites[0], **options), output)

    def _data(self, positional: list, command: str, rest: str):
        """The counterfactual dataset a causal magic starts with (a name or `{expr}`), and the rest."""
        from ..causal.data import Counterfactuals

        data = positional[0] if positional else None
        if isinstance(data, str):
            data = self.shell.user_ns.get(data, data)
        if not isinstance(data, Counterfactuals) or len(positional) < 2:
            raise MagicError(f"{command} takes a counterfactual dataset, then {rest}: {command} {{data}} "
                             f"\"resid_post.*@-1\" (data from cm.counterfactuals(...))")
        return data, positional[1:]

    @no_var_expand
    @line_magic
    def explore(self, line: str):
        """`%explore [PROMPT] [--answer A] [--wrong W]`: the interactive explorer widget."""
        positional, options = self._parse(line, {"--answer": object, "--wrong": object}, "%explore")
        if len(positional) > 1:
            raise MagicError('%explore takes at most one prompt: %explore "The sky is"')
        if positional:
            options["prompt"] = positional[0]
        return self.session.require().explore(**options)

    def _parse(self, line: str, spec: dict, command: str) -> tuple[list, dict]:
        """Positional words and options of a magic's line, `{expr}` evaluated in the user's namespace."""
        return parse_options(split_args(line, self.shell.user_ns), spec, command)

    def _prompt(self, line: str, spec: dict, command: str):
        """One prompt and options."""
        positional, options = self._parse(line, spec, command)
        if len(positional) != 1 or not isinstance(positional[0], (str, list)):
            raise MagicError(f'{command} takes one prompt in quotes: {command} "The sky is"')
        return positional[0], options

    def _options(self, line: str, spec: dict, command: str) -> dict:
        positional, options = self._parse(line, spec, command)
        if positional:
            raise MagicError(f"{command} takes only options (--clean ..., --corrupt ...), got {positional}")
        return options

    def _named(self, value, attached: list, cls, need: str):
        """An object an option names: a variable's name, an `{expr}`'s value, or (when the option
        is left out) the one of its kind attached to the model; `MagicError` (`need`) otherwise."""
        if isinstance(value, str):
            value = self.shell.user_ns.get(value, value)
        if value is None and len(attached) == 1:
            value = attached[0]
        if not isinstance(value, cls):
            raise MagicError(f"{need} (a variable or {{expr}}), got {value!r}")
        return value

    def _keep(self, result, name: str | None):
        """Bind a result to `name` (the `-o` option) as well as returning it for `_`."""
        if name is not None:
            if not name.isidentifier():
                raise MagicError(f"-o takes a Python name, got {name!r}")
            self.shell.user_ns[name] = result
        return result

    @no_var_expand
    @cell_magic
    def trace(self, line: str, cell: str):
        """Run the cell inside a trace of the session's model on the given prompt(s)."""
        positional, options = self._parse(line, {"--grad": bool}, "%%trace")
        if len(positional) != 1:
            raise MagicError('%%trace takes one prompt (or {prompts}): %%trace "The sky is"')
        model = self.session.require()
        from .cells import run_traced_cell

        run_traced_cell(self.shell, model, positional[0], cell, **options)


def _direction(options: dict) -> dict:
    """`--noising` as the API's `direction`; the other options as they are."""
    if options.pop("noising", False):
        options["direction"] = "noising"
    return options


def _show_one_line(shell, etype, value, tb, tb_offset=None):
    """Custom exception handler: a mechnb error is one readable line, no traceback."""
    print(f"{etype.__name__}: {value}", file=sys.stderr)
    return None


def load_extension(shell) -> None:
    """Register the magics and the one-line error display on `shell`."""
    magics = MechnbMagics(shell)
    shell.register_magics(magics)
    shell.set_custom_exc((MechnbError,), _show_one_line)


def unload_extension(shell) -> None:
    """Remove the magics, the error display and the session from `shell`."""
    manager = shell.magics_manager
    # Every magic the class defines, so none outlives the session it would reach.
    for kind, names in MechnbMagics.magics.items():
        for name in names:
            manager.magics[kind].pop(name, None)
    manager.registry.pop("MechnbMagics", None)
    shell.set_custom_exc((), None)
