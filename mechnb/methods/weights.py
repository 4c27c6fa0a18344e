"""What a head computes, read from its weights alone (A Mathematical Framework for
Transformer Circuits, Elhage et al. 2021).

A head's effect splits into two low-rank circuits over the vocabulary:

- OV: `M_OV = E W_V W_O U`, `vocab x vocab`: row s is how attending to a source
  token s moves each output logit. A head that copies raises the logit of the token
  it attends to: M_OV has a large positive diagonal and positive eigenvalues.
- QK: `M_QK = E W_Q W_K^T E^T`, `vocab x vocab`: row d, column s is the attention
  score a destination token d gives a source token s (before positions).

Conventions (row vectors, as the Framework and TransformerLens): `E` is the token
embedding with each row passed through the layer's input norm (RMS or LayerNorm
scale of that row, times the norm's weight), `U` the unembedding with the final
norm's weight folded in. Biases and rotary position embeddings are left out (QK is
the position-independent part). With grouped-query attention a head uses its key
and value group's weights. Both matrices are kept factored (`A @ B` with `d_head`
inner columns), never `vocab x vocab` unless asked (`.full()`).

    >>> ov = model.ov(18, 6)
    >>> ov.top_pairs(10)            # source token -> output token, value
    >>> ov.copying_score()          # 1: copies, 0: anti-copies
    >>> model.composition("k")      # K-composition scores between heads, a heatmap
"""

from __future__ import annotations

import torch

from ..core.arch import output_weights, submodule
from ..core.checks import is_int
from ..core.devices import parameter
from ..core.errors import WeightError
from ..core.remote import local_only


