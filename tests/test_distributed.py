"""The process group (`mechnb.core.distributed`): what ranks agree on, proven with two gloo
processes on CPU (each test its own ranks: `ranks.spawn`), and the world of one that every
call without torchrun sees. Under `make test` the file runs on one worker, whose fork server
imports torch, transformers and mechnb once for every rank of every test."""

import time

import pytest
import torch

from mechnb.core import distributed
from ranks import spawn

pytestmark = pytest.mark.xdist_group("distributed")


def test_a_world_of_one_is_the_identity():
    world = distributed.current()
    assert (world.rank, world.size, world.main, world.several) == (0, 1, True, False)
    tensor = torch.arange(4.0)
    assert world.sum_(tensor) is tensor and torch.equal(tensor, torch.arange(4.0))
    assert torch.equal(world.gather(tensor), tensor) and world.slice(10) == slice(0, 10)
    assert world.sum_keep_gradient(tensor) is tensor and world.broadcast_object({"a": 1}) == {"a": 1}
    assert world.traffic.bytes == 0


def collectives(world):
    rank = world.rank
    summed = world.sum_(torch.tensor([1.0 + rank, 10.0]))
    mean = world.mean_(torch.tensor([2.0 * rank]))
    biggest = world.max_(torch.tensor([rank], dtype=torch.long))
    gathered = world.gather(torch.full((2, 3), float(rank)))
    uneven = world.gather_uneven(torch.full((rank + 1, 2), float(rank)))
    told = world.broadcast_object({"seed": 7, "from": rank}, source=1)
    shares = [world.slice(n) for n in (10, 11)]
    # A part of a replicated value on each rank, and a loss every rank computes the same:
    # the gradient of each part is the loss's own (the sum's backward is the identity).
    part = torch.tensor([1.0 + rank, 2.0], requires_grad=True)
    whole = world.sum_keep_gradient(part * 3)
    (whole ** 2).sum().backward()
    import torch.distributed.nn.functional as dist_nn

    naive_part = torch.tensor([1.0 + rank, 2.0], requires_grad=True)
    (dist_nn.all_reduce(naive_part * 3) ** 2).sum().backward()
    with world.main_writes() as main:
        wrote = main
    return {"summed": summed, "mean": mean, "max": biggest, "gathered": gathered, "uneven": uneven,
            "seed": told["seed"], "told_from": told["from"], "shares": torch.tensor([[s.start, s.stop] for s in shares]),
            "grad": part.grad, "naive_grad": naive_part.grad, "whole": whole.detach(), "wrote": int(wrote),
            "traffic": world.traffic.bytes}


def test_two_ranks_agree_on_sums_gathers_broadcasts_and_shares():
    results = spawn(collectives, 2)
    for rank, got in results.items():
        assert torch.equal(got["summed"], torch.tensor([3.0, 20.0]))
        assert torch.equal(got["mean"], torch.tensor([1.0])) and int(got["max"]) == 1
        assert torch.equal(got["gathered"], torch.tensor([[0.0] * 3] * 2 + [[1.0] * 3] * 2))
        assert torch.equal(got["uneven"], torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))
        assert (got["seed"], got["told_from"]) == (7, 1)
        assert got["wrote"] == (rank == 0) and got["traffic"] > 0
    assert results[0]["shares"].tolist() == [[0, 5], [0, 6]] and results[1]["shares"].tolist() == [[5, 10], [6, 11]]
    # The whole is (3 + 6, 12) on both ranks; d/d part of sum((3 * whole)^2)... by hand:
    whole = torch.tensor([9.0, 12.0])
    assert all(torch.equal(got["whole"], whole) for got in results.values())
    expected = 2 * whole * 3
    assert all(torch.allclose(got["grad"], expected) for got in results.values())
    # torch.distributed.nn's all_reduce also sums the replicated loss's gradients: twice as large.
    assert all(torch.allclose(got["naive_grad"], 2 * expected) for got in results.values())


def one_rank_dies(world):
    if world.rank == 1:
        import os

        os._exit(3)  # as a rank killed by the system would: no cleanup, no message
    started = time.perf_counter()
    try:
        world.sum_(torch.ones(4))
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}", "seconds": time.perf_counter() - started}
    return {"error": "", "seconds": time.perf_counter() - started}


def test_a_rank_that_dies_ends_the_others_wait_with_one_line():
    results = spawn(one_rank_dies, 2, timeout=10, expect_failure=True)
    survivor = results[0]
    assert survivor["error"].startswith("DistributedError: rank 0 of 2: a all_reduce failed, another rank stopped"), \
        survivor["error"]
    assert survivor["seconds"] < 15 and "\n" not in survivor["error"]


