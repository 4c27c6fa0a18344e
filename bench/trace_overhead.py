"""What a trace costs against a plain forward, on the embedded model (CPU).

Prints the median time of each way of running the IOI prompt once, and its ratio to
a plain forward of the stock transformers model (sdpa attention), all in this one
process. Run: `make bench` or `.venv/bin/python bench/trace_overhead.py`.
"""

import statistics
import time

import torch
from IPython.core.interactiveshell import InteractiveShell

import mechnb

PROMPT = "When Mary and John went to the store, John gave a drink to"
REPEATS = 30


def median_time(fn, repeats=REPEATS):
    fn()  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = mechnb.load()
    inputs = model.tokenizer(PROMPT, return_tensors="pt")
    nn = model.nn
    layers = nn.model.layers

    def plain_hooked():
        with torch.no_grad():
            model.hf(**inputs)

    def plain_sdpa():
        model.hf.set_attn_implementation("sdpa")
        try:
            with torch.no_grad():
                model.hf(**inputs)
        finally:
            model.hf.set_attn_implementation("mechnb")

    def plain_without_carry():
        # The same forward with the hooks that carry writes of resid_mid (mechnb.core.residual)
        # lifted for the moment: what they cost a forward.
        from mechnb.core import residual

        tables = [table for module in model.hf.modules()
                  for table in (module._forward_pre_hooks, module._forward_hooks)
                  if any(hook in (residual._before, residual._add) for hook in table.values())]
        saved = [dict(table) for table in tables]
        for table in tables:
            table.clear()
        try:
            with torch.no_grad():
                model.hf(**inputs)
        finally:
            for table, hooks in zip(tables, saved):
                table.update(hooks)

    def raw_nnsight():
        with torch.no_grad():
            with nn.trace(dict(inputs)):
                layers[5].output.save()
                z = layers[9].self_attn.hook_z.output.clone()
                z[:, :, 6] = 0
                layers[9].self_attn.hook_z.output = z
                nn.output["logits"].save()

    def mechnb_trace():
        with model.trace(PROMPT):
            model["resid_post.5"].save()
            model["head.9.6"] = 0
            model["logits"].save()

    shell = InteractiveShell.instance()
    shell.run_cell("%load_ext mechnb")
    shell.user_ns["__bench_model__"] = model
    shell.run_cell("%mechnb use __bench_model__")
    shell.user_ns["model"] = model
    cell = ('%%trace "' + PROMPT + '"\nh = model["resid_post.5"].save()\n'
            'model["head.9.6"] = 0\nlogits = model["logits"].save()\n')

    def trace_magic():
        result = shell.run_cell(cell, store_history=False)
        assert result.success, result.error_in_exec

    rows = [
        ("plain forward, stock sdpa attention", plain_sdpa),
        ("plain forward, mechnb hooked attention", plain_hooked),
        ("the same without the resid_mid carry hooks", plain_without_carry),
        ("raw nnsight trace (read, write head, logits)", raw_nnsight),
        ("model.trace (same reads and write)", mechnb_trace),
        ("%%trace cell (same reads and write)", trace_magic),
    ]
    base = None
    print(f"SmolLM2-135M, {inputs['input_ids'].shape[1]} tokens, median of {REPEATS}, "
          f"{torch.get_num_threads()} threads")
    for name, fn in rows:
        seconds = median_time(fn)
        base = base or seconds
        print(f"{name:48s} {seconds * 1000:8.1f} ms   x{seconds / base:5.2f}")


if __name__ == "__main__":
    main()
