"""Jobs over several processes, started from the notebook: `mechnb.launch`.

Training a set of transcoders on hundreds of millions of tokens runs on N GPUs (or N CPU
processes) under torchrun, every rank running the same call. `launch` writes the call to a
job folder, starts `torchrun --nproc-per-node N -m mechnb run FOLDER` in the background, and
returns a `Job`: shown in a cell, it is a live view of every rank's progress (step, tokens/s,
loss, dead features) that updates until the job ends; `job.result()` waits and loads what
rank 0 saved.

    >>> job = mechnb.launch(mechnb.transcoders.train, model="org/model", texts=texts, width=16384, k=64,
    ...                     nproc=8, strategy="ddp")
    >>> job                       # the live view
    >>> tcs = job.result()        # loaded into this kernel when the job ends

What crosses to the ranks: the function by its import path; keyword arguments that JSON
carries (numbers, strings, lists, dicts); a model as the name or directory it was loaded
from (each rank loads it on its own device; the embedded model by no name); texts as a list
of strings (written to the folder, one JSON line each); an activation store collected to disk
as its directory. The result crosses back through its own `save` and the loader of its kind
(an SAE, a transcoder set, a `Result`), or as JSON.

Failure: a rank that raises writes `error-{rank}.txt` (its one line and its traceback); the
others stop at their next collective (torchrun ends them, or the group's timeout does), and
`job.result()` raises one `DistributedError` line naming the rank that failed first and why
(`job.traceback(rank)` has the rest). Ctrl-C while waiting stops every rank (`job.stop()`).
A checkpoint argument resumes: launching the same call again goes on from its last save.

Gotchas: the function must be importable by the ranks (a function written in the notebook is
not: put it in a module on the path, and pass `env={"PYTHONPATH": ...}` if needed); nothing
is shared with this kernel but the folder.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ..core.errors import DistributedError

# Loaders of the results a job can return, by class name: module and function.
LOADERS = {"SAE": ("mechnb.sae", "load"), "TranscoderSet": ("mechnb.transcoders", "load"),
           "Result": ("mechnb.display.results", "Result.load"), "InterchangeResult": ("mechnb.display.results",
                                                                                      "Result.load")}


def launch(fn, nproc: int = 2, *, folder=None, env: dict | None = None, timeout: float = 120, **kwargs) -> "Job":
    """Run `fn(**kwargs)` as a job of `nproc` processes under torchrun (see the module docstring).

    Args:
        fn: an importable function (`mechnb.transcoders.train`, `mechnb.sae.train`, ...).
        nproc: processes (ranks) on this machine: one per GPU, or CPU processes.
        folder: the job's folder (default: a new temporary one): the call, each rank's
            progress and errors, torchrun's log, the result.
        env: environment variables for the ranks (`PYTHONPATH`, `CUDA_VISIBLE_DEVICES`, ...).
        timeout: seconds a rank waits at a collective for the others before the job fails.
        kwargs: the call's arguments (`model=`, `texts=`, `strategy=`, ...).

    Returns a running `Job`. Example: `mechnb.launch(mechnb.sae.train, store="acts/", k=64, nproc=2)`.
    """
    from ..core.checks import is_int

    if not callable(fn) or getattr(fn, "__module__", None) in (None, "__main__") or "<locals>" in fn.__qualname__:
        raise DistributedError(f"launch runs an importable function (mechnb.transcoders.train, a function of a "
                               f"module), not {getattr(fn, '__qualname__', fn)!r}: the ranks import it by name")
    if not is_int(nproc) or nproc < 1:
        raise DistributedError(f"nproc, the processes to start, must be a positive int, got {nproc!r}")
    folder = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="mechnb-job-"))
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [*folder.glob("progress-*.jsonl"), *folder.glob("error-*.txt"), *folder.glob("done-*")]:
        stale.unlink()
    spec = {"function": f"{fn.__module__}:{fn.__qualname__}", "kwargs": encode(kwargs, folder), "nproc": nproc}
    (folder / "job.json").write_text(json.dumps(spec, indent=1))
    port = _free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--rdzv-backend",
               "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--max-restarts", "0", "-m", "mechnb", "run",
               str(folder)]
    threads = max(1, (os.cpu_count() or 1) // nproc)
    environment = {**os.environ, "MECHNB_JOB": str(folder), "MECHNB_DISTRIBUTED_TIMEOUT": str(timeout),
                   "OMP_NUM_THREADS": str(threads), **(env or {})}
    log = open(folder / "log.txt", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment,
                               start_new_session=True)
    log.close()
    return Job(folder, process, nproc, spec["function"])


class Job:
    """A job started by `launch`: its folder, its processes, its progress and its result."""

    def __init__(self, folder: Path, process, nproc: int, function: str):
        self.folder, self.process, self.nproc, self.function = folder, process, nproc, function
        self.started = time.time()
        self._stopped = False

    def __repr__(self) -> str:
        return f"<mechnb Job {self.function} on {self.nproc} ranks: {self.status} ({self.folder})>"

    @property
    def status(self) -> str:
        """`running`, `done`, `failed` or `stopped`."""
        code = self.process.poll()
        if code is None:
            return "running"
        if self._stopped:
            return "stopped"
        return "done" if code == 0 and (self.folder / "result.json").is_file() else "failed"

    @property
    def progress(self):
        """Every rank's reports so far, as a DataFrame (`rank`, `time`, `step`, `steps`, `tokens`, ...)."""
        import pandas as pd

        rows = []
        for path in sorted(self.folder.glob("progress-*.jsonl")):
            for line in path.read_text().splitlines():
                if line.strip():
                    rows.append(json.loads(line))
        return pd.DataFrame(rows)

    def summary(self):
        """Each rank's latest figures, with its tokens per second: one row a rank."""
        import pandas as pd

        progress = self.progress
        if progress.empty:
            return pd.DataFrame(columns=["rank", "step", "steps", "tokens/s", "loss", "dead"])
        rows = []
        for rank, part in progress.groupby("rank"):
            last = part.iloc[-1]
            rate = (last.get("tokens", 0) / max(last["time"] - self.started, 1e-6)) if "tokens" in part else float("nan")
            row = {"rank": int(rank), "step": int(last.get("step", 0)), "steps": int(last.get("steps", 0)),
                   "tokens/s": round(rate / self.nproc), **{key: last[key] for key in ("loss", "fvu", "dead")
                                                            if key in part}}
            rows.append(row)
        return pd.DataFrame(rows)

    def error(self) -> str | None:
        """The one line that says which rank failed first and why (None while none has)."""
        errors = {int(path.stem.split("-")[1]): path.read_text() for path in self.folder.glob("error-*.txt")}
        if not errors and self.process.poll() in (None, 0):
            return None
        # A rank whose error is not the group's (another rank stopping) failed first.
        first = [rank for rank, text in sorted(errors.items()) if not text.startswith("DistributedError")]
        if first:
            rank = first[0]
            return f"rank {rank} of {self.nproc} failed: {errors[rank].splitlines()[0]}"
        done = {int(path.name.split("-")[1]) for path in self.folder.glob("done-*")}
        silent = [rank for rank in range(self.nproc) if rank not in errors and rank not in done]
        if silent:
            return (f"rank {silent[0]} of {self.nproc} ended without an error (killed, or out of memory?); "
                    f"{'the others: ' + next(iter(errors.values())).splitlines()[0] if errors else 'see log.txt'}")
        if errors:
            rank = min(errors)
            return f"rank {rank} of {self.nproc} failed: {errors[rank].splitlines()[0]}"
        return f"the job ended with exit code {self.process.poll()} before any rank started: see {self.folder}/log.txt"

    def traceback(self, rank: int = 0) -> str:
        """What rank `rank` wrote when it failed (its line and traceback), or torchrun's log."""
        path = self.folder / f"error-{rank}.txt"
        return path.read_text() if path.is_file() else (self.folder / "log.txt").read_text()

    def wait(self, timeout: float | None = None) -> str:
        """Wait for the job to end (Ctrl-C stops every rank); its status."""
        try:
            self.process.wait(timeout=timeout)
        except KeyboardInterrupt:
            self.stop()
            raise
        return self.status

    def stop(self) -> None:
        """End every rank now (torchrun and its workers, one process group)."""
        if self.process.poll() is None:
            self._stopped = True
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            except ProcessLookupError:
                pass

    def result(self, timeout: float | None = None):
        """Wait for the job, then what rank 0 returned, loaded into this kernel; a
        `DistributedError` line naming the failed rank otherwise."""
        status = self.wait(timeout)
        if status == "stopped":
            raise DistributedError(f"the job was stopped (job.stop()); its folder is {self.folder}")
        if status != "done":
            raise DistributedError(f"{self.error()}; job.traceback(rank) shows where")
        saved = json.loads((self.folder / "result.json").read_text())
        if saved["kind"] == "json":
            return saved["value"]
        module, name = saved["loader"]
        import importlib

        loader = importlib.import_module(module)
        for part in name.split("."):
            loader = getattr(loader, part)
        return loader(self.folder / "result")

    # -- the live view --------------------------------------------------------------------

    def html(self) -> str:
        """The view as HTML: the status, then a row a rank (step of steps, tokens/s, loss, dead)."""
        import html

        summary = self.summary()
        status = self.status
        line = {"running": f"running for {time.time() - self.started:.0f} s", "done": "done: job.result() loads it",
                "stopped": "stopped", "failed": html.escape(self.error() or "failed")}[status]
        rows = "".join("<tr>" + "".join(f"<td style='padding:2px 8px'>{html.escape(_shown(v))}</td>"
                                        for v in row) + "</tr>" for row in summary.itertuples(index=False))
        head = "".join(f"<th style='padding:2px 8px'>{html.escape(str(c))}</th>" for c in summary.columns)
        return (f"<div class='mechnb-job'><b>{html.escape(self.function)}</b> on {self.nproc} ranks · {line}"
                f"<table><tr>{head}</tr>{rows}</table></div>")

    def widget(self, every: float = 0.5):
        """An ipywidgets HTML view that updates itself every `every` seconds until the job ends."""
        import ipywidgets

        view = ipywidgets.HTML(self.html())

        def follow():
            while self.process.poll() is None:
                time.sleep(every)
                view.value = self.html()
            view.value = self.html()

        threading.Thread(target=follow, daemon=True).start()
        return view

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget())


