"""A Hugging Face hub cache laid out by hand (`models--org--name/refs/main`, `snapshots/<sha>/...`),
which `hf_hub_download` reads offline: how the hub loaders and tutorial 04 are tested without
a network."""

import json
from pathlib import Path

import numpy as np

SHA = "a" * 40


def lay_out(cache: Path, repo: str, files: dict) -> Path:
    """Write `files` (path in the repo -> tensors dict for .npz / .safetensors, a dict for JSON,
    or bytes) into `cache` (what HF_HUB_CACHE names) as the main revision of `repo`."""
    from safetensors.torch import save_file

    root = Path(cache) / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(SHA)
    for name, content in files.items():
        path = root / "snapshots" / SHA / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, dict) and name.endswith(".npz"):
            np.savez(path, **{k: v.numpy() for k, v in content.items()})
        elif isinstance(content, dict) and name.endswith(".safetensors"):
            save_file({k: v.contiguous() for k, v in content.items()}, str(path))
        elif isinstance(content, dict):
            path.write_text(json.dumps(content))
        else:
            path.write_bytes(content)
    return root


def gemma_scope_stand_in(cache: Path, d_sae: int = 16) -> None:
    """A Gemma Scope file of the right format and input width (Gemma 2 2B's 2304) but `d_sae`
    random features, where tutorial 04 looks for `gemma-scope-2b-pt-res`'s layer 20 SAE."""
    import torch

    g = torch.Generator().manual_seed(0)
    weights = {"W_enc": torch.randn(2304, d_sae, generator=g) / 48, "W_dec": torch.randn(d_sae, 2304, generator=g) / 4,
               "b_enc": torch.zeros(d_sae), "b_dec": torch.zeros(2304), "threshold": torch.full((d_sae,), 0.1)}
    lay_out(cache, "google/gemma-scope-2b-pt-res", {"layer_20/width_16k/average_l0_71/params.npz": weights})
