"""SAE throughput on the embedded model: collection, and training against a plain loop.

Prints, in one run:
- `Model.collect` tokens/s for resid_post.12 (forward stopped after layer 12);
- training tokens/s of `mechnb.sae.train` (topk, d_sae 4608, k 32, batch 4096) and of a
  plain-PyTorch reference loop of the same architecture and batch on the same store
  (encode, top-k, decode, MSE, Adam, decoder renormalisation: no logging, no dead-feature
  tracking), and their ratio.

Run: `.venv/bin/python bench/sae.py` (about 3 minutes on 2 cores).
"""

import time

import torch

import mechnb
from mechnb.datasets import python_docs

SITE, TOKENS, D_SAE, K, BATCH, STEPS = "resid_post.12", 60_000, 4608, 32, 4096, 30


def reference_loop(data: torch.Tensor, steps: int) -> float:
    """tokens/s of a minimal top-k SAE training loop."""
    torch.manual_seed(0)
    d = data.shape[1]
    w_dec = torch.nn.functional.normalize(torch.randn(D_SAE, d), dim=-1).requires_grad_()
    w_enc = w_dec.detach().T.clone().requires_grad_()
    b_enc = torch.zeros(D_SAE, requires_grad=True)
    b_dec = data[:4096].mean(0).clone().requires_grad_()
    optimizer = torch.optim.Adam([w_enc, w_dec, b_enc, b_dec], lr=4e-4)
    start = time.perf_counter()
    for step in range(steps):
        x = data[torch.randint(len(data), (BATCH,))]
        pre = (x - b_dec) @ w_enc + b_enc
        top = pre.topk(K, dim=-1)
        features = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        loss = (features @ w_dec + b_dec - x).pow(2).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            w_dec.div_(w_dec.norm(dim=-1, keepdim=True))
    return steps * BATCH / (time.perf_counter() - start)


def main():
    model = mechnb.load()
    start = time.perf_counter()
    store = model.collect(SITE, python_docs(), n_tokens=TOKENS, batch_size=32, progress=False)
    collect_rate = len(store) / (time.perf_counter() - start)
    data = store.rows(0, len(store))
    reference_loop(data, 2)  # warm up
    reference = reference_loop(data, STEPS)
    start = time.perf_counter()
    mechnb.sae.train(store, kind="topk", d_sae=D_SAE, k=K, batch_size=BATCH, steps=STEPS, progress=False)
    ours = STEPS * BATCH / (time.perf_counter() - start)
    print(f"SmolLM2-135M {SITE}, {torch.get_num_threads()} threads")
    print(f"Model.collect                          {collect_rate:8.0f} tokens/s")
    print(f"mechnb.sae.train (topk {D_SAE}, k {K})      {ours:8.0f} tokens/s")
    print(f"plain PyTorch reference loop           {reference:8.0f} tokens/s   mechnb / reference x{ours / reference:.2f}")


if __name__ == "__main__":
    main()
