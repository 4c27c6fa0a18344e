"""Published SAEs and transcoders by name: which hub repository, which model, which site.

    >>> mechnb.sae.releases()                      # a table of the names below
    >>> sae = mechnb.sae.load("gemma-scope-2b-pt-res", "layer_20/width_16k/average_l0_71")

Names follow SAELens' (`gemma-scope-2b-pt-res`, `gemma-scope-2-1b-pt-res-all`,
`llama_scope_lxr_8x`, `gpt2-small-res-jb`), so an id from SAELens' tables or
Neuronpedia works here unchanged. A release fixes the repository, the model its SAEs were
trained on and how the SAE's id gives its site (`layer_20/...` of a residual release is
`resid_post.20`); the files themselves are read by `mechnb.sae.files` (SAEs) and
`mechnb.transcoders.files` (transcoders).

Gotcha: `gpt2-small-res-jb` was trained on TransformerLens' GPT-2 with its writing weights
centred, whose residual stream is the Hugging Face one minus its mean over `d_model`;
the loader folds that centring into the encoder, so features match on the Hugging Face
model (the splice's error term carries the mean).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..core.errors import SAEError


@dataclass(frozen=True)
class Release:
    """A named set of published SAEs (or transcoders) in one hub repository."""

    name: str
    repo: str
    model: str
    kind: str  # mechnb's site kind its SAEs read: resid_post, mlp_out, head, ... or "transcoder"
    example: str  # one SAE id of the release
    prefix: str = ""  # the folder its ids live under (Gemma Scope 2: resid_post/)
    layer: str = r"layer_(\d+)"  # where the id says its layer
    what: str = "sae"  # or "transcoder"
    center: bool = False  # fold TransformerLens' centred residual stream into the encoder

    def folder(self, sae_id: str) -> str:
        """The folder in the repository that holds the SAE `sae_id`."""
        sae_id = sae_id.strip("/")
        if self.name.startswith("llama_scope"):
            match = re.fullmatch(r"l(\d+)([ram])_(\d+)x", sae_id.lower())
            if match:
                return f"Llama3_1-8B-Base-L{match[1]}{match[2].upper()}-{match[3]}x"
            return sae_id
        return sae_id if not self.prefix or sae_id.startswith(self.prefix) else self.prefix + sae_id

    def site(self, sae_id: str) -> str | None:
        """The site the SAE `sae_id` reads, from its layer (None for transcoders)."""
        match = re.search(self.layer, sae_id)
        if self.what != "sae" or not match:
            return None
        return f"{self.kind}.{int(match[1])}"


def _registry() -> dict[str, Release]:
    made = []
    gemma_scope = {("2b", "pt"): ("res", "mlp", "att"), ("9b", "pt"): ("res", "mlp", "att"), ("9b", "it"): ("res",),
                   ("27b", "pt"): ("res",)}
    for (size, variant), shorts in gemma_scope.items():
        model = f"google/gemma-2-{size}" + ("-it" if variant == "it" else "")
        for short in shorts:
            name = f"gemma-scope-{size}-{variant}-{short}"
            kind = {"res": "resid_post", "mlp": "mlp_out", "att": "head"}[short]
            made.append(Release(name, f"google/{name}", model, kind, "layer_20/width_16k/average_l0_71"))
    made.append(Release("gemma-scope-2b-pt-transcoders", "google/gemma-scope-2b-pt-transcoders", "google/gemma-2-2b",
                        "transcoder", "layer_15/width_16k/average_l0_8", what="transcoder"))
    for size in ("270m", "1b", "4b", "12b", "27b"):
        for variant in ("pt", "it"):
            repo = f"google/gemma-scope-2-{size}-{variant}"
            for short, folder, kind in (("res", "resid_post", "resid_post"), ("mlp", "mlp_out", "mlp_out"),
                                        ("att", "attn_out", "head"), ("transcoders", "transcoder", "transcoder")):
                for every in ("", "-all"):
                    what = "transcoder" if kind == "transcoder" else "sae"
                    made.append(Release(f"gemma-scope-2-{size}-{variant}-{short}{every}", repo,
                                        f"google/gemma-3-{size}-{variant}", kind, "layer_9_width_16k_l0_medium",
                                        prefix=f"{folder}{'_all' if every else ''}/", what=what))
    for letter, kind in (("r", "resid_post"), ("a", "attn_out"), ("m", "mlp_out")):
        for width in ("8x", "32x"):
            made.append(Release(f"llama_scope_lx{letter}_{width}", f"fnlp/Llama3_1-8B-Base-LX{letter.upper()}-{width}",
                                "meta-llama/Llama-3.1-8B", kind, f"l15{letter}_{width}", layer=r"[lL](\d+)[RAMram]"))
    made.append(Release("gpt2-small-res-jb", "jbloom/GPT2-Small-SAEs-Reformatted", "gpt2", "resid_pre",
                        "blocks.8.hook_resid_pre", layer=r"blocks\.(\d+)\.", center=True))
    made.append(Release("sae-llama-3-8b-32x", "EleutherAI/sae-llama-3-8b-32x", "meta-llama/Meta-Llama-3-8B",
                        "resid_post", "layers.24", layer=r"layers\.(\d+)$"))
    return {release.name: release for release in made}


RELEASES: dict[str, Release] = _registry()


def releases(what: str | None = None):
    """A DataFrame of the named releases: name, repo, model, what they read, an example id.

    `what` keeps `"sae"` or `"transcoder"` releases only."""
    import pandas as pd

    rows = [{"name": r.name, "repo": r.repo, "model": r.model, "reads": r.kind if r.what == "sae" else "MLP",
             "what": r.what, "example": r.example} for r in RELEASES.values() if what in (None, r.what)]
    return pd.DataFrame(rows)


def find_release(name: str) -> Release | None:
    """The release called `name` (SAELens' spelling; `-` and `_` alike), or None."""
    key = name.strip().lower()
    return RELEASES.get(key) or {n.replace("_", "-"): r for n, r in RELEASES.items()}.get(key.replace("_", "-"))


def locate(source: str, sae_id: str | None, error: type[Exception], what: str = "sae"):
    """`(repo, folder, hint)` for a release name or a hub repo id and an SAE id; `error` if
    `source` is neither, or a release needs an id and has none."""
    release = find_release(source)
    if release is None and sae_id:  # a repo id of a known release: the folder says which one
        folder = sae_id.strip("/")
        release = next((r for r in RELEASES.values() if r.repo.lower() == source.lower() and r.what == what and
                        (folder.startswith(r.prefix) if r.prefix else True)), None)
        sae_id = folder
    if release is not None:
        if release.what != what:
            loader = "mechnb.transcoders.load" if release.what == "transcoder" else "mechnb.sae.load"
            raise error(f"{release.name} holds {release.what}s: load them with {loader}")
        if not sae_id:
            raise error(f"name one of {release.name}'s {what}s: {what}_id such as {release.example!r}")
        folder = release.folder(sae_id)
        hint = {"site": release.site(folder), "model": release.model, "release": release.name,
                "repo": release.repo, "sae_id": sae_id, "center": release.center}
        return release.repo, folder, hint
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source):
        return source, (sae_id or "").strip("/"), {"repo": source, "sae_id": sae_id}
    some = ", ".join(list(RELEASES)[:3])
    article = "an SAE" if what == "sae" else "a transcoder"
    raise error(f"{source!r} is not {article} directory, a release mechnb knows ({some}, ...: "
                f"mechnb.sae.releases() lists them) or a hub repo id (org/name)")