# -- training sparse autoencoders over ranks ------------------------------------------------

SAE_SETTINGS = dict(d_sae=48, batch_size=64, steps=20, log_every=5, dead_tokens=100, progress=False, seed=3)


def activations(n=1600, d=16, seed=0):
    """Activations with some structure (a few directions) for the SAE tests."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(12, d, generator=generator)
    codes = torch.relu(torch.randn(n, 12, generator=generator)) * (torch.rand(n, 12, generator=generator) < 0.3)
    return codes @ directions + 0.05 * torch.randn(n, d, generator=generator)


KINDS = [("topk", 4), ("batchtopk", 4), ("jumprelu", None), ("relu", None)]


def train_saes(world):
    """Every kind of SAE trained over the ranks in both strategies, one after the other (one spawn)."""
    import mechnb

    found = {}
    for strategy in ("ddp", "features"):
        for kind, k in KINDS:
            sae = mechnb.sae.train(activations(), kind=kind, k=k, strategy=strategy, **SAE_SETTINGS)
            key = f"{strategy}.{kind}"
            found |= {f"{key}.{name}": p.detach().clone() for name, p in sae.named_parameters()}
            found |= {f"{key}.{column}": torch.tensor(sae.history[column].tolist()) for column in ("fvu", "l0", "dead")}
            found[f"{key}.ranks"] = sae.meta["ranks"]
    return found


def test_sae_training_over_two_ranks_equals_one_process():
    """Every kind (relu resamples its dead features twice in these 20 steps), each rank its share
    of every batch (ddp) or of the features: the same SAE as one process with the same seed and
    global batch, to 1e-5."""
    import mechnb

    results = spawn(train_saes, 2)
    for kind, k in KINDS:
        alone = mechnb.sae.train(activations(), kind=kind, k=k, **SAE_SETTINGS)
        for strategy in ("ddp", "features"):
            key = f"{strategy}.{kind}"
            for rank, got in results.items():
                assert got[f"{key}.ranks"] == 2
                for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
                    difference = (got[f"{key}.{name}"] - getattr(alone, name)).abs().max()
                    assert difference < 1e-5, (key, rank, name, float(difference))
                for column in ("fvu", "l0"):
                    assert torch.allclose(got[f"{key}.{column}"], torch.tensor(alone.history[column].tolist()),
                                          atol=1e-4)
                assert torch.equal(got[f"{key}.dead"], torch.tensor(alone.history.dead.tolist()))


def die_at_step(world, folder, step):
    """Train with checkpoints every 5 steps; rank 1 dies (no cleanup) before step `step`."""
    import importlib
    import os

    import mechnb
    trainer = importlib.import_module("mechnb.sae.train")

    real, calls = trainer._step, []

    def step_or_die(*args, **kwargs):
        calls.append(1)
        if world.rank == 1 and len(calls) == step:
            os._exit(3)
        return real(*args, **kwargs)

    trainer._step = step_or_die
    try:
        mechnb.sae.train(activations(), kind="topk", k=4, checkpoint=folder, save_every=5, **SAE_SETTINGS)
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}"}
    return {"error": ""}


def test_a_killed_rank_ends_training_clearly_and_the_checkpoint_resumes_on_any_number_of_ranks(tmp_path):
    import json

    import mechnb

    started = time.perf_counter()
    results = spawn(die_at_step, 2, str(tmp_path), 13, timeout=15, expect_failure=True)
    assert time.perf_counter() - started < 60
    assert results[0]["error"].startswith("DistributedError: rank 0 of 2: a all_reduce failed"), results[0]
    assert json.loads((tmp_path / "sae_training.json").read_text())["step"] == 10  # the last checkpoint
    resumed = mechnb.sae.train(activations(), kind="topk", k=4, checkpoint=tmp_path, save_every=5, **SAE_SETTINGS)
    whole = mechnb.sae.train(activations(), kind="topk", k=4, **SAE_SETTINGS)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.allclose(getattr(resumed, name), getattr(whole, name), atol=1e-5), name
    assert resumed.history.step.tolist() == whole.history.step.tolist() and resumed.meta["steps"] == 20


# -- training transcoders over ranks ------------------------------------------------------------

TC_SETTINGS = dict(width=48, k=4, n_tokens=4000, batch_size=360, context=40, progress=False, log_every=2,
                   dead_tokens=300, seed=2)


def tiny_llama():
    """The tiny random Llama of the tests (the embedded model's tokenizer), the same in every process."""
    import transformers

    from mechnb.core import embedded
    from mechnb.model import Model

    tokenizer = transformers.AutoTokenizer.from_pretrained(embedded.converted(), local_files_only=True)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return Model(hf, tokenizer, name="tiny-llama")


def documents():
    from mechnb.datasets import python_docs

    return list(python_docs("train", sources=("topics",)))[:30]


def transcoder_tensors(tcs) -> dict:
    found = {f"{layer}.{name}": p.detach().clone() for layer in tcs.layers
             for name, p in tcs[layer].named_parameters()}
    found |= {f"history.{column}": torch.tensor(tcs.history[column].tolist()) for column in ("fvu", "fvu_max", "l0",
                                                                                            "dead", "loss")}
    return found


def train_transcoders(world, checkpoint):
    """topk and jumprelu sets in every strategy, one after the other (one spawn); then a layers
    run stopped (Ctrl-C on every rank) at its 6th batch, its checkpoint in `checkpoint`."""
    import importlib

    import mechnb

    model = tiny_llama()
    found = {}
    for strategy in ("ddp", "layers", "features"):
        for kind in ("topk", "jumprelu"):
            tcs = mechnb.transcoders.train(model, documents(), kind=kind, strategy=strategy, **TC_SETTINGS)
            found |= {f"{strategy}.{kind}.{key}": value for key, value in transcoder_tensors(tcs).items()}
            found[f"{strategy}.{kind}.ranks"] = tcs.meta["ranks"]
    trainer = importlib.import_module("mechnb.transcoders.train")
    real, calls = trainer.mlp_values, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    trainer.mlp_values = interrupted
    stopped = mechnb.transcoders.train(model, documents(), strategy="layers", checkpoint=checkpoint, save_every=2,
                                       **TC_SETTINGS)
    found["stopped.steps"] = stopped.meta["steps"]
    return found


def test_transcoder_training_over_two_ranks_equals_one_process():
    """Each rank runs the model on half of every batch's windows (9 windows: 5 and 4); topk (whose
    dead features get the auxiliary loss here) and jumprelu train to the set one process trains,
    in the three strategies; a run over two ranks resumes in one."""
    import mechnb

    import tempfile

    folder = tempfile.mkdtemp()
    results = spawn(train_transcoders, 2, folder)
    model = tiny_llama()
    # The stopped run resumes in one process, to the set of one uninterrupted run.
    assert results[0]["stopped.steps"] == 5
    resumed = transcoder_tensors(mechnb.transcoders.train(model, documents(), checkpoint=folder, **TC_SETTINGS))
    whole = transcoder_tensors(mechnb.transcoders.train(model, documents(), **TC_SETTINGS))
    assert all((resumed[key] - whole[key]).abs().max() < 1e-5 for key in whole if not key.startswith("history"))
    for kind in ("topk", "jumprelu"):
        alone = transcoder_tensors(mechnb.transcoders.train(model, documents(), kind=kind, **TC_SETTINGS))
        for strategy in ("ddp", "layers", "features"):
            for rank, got in results.items():
                assert got[f"{strategy}.{kind}.ranks"] == 2
                for key, value in alone.items():
                    difference = (got[f"{strategy}.{kind}.{key}"] - value).abs().max()
                    assert difference < 1e-5 or key.startswith("history") and difference < 1e-4, \
                        (strategy, kind, rank, key, float(difference))


def sharded_layer_gradients(world):
    """One transcoder layer's loss and backward with its features split over the ranks, both kinds."""
    import importlib

    trainer = importlib.import_module("mechnb.transcoders.train")
    found = {}
    for kind in ("topk", "jumprelu"):
        found |= {f"{kind}.{key}": value for key, value in
                  layer_gradients(trainer._Plan(world, "features", [0], 12), kind).items()}
    return found


def layer_gradients(plan, kind):
    import importlib

    trainer = importlib.import_module("mechnb.transcoders.train")
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 8, generator=generator), torch.randn(20, 8, generator=generator)
    whole = trainer._Layer(8, 12, kind, 3 if kind == "topk" else None, True, "cpu")
    with torch.no_grad():
        for parameter in whole.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
        whole.threshold.fill_(0.05)
    part = trainer._Layer(8, plan.width, kind, 3 if kind == "topk" else None, True, "cpu")
    with torch.no_grad():
        for name, parameter in part.named_parameters():
            parameter.copy_(trainer._shard_tensor(plan, name, getattr(whole, name)))
    dead = (torch.arange(12) % 3 == 0)[plan.features]  # a third of the features dead: the auxiliary loss
    figures = trainer._layer_step(part, x, y, dead, plan, 20, kind, 0.1)
    found = {name: trainer._whole_tensor(plan, name, p.grad) for name, p in part.named_parameters()
             if p.grad is not None}
    return found | {"loss": torch.tensor(figures["loss"]), "l0": torch.tensor(figures["l0"])}


