"""`python -m mechnb`: the runs mechnb offers outside the notebook, in one process or under torchrun.

    python -m mechnb collect --config collect.yaml
    python -m mechnb train sae --config sae.yaml
    python -m mechnb train transcoders --config run.yaml
    torchrun --nproc-per-node 8 -m mechnb train transcoders --config run.yaml
    srun torchrun --nnodes $SLURM_NNODES --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint $HEAD:29500 -m mechnb train transcoders --config run.yaml

A config (YAML or JSON) holds the call's keyword arguments, plus:
- `model`: a hub id or a directory (no model: the embedded SmolLM2), for `collect` and
  `train transcoders`;
- `texts`: a file of texts (one document a line; `.jsonl`: one JSON string a line), or
  `python_docs` (`python_docs:eval` for the held-out part), for the same;
- `store`: the directory of a collected store, for `train sae`; `site`, `n_tokens`, `store`
  for `collect`;
- `output`: where rank 0 saves the trained SAE or transcoder set.

Under torchrun every rank runs the same command; the strategy is the config's `strategy`
(`ddp`, `layers`, `features`). `python -m mechnb run FOLDER` is one rank of a job that
`mechnb.launch` started from a notebook.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _config(path: str) -> dict:
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        return yaml.safe_load(text) or {}
    return json.loads(text)


def _texts(spec):
    """A config's texts: a file (one document a line, or JSON lines) or `python_docs[:split]`."""
    if isinstance(spec, list):
        return spec
    if isinstance(spec, str) and spec.startswith("python_docs"):
        from .datasets import python_docs

        split = spec.split(":", 1)[1] if ":" in spec else "train"
        return python_docs(split)
    path = Path(spec)
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return [json.loads(line) for line in lines] if path.suffix == ".jsonl" else lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mechnb", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="one rank of a job started by mechnb.launch")
    run.add_argument("folder")
    train = commands.add_parser("train", help="train an SAE or a transcoder set")
    train.add_argument("what", choices=["sae", "transcoders"])
    train.add_argument("--config", required=True)
    collect = commands.add_parser("collect", help="collect a site's activations to a store on disk")
    collect.add_argument("--config", required=True)
    args = parser.parse_args(argv)

    if args.command == "run":
        from .notebook.launch import run_job

        run_job(args.folder)
        return 0

    from . import load
    from .core import distributed

    world = distributed.init()
    config = _config(args.config)
    output = config.pop("output", None)
    if args.command == "collect":
        model = load(config.pop("model", None), device=str(distributed.device()))
        store = model.collect(config.pop("site"), _texts(config.pop("texts")), config.pop("n_tokens"),
                              store=config.pop("store"), **config)
        if world.main:
            print(f"collected {len(store)} rows of {store.site} in {config.get('store', store)}")
        return 0
    if args.what == "sae":
        from .sae import train as train_sae
        from .sae.shards import open_store

        result = train_sae(open_store(config.pop("store")), **config)
    else:
        from .transcoders import train as train_transcoders

        model = load(config.pop("model", None), device=str(distributed.device()))
        result = train_transcoders(model, _texts(config.pop("texts")), **config)
    with world.main_writes() as main:
        if main and output:
            result.save(output)
            print(f"saved to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