# A folder's files, by what identifies its format (tried in this order), then what else it needs.
_MARKERS = ["cfg.json", "params.npz", "params.safetensors", "hyperparams.json"]
_WITH = {"cfg.json": ["sae_weights.safetensors", "sae.safetensors"], "params.npz": [],
         "params.safetensors": ["config.json"], "hyperparams.json": ["checkpoints/final.safetensors"]}


def download(repo: str, folder: str, error: type[Exception], revision: str | None = None, local_only: bool = False):
    """The local directory (in the Hugging Face cache) holding `folder` of `repo`, with the files
    of whichever format it is in; `error` naming what was looked for if there is none."""
    from ..core import hub

    def name(file):
        return f"{folder}/{file}" if folder else file

    found = hub.find(repo, [name(m) for m in _MARKERS], error, revision, local_only)
    if not found:
        where = f"{repo}/{folder}" if folder else repo
        cached = " in the Hugging Face cache" + (" (offline)" if hub.offline() else " (local_only=True)") \
            if hub.offline() or local_only else ""
        raise error(f"no SAE or transcoder files in {where}{cached}: looked for {', '.join(_MARKERS)}")
    marker = next(m for m in _MARKERS if name(m) in found)
    extra = hub.find(repo, [name(f) for f in _WITH[marker]], error, revision, local_only)
    if marker == "cfg.json" and not extra:
        raise error(f"{repo}/{name('cfg.json')} has no weights beside it (sae_weights.safetensors or sae.safetensors)")
    if marker == "cfg.json" and name("sae.safetensors") in extra and "/" in folder:
        hub.find(repo, [folder.rsplit("/", 1)[0] + "/config.json"], error, revision, local_only)  # sparsify's run settings
    elif marker == "cfg.json" and name("sae.safetensors") in extra:
        hub.find(repo, ["config.json"], error, revision, local_only)
    if marker == "hyperparams.json" and not extra:
        raise error(f"{repo}/{name('hyperparams.json')} has no checkpoints/final.safetensors beside it")
    path = found[name(marker)]
    return path.parent