class FactoredMatrix:
    """`A @ B` kept as its factors: `A` is `rows inner`, `B` `inner columns`."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, labels=None, kind: str = "", tokenizer=None):
        self.A, self.B, self.kind, self.tokenizer = A.float(), B.float(), kind, tokenizer

    @property
    def shape(self) -> tuple[int, int]:
        return self.A.shape[0], self.B.shape[1]

    def __repr__(self) -> str:
        return f"<mechnb.FactoredMatrix {self.kind} {self.shape[0]}x{self.shape[1]}, rank <= {self.A.shape[1]}>"

    def full(self) -> torch.Tensor:
        """The whole matrix (`rows columns`): large for a vocabulary."""
        return self.A @ self.B

    def eigenvalues(self) -> torch.Tensor:
        """The non-zero eigenvalues (complex), from the small `B @ A` (same spectrum)."""
        return torch.linalg.eigvals(self.B @ self.A)

    def copying_score(self) -> float:
        """The share of positive real part in the eigenvalues: `sum max(Re l, 0) / sum |Re l|`,
        1 for a head that copies, 0 for one that anti-copies (the Framework's
        `sum l / sum |l|` rescaled to [0, 1] for real spectra)."""
        real = self.eigenvalues().real
        return float(real.clamp(min=0).sum() / real.abs().sum().clamp(min=1e-12))

    def svd(self):
        """`U, S, V` with `A @ B = U diag(S) V^T`, computed through QR of the factors."""
        qa, ra = torch.linalg.qr(self.A)
        qb, rb = torch.linalg.qr(self.B.T)
        u, s, vh = torch.linalg.svd(ra @ rb.T)
        return qa @ u, s, qb @ vh.T

    def top_pairs(self, k: int = 10, vocab: int | None = 8192, centre: bool = True, block: int = 1024):
        """The `k` largest entries as a DataFrame (`row`, `column`, tokens, `value`),
        computed in blocks of rows. `vocab` keeps rows and columns below that id (default
        8192; None keeps all): BPE ids grow roughly as tokens get rarer, so the first ids
        are the common tokens, and rare tokens with large norms no longer crowd the top. `centre` subtracts each
        column's mean over rows (in factored form: the mean row of `A`), so columns every
        row raises alike (outputs the head boosts whatever it reads) leave the top to
        row-specific pairs."""
        import pandas as pd

        if not is_int(k) or k < 1:
            raise WeightError(f"top_pairs takes a positive number of pairs, got {k!r}")
        if vocab is not None and (not is_int(vocab) or vocab < 1):
            raise WeightError(f"vocab keeps the first token ids: a positive int (or None for all "
                            f"{self.shape[0]}), got {vocab!r}")
        best_values = torch.empty(0)
        best_index = torch.empty(0, dtype=torch.long)
        A, B = (self.A, self.B) if vocab is None else (self.A[:vocab], self.B[:, :vocab])
        if centre:
            A = A - A.mean(0)
        columns = B.shape[1]
        for start in range(0, A.shape[0], block):
            chunk = (A[start:start + block] @ B).flatten()
            values, index = chunk.topk(min(k, chunk.numel()))
            best_values = torch.cat([best_values, values])
            best_index = torch.cat([best_index, index + start * columns])
            keep = best_values.topk(min(k, len(best_values))).indices
            best_values, best_index = best_values[keep], best_index[keep]
        rows = []
        for value, flat in zip(best_values.tolist(), best_index.tolist()):
            row, column = divmod(flat, columns)
            entry = {"row": row, "column": column, "value": value}
            if self.tokenizer is not None:
                entry.update(row_token=self.tokenizer.decode([row]), column_token=self.tokenizer.decode([column]))
            rows.append(entry)
        names = ["row", "row_token", "column", "column_token", "value"] if self.tokenizer is not None \
            else ["row", "column", "value"]
        table = pd.DataFrame(rows, columns=names)
        table.attrs["searched"] = (f"all {self.shape[0]} token ids" if vocab is None or vocab >= self.shape[0]
                                   else f"the first {vocab} token ids")
        return table


def _check_head(model, layer, head) -> None:
    for value, limit, what in ((layer, model.n_layers, "layer"), (head, model.n_heads, "head")):
        if not is_int(value) or not 0 <= value < limit:
            raise WeightError(f"{what} {value!r} out of range: this model has {what}s 0-{limit - 1}")


def projection_rows(model, layer_module, kind: str, head: int) -> torch.Tensor:
    """The `d_head d_model` rows of the q, k or v projection that `head` uses, on
    `model.device` (weights read through `parameter`: spread or offloaded by a device_map)."""
    attn = submodule(layer_module, model.arch.attn)
    d_head, device = model.d_head, model.device
    group = head // (model.n_heads // model.n_kv_heads) if kind != "q" else head
    if model.arch.qkv is not None:
        weight = parameter(submodule(layer_module, model.arch.qkv["qkv".index(kind)]), "weight", device)
        return weight[group * d_head:(group + 1) * d_head].float()
    if model.arch.name == "gpt2":
        weight = parameter(attn.c_attn, "weight", device).float().T  # (3 d_model) d_model
        start = "qkv".index(kind) * model.d_model + head * d_head
        return weight[start:start + d_head]
    # GPT-NeoX fuses per head: [q k v] blocks of d_head for each head.
    weight = parameter(attn.query_key_value, "weight", device).float()
    start = head * 3 * d_head + "qkv".index(kind) * d_head
    return weight[start:start + d_head]


def _embedded(model, norm, *weights: torch.Tensor) -> list[torch.Tensor]:
    """`norm(E) @ W.T` (`vocab d_head`) for each `d_head d_model` weight `W`, where `E` is the
    token embedding: computed in blocks of tokens, so the normed `vocab d_model` embedding
    (113 MB for SmolLM2) is never held whole."""
    with torch.no_grad():
        embeddings = parameter(model.hf.get_input_embeddings(), "weight", model.device)
        out = [torch.empty(len(embeddings), w.shape[0], device=model.device) for w in weights]
        for i in range(0, len(embeddings), 2048):
            normed = norm(embeddings[i:i + 2048]).float().to(model.device)
            for target, weight in zip(out, weights):
                target[i:i + 2048] = normed @ weight.T
    return out


@local_only
def ov(model, layer: int, head: int) -> FactoredMatrix:
    """The OV circuit of head `layer.head`, `vocab x vocab`, as a `FactoredMatrix`
    (`.top_pairs(k)`, `.eigenvalues()`, `.copying_score()`, `.svd()`); see the module
    docstring. Example: `model.ov(18, 6).copying_score()`."""

    _check_head(model, layer, head)
    layer_module = submodule(model.hf, model.arch.layers)[layer]
    value = projection_rows(model, layer_module, "v", head)          # d_head d_model
    out = output_weights(model, submodule(layer_module, model.arch.o_proj), model.device)[head]  # d_head d_model
    gain = parameter(submodule(model.hf, model.arch.final_norm), "weight", model.device)
    gain = gain.float() if gain is not None else 1.0
    unembed = parameter(model.hf.get_output_embeddings(), "weight", model.device).float()  # vocab d_model
    (A,) = _embedded(model, submodule(layer_module, model.arch.attn_norm), value)   # vocab d_head
    with torch.no_grad():
        B = (out * gain) @ unembed.T                                   # d_head vocab
    return FactoredMatrix(A, B, kind=f"OV head.{layer}.{head}", tokenizer=model.tokenizer)


@local_only
def qk(model, layer: int, head: int) -> FactoredMatrix:
    """The QK circuit of head `layer.head` (destination x source token scores), factored.
    Example: `model.qk(18, 6).top_pairs(10)`."""
    _check_head(model, layer, head)
    layer_module = submodule(model.hf, model.arch.layers)[layer]
    A, K = _embedded(model, submodule(layer_module, model.arch.attn_norm),
                     projection_rows(model, layer_module, "q", head),
                     projection_rows(model, layer_module, "k", head))
    return FactoredMatrix(A, K.T, kind=f"QK head.{layer}.{head}", tokenizer=model.tokenizer)


@local_only
def composition(model, kind: str = "k"):
    """Composition scores `||W_A W_B||_F / (||W_A||_F ||W_B||_F)` of every earlier head's
    OV circuit (`d_model x d_model`) into every later head's query (`q`), key (`k`) or
    value (`v`) side: a `Result` over (head, later head), a heatmap.
    Example: `model.composition("k").df.nlargest(5, "score")`."""
    import pandas as pd

    from ..display.results import Result

    if kind not in ("q", "k", "v"):
        raise WeightError(f"composition kind must be 'q', 'k' or 'v', got {kind!r}")
    layers = submodule(model.hf, model.arch.layers)
    n, H = model.n_layers, model.n_heads
    ovs, reads = [], []  # factors (left d_model x d_head, right d_head x d_model)
    with torch.no_grad():
        for layer, module in enumerate(layers):
            gain = parameter(submodule(module, model.arch.attn_norm), "weight", model.device)
            gain = gain.float() if gain is not None else torch.ones(model.d_model, device=model.device)
            outs = output_weights(model, submodule(module, model.arch.o_proj), model.device)
            for head in range(H):
                value = projection_rows(model, module, "v", head) * gain        # d_head d_model
                ovs.append((value.T, outs[head]))                                # x -> x V^T O
                query = projection_rows(model, module, "q", head) * gain
                key = projection_rows(model, module, "k", head) * gain
                if kind == "q":
                    reads.append((query.T, key))        # W_QK = Q^T K, read on the query side
                elif kind == "k":
                    reads.append((key.T, query))        # transposed: read on the key side
                else:
                    reads.append((value.T, outs[head]))
    scores = torch.full((n * H, n * H), float("nan"))
    with torch.no_grad():
        ov_left = torch.stack([a for a, _ in ovs])          # heads d_model d_head
        ov_right = torch.stack([b for _, b in ovs])         # heads d_head d_model
        gram_left = ov_left.transpose(1, 2) @ ov_left       # heads d_head d_head
        # ||L R||_F^2 = tr(L^T L R R^T): d_head x d_head products, never the d_model x d_model
        # matrices (all of them at once would be heads x d_model^2 floats).
        gram_ov_right = ov_right @ ov_right.transpose(1, 2)  # heads d_head d_head
        norm_ov = (gram_left * gram_ov_right).sum((1, 2)).clamp(min=0).sqrt()
        for j in range(H, n * H):
            earlier = (j // H) * H
            read_left, read_right = reads[j]
            # ||L M R||_F^2 = tr(L^T L M R R^T M^T), all d_head x d_head, for every earlier head.
            middle = ov_right[:earlier] @ read_left         # earlier d_head d_head
            gram_right = read_right @ read_right.T
            squared = torch.einsum("hab,hbc,cd,hed->hae", gram_left[:earlier], middle, gram_right,
                                   middle).diagonal(dim1=1, dim2=2).sum(-1)
            norm_read = torch.linalg.matrix_norm(read_left @ read_right)
            scores[:earlier, j] = squared.clamp(min=0).sqrt() / (norm_ov[:earlier] * norm_read)
    labels = [f"{layer}.{head}" for layer in range(n) for head in range(H)]
    rows = [{"head": labels[i], "later_head": labels[j], "score": scores[i, j].item()}
            for i in range(n * H) for j in range((i // H + 1) * H, n * H)]
    meta = {"title": f"{kind.upper()}-composition of each head (rows) into later heads (columns)", "kind": kind,
            "model": model.name, "scale": "positive",
            "axes": ["head", "later_head"], "labels": {"head": labels, "later_head": labels},
            "groups": {"head": "layer", "later_head": "layer"}}
    return Result(scores, pd.DataFrame(rows), meta)