def _shown(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- the call, across processes ----------------------------------------------------------------

def encode(kwargs: dict, folder: Path) -> dict:
    """The call's arguments as JSON (see the module docstring); texts to `folder/texts.jsonl`."""
    from ..core.model import ModelBase
    from ..sae.shards import ShardedStore
    from ..sae.store import ActivationStore

    encoded = {}
    for key, value in kwargs.items():
        if key == "model" and (value is None or isinstance(value, (str, Path))):
            encoded[key] = {"__model__": None if value is None else str(value)}  # a name, loaded by each rank
        elif isinstance(value, ModelBase):
            source = getattr(value.hf.config, "_name_or_path", "") if not value.is_plain else None
            if value.is_plain or "(embedded)" in value.name:
                source = None if "(embedded)" in value.name else source
                if value.is_plain:
                    raise DistributedError(f"{key}: a plain torch module cannot be sent to the ranks; launch a "
                                           "function that builds it")
            encoded[key] = {"__model__": source}
        elif isinstance(value, ShardedStore):
            encoded[key] = {"__store__": str(value.folder)}
        elif isinstance(value, ActivationStore):
            path = getattr(value.data, "filename", None)
            if path is None:
                raise DistributedError(f"{key}: an activation store in memory cannot reach the ranks; collect it "
                                       "to disk (store='acts/') and pass it, or its directory")
            encoded[key] = {"__store__": str(Path(path).parent)}
        elif key == "texts" and not isinstance(value, (str, dict)):
            with open(folder / "texts.jsonl", "w") as stream:
                for text in value:
                    stream.write(json.dumps(text) + "\n")
            encoded[key] = {"__texts__": "texts.jsonl"}
        else:
            try:
                json.dumps(value)
            except TypeError:
                raise DistributedError(f"{key}={type(value).__name__} cannot be sent to the ranks: give JSON values "
                                       "(numbers, strings, lists, dicts), a model, texts or a store on disk") from None
            encoded[key] = value
    return encoded


def decode(encoded: dict, folder: Path) -> dict:
    """The call's arguments in a rank: a model loaded on this rank's device, texts, stores."""
    from ..core import distributed

    decoded = {}
    for key, value in encoded.items():
        if isinstance(value, dict) and "__model__" in value:
            from ..model import load

            decoded[key] = load(value["__model__"], device=str(distributed.device()))
        elif isinstance(value, dict) and "__store__" in value:
            from ..sae.shards import open_store

            decoded[key] = open_store(value["__store__"])
        elif isinstance(value, dict) and "__texts__" in value:
            decoded[key] = [json.loads(line) for line in (folder / value["__texts__"]).read_text().splitlines()
                            if line.strip()]
        else:
            decoded[key] = value
    return decoded


def run_job(folder) -> None:
    """One rank's part of a launched job (`python -m mechnb run FOLDER`, under torchrun)."""
    import importlib
    import inspect
    import traceback

    from ..core import distributed

    folder = Path(folder)
    rank = int(os.environ.get("RANK", 0))
    try:
        world = distributed.init()
        spec = json.loads((folder / "job.json").read_text())
        module, name = spec["function"].split(":")
        fn = importlib.import_module(module)
        for part in name.split("."):
            fn = getattr(fn, part)
        kwargs = decode(spec["kwargs"], folder)
        if "progress" in inspect.signature(fn).parameters:
            kwargs.setdefault("progress", False)
        result = fn(**kwargs)
        with world.main_writes() as main:
            if main:
                _save_result(result, folder)
        (folder / f"done-{rank}").write_text("")
    except BaseException as error:
        (folder / f"error-{rank}.txt").write_text(f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                                                  f"\n{traceback.format_exc()}")
        raise


def _save_result(result, folder: Path) -> None:
    kind = type(result).__name__
    if kind in LOADERS and hasattr(result, "save"):
        result.save(folder / "result")
        record = {"kind": "saved", "class": kind, "loader": list(LOADERS[kind])}
    else:
        try:
            record = {"kind": "json", "value": json.loads(json.dumps(result))}
        except TypeError:
            raise DistributedError(f"the job returned {kind}, which neither saves nor is JSON: return an SAE, a "
                                   "transcoder set, a Result, or JSON values") from None
    (folder / "result.json").write_text(json.dumps(record))
