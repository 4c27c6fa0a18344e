"""`mechnb.launch` (`mechnb.notebook.launch`) and `python -m mechnb` under torchrun: a job of two
CPU processes started from a kernel, its progress, its result, its failures and its stop."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import torch

import mechnb
from mechnb import DistributedError

TESTS = str(Path(__file__).parent)
pytestmark = pytest.mark.slow


def test_a_job_launched_from_a_kernel_streams_its_progress_and_loads_its_result(saved, tmp_path):
    from nbclient import NotebookClient

    from test_distributed import TC_SETTINGS, documents

    texts = documents()
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    cells = [
        "import json, mechnb",
        f"texts = json.load(open({str(tmp_path / 'texts.json')!r}))",
        f"job = mechnb.launch(mechnb.transcoders.train, model={str(saved)!r}, texts=texts, nproc=2, "
        f"folder={str(tmp_path / 'job')!r}, **{TC_SETTINGS!r})",
        "job",
        "tcs = job.result()\ntcs.save('result')\nprint(job.status, tcs.meta['ranks'], tcs.meta['strategy'])\n"
        "print(job.summary().to_string())",
    ]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in notebook.cells for o in c.outputs)
    assert "done 2 ddp" in text, text
    views = [o for o in notebook.cells[3].outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert views, notebook.cells[3].outputs  # the live view
    progress = [json.loads(line) for rank in (0, 1) for line in
                (tmp_path / "job" / f"progress-{rank}.jsonl").read_text().splitlines()]
    assert {p["rank"] for p in progress} == {0, 1} and max(p["step"] for p in progress) == progress[0]["steps"]
    from conftest import build_hf  # noqa: F401  (the saved directory is the tiny Llama of the tests)

    model = mechnb.load(str(saved))
    alone = mechnb.transcoders.train(model, texts, **TC_SETTINGS)
    launched = mechnb.transcoders.load(tmp_path / "result")
    for layer in alone.layers:
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            assert torch.allclose(getattr(launched[layer], name), getattr(alone[layer], name), atol=1e-5)


def test_a_failing_rank_is_named_in_one_line_with_its_traceback_on_request(tmp_path):
    import jobs

    started = time.perf_counter()
    job = mechnb.launch(jobs.fail_on_rank, nproc=2, rank=1, folder=tmp_path, env={"PYTHONPATH": TESTS}, timeout=20)
    with pytest.raises(DistributedError) as raised:
        job.result(timeout=120)
    message = str(raised.value)
    assert message.startswith("rank 1 of 2 failed: ValueError: a broken batch in this rank's shard"), message
    assert "\n" not in message and "job.traceback(rank)" in message
    assert "Traceback" in job.traceback(1) and "fail_on_rank" in job.traceback(1)
    assert time.perf_counter() - started < 90 and job.status == "failed"
    assert "rank 1 of 2 failed" in job.html()


def descendants(pid: int) -> list[int]:
    """Every process below `pid`."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(child) for child in children] + [found for child in children for found in descendants(int(child))]


def test_stopping_a_job_ends_every_rank(tmp_path):
    import jobs

    job = mechnb.launch(jobs.wait_forever, nproc=2, folder=tmp_path, env={"PYTHONPATH": TESTS})
    deadline = time.time() + 120
    while (job.progress.empty or set(job.progress["rank"]) != {0, 1}) and time.time() < deadline:
        time.sleep(0.5)
    assert set(job.progress["rank"]) == {0, 1}
    workers = descendants(job.process.pid)
    assert len(workers) >= 2  # the two ranks (and torchrun's helpers)
    job.stop()
    assert job.status == "stopped"
    time.sleep(1)
    assert [pid for pid in workers if Path(f"/proc/{pid}").exists()] == []
    with pytest.raises(DistributedError, match="the job was stopped"):
        job.result()


def test_a_job_returns_json_and_bad_calls_are_one_line(tmp_path):
    import jobs

    job = mechnb.launch(jobs.ranks_and_sum, nproc=2, folder=tmp_path, env={"PYTHONPATH": TESTS})
    assert job.result(timeout=120) == {"size": 2, "sum": 3.0}
    with pytest.raises(DistributedError, match="an importable function"):
        mechnb.launch(lambda: 1)
    with pytest.raises(DistributedError, match="an activation store in memory cannot reach the ranks"):
        mechnb.launch(mechnb.sae.train, store=mechnb.sae.ActivationStore(torch.zeros(4, 2), 4), folder=tmp_path)


def test_torchrun_trains_an_sae_from_a_config_as_one_process_does(tmp_path):
    from test_distributed import SAE_SETTINGS, activations

    import numpy as np

    acts = activations()
    folder = tmp_path / "acts"
    folder.mkdir()
    data = np.memmap(folder / "acts.f32", dtype=np.float32, mode="w+", shape=tuple(acts.shape))
    data[:] = acts.numpy()
    data.flush()
    (folder / "progress.json").write_text(json.dumps({"written": len(acts), "documents": 0, "stream": [],
                                                      "site": "resid_post.1", "width": acts.shape[1],
                                                      "n_tokens": len(acts)}))
    settings = {key: value for key, value in SAE_SETTINGS.items() if key != "progress"}
    config = {"store": str(folder), "kind": "topk", "k": 4, "output": str(tmp_path / "sae"), **settings}
    (tmp_path / "sae.json").write_text(json.dumps(config))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend",
                           "c10d", "--rdzv-endpoint", "127.0.0.1:0", "-m", "mechnb", "train", "sae", "--config",
                           str(tmp_path / "sae.json")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    trained = mechnb.sae.load(tmp_path / "sae")
    alone = mechnb.sae.train(acts, kind="topk", k=4, **SAE_SETTINGS)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.allclose(getattr(trained, name), getattr(alone, name), atol=1e-5), name
