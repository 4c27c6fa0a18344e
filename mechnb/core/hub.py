"""Files from the Hugging Face hub, through the user's Hugging Face cache, with one-line errors.

Only the loaders of published SAEs and transcoders call this, when the user names a hub
repository or a release (`mechnb.sae.load("gemma-scope-2b-pt-res", ...)`): nothing else
in mechnb touches the network. A file downloaded once is reused from the cache, offline
too (`HF_HUB_OFFLINE=1`), exactly as transformers reuses models.

    >>> path = fetch("google/gemma-scope-2b-pt-res", "layer_20/width_16k/average_l0_71/params.npz", SAEError)

`same_model` compares the model a file was made for with a loaded model's name.
"""

from __future__ import annotations

import re
from pathlib import Path

# TransformerLens' names for models, where they differ from the Hugging Face id's last part.
_TL_MODEL_NAMES = {"gpt2-small": "gpt2", "gpt2-medium": "gpt2-medium", "pythia-70m-deduped": "pythia-70m-deduped"}


def fetch(repo: str, filename: str, error: type[Exception], revision: str | None = None,
          local_only: bool = False) -> Path:
    """The local path of `filename` in hub repo `repo`, downloaded into the Hugging Face cache
    if it is not there yet (never, with `local_only`); `error` (one line naming the repo and
    the file) if it cannot be had."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub import errors as hub_errors

    where = f"{repo}/{filename}"
    try:
        return Path(hf_hub_download(repo, filename, revision=revision, local_files_only=local_only))
    except hub_errors.LocalEntryNotFoundError:
        why = ("local_only=True" if local_only and not offline() else
               "the hub cannot be reached (offline, or HF_HUB_OFFLINE=1)")
        raise error(f"{where} is not in the Hugging Face cache ({_cache_dir()}) and {why}: download it once "
                    "with a network") from None
    except hub_errors.GatedRepoError:
        raise error(f"{repo} is gated: accept its licence on huggingface.co and log in "
                    f"(`hf auth login`) to download {filename}") from None
    except hub_errors.RepositoryNotFoundError:
        raise error(f"there is no hub repository {repo!r} (or it is private: log in with `hf auth login`)") from None
    except hub_errors.RevisionNotFoundError:
        raise error(f"{repo} has no revision {revision!r}") from None
    except hub_errors.EntryNotFoundError:
        raise error(f"{repo} has no file {filename}") from None
    except OSError as failure:  # connection errors, a full disk
        raise error(f"cannot download {where}: {type(failure).__name__}: {str(failure).splitlines()[0]}") from None


def find(repo: str, filenames: list[str], error: type[Exception], revision: str | None = None,
         local_only: bool = False) -> dict[str, Path]:
    """The files among `filenames` that `repo` has (local paths), trying each in turn;
    missing ones are left out. Offline, those not in the cache count as missing."""
    found = {}
    for name in filenames:
        try:
            found[name] = fetch(repo, name, error, revision, local_only)
        except error as failure:
            if " has no file " not in str(failure) and "is not in the Hugging Face cache" not in str(failure):
                raise
    return found


def offline() -> bool:
    """True when huggingface_hub is told not to use the network (`HF_HUB_OFFLINE=1`)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def short_name(name) -> str:
    """A model's name without its organisation or directory, lower case, TransformerLens'
    names mapped to the hub's, a note in brackets dropped: `google/gemma-2-2b` -> `gemma-2-2b`,
    `gpt2-small` -> `gpt2`, `SmolLM2-135M-Instruct (embedded)` -> `smollm2-135m-instruct`."""
    short = re.sub(r"\s*\(.*\)$", "", str(name).strip()).rstrip("/").rsplit("/", 1)[-1].lower()  # "(embedded)"
    return _TL_MODEL_NAMES.get(short, short)


def same_model(made_for, name) -> bool:
    """True unless both names are known and differ (`short_name`)."""
    return not made_for or not name or short_name(made_for) == short_name(name)