def test_features_split_over_ranks_have_the_gradients_of_the_whole_layer():
    import importlib

    from mechnb.core.distributed import current

    trainer = importlib.import_module("mechnb.transcoders.train")
    results = spawn(sharded_layer_gradients, 2)
    for kind in ("topk", "jumprelu"):
        expected = layer_gradients(trainer._Plan(current(), "features", [0], 12), kind)
        assert set(expected) >= {"W_enc", "b_enc", "W_dec", "b_dec", "W_skip"}
        for rank, got in results.items():
            for name, value in expected.items():
                assert torch.allclose(got[f"{kind}.{name}"], value, atol=1e-6), (kind, rank, name)


# -- sweeps over ranks ------------------------------------------------------------------------------

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


def sweeps(world):
    from test_causal_model import pronoun_model

    model = tiny_llama()
    heads = model.patch(CLEAN, CORRUPT, "head.*.*", " Mary", " John", per_position=True, batch_size=7,
                        progress=False)
    resid = model.patch(CLEAN, CORRUPT, "resid_pre.*", " Mary", " John", batch_size=5, progress=False)
    data = pronoun_model().counterfactuals(30, intervene="gender", seed=0)
    iia = model.interchange(data, ["resid_post.*@'{name}'", "resid_post.*@-1"], batch_size=16, progress=False)
    return {"heads": heads.values, "resid": resid.values, "iia": iia.values,
            "got": torch.tensor([{" he": 0, " she": 1}.get(g, -1) for g in iia.examples().got])}


def test_patching_and_interchange_grids_split_over_two_ranks_equal_one_process_exactly():
    results = spawn(sweeps, 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank computes: the same sums in the same order
    try:
        alone = sweeps(__import__("mechnb.core.distributed", fromlist=["current"]).current())
    finally:
        torch.set_num_threads(threads)
    for rank, got in results.items():
        for key in ("heads", "resid", "iia", "got"):
            assert torch.equal(got[key], alone[key]), (rank, key)


# -- collection over ranks ------------------------------------------------------------------------------

def collect_shards(world, folder):
    import mechnb

    model = tiny_llama()
    store = model.collect("resid_post.1", documents()[:12], n_tokens=2000, batch_size=3, context=40,
                          store=folder, progress=False)
    sae = mechnb.sae.train(store, kind="topk", d_sae=32, k=3, batch_size=100, steps=4, progress=False)
    return {"rows": len(store), "first": store.rows(0, 50), "fvu": torch.tensor(sae.history.fvu.tolist())}


def test_a_store_collected_over_ranks_is_the_one_process_store_and_trains():
    import hashlib
    import tempfile

    import mechnb
    from mechnb.sae import open_store

    model = tiny_llama()
    with tempfile.TemporaryDirectory() as alone_folder, tempfile.TemporaryDirectory() as folder:
        alone = model.collect("resid_post.1", documents()[:12], n_tokens=2000, batch_size=3, context=40,
                              store=alone_folder, progress=False)
        results = spawn(collect_shards, 2, folder)
        union = open_store(folder)
        files = sorted(p.name for p in __import__("pathlib").Path(folder).iterdir())
        assert "manifest.json" in files and any(name.startswith("shard-1-chunk-0") for name in files)
        assert len(union) == len(alone) == results[0]["rows"] == results[1]["rows"] == 2000
        digest = lambda store: hashlib.sha256(store.rows(0, len(store)).numpy().tobytes()).hexdigest()
        assert digest(union) == digest(alone)
        assert torch.equal(results[0]["first"], alone.rows(0, 50)) and torch.equal(results[1]["first"],
                                                                                   alone.rows(0, 50))
        # Every rank trained on the union (DDP): the same figures on both.
        assert torch.equal(results[0]["fvu"], results[1]["fvu"])
        sample = union.sample(64, seed=1)
        assert torch.equal(sample, alone.sample(64, seed=1))
        trained = mechnb.sae.train(union, kind="topk", d_sae=32, k=3, batch_size=100, steps=4, progress=False)
        assert trained.meta["store_tokens"] == 2000
