"""Cold and cached load times of the embedded model, each in a fresh process.

Cold: converting the GGUF into an empty cache directory. Cached: loading from the
safetensors cache, first in a fresh process (which pays transformers' deferred imports
of torch._dynamo and torch.distributed, about 2 s) and again in the same process.
Each also reports how long `import torch, transformers, nnsight, mechnb` takes.
Run: `.venv/bin/python bench/load_time.py`.
"""

import os
import subprocess
import sys
import tempfile

PROBE = r"""
import time
t0 = time.perf_counter()
import torch, transformers, nnsight, mechnb
t1 = time.perf_counter()
model = mechnb.load()
t2 = time.perf_counter()
assert model.top("The Eiffel Tower is located in the city of", k=1).token[0] == " Paris"
t3 = time.perf_counter()
mechnb.load()
t4 = time.perf_counter()
print(f"{t1 - t0:.2f} {t2 - t1:.2f} {t4 - t3:.2f}")
"""


def run(env):
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return float(out[-3]), float(out[-2]), float(out[-1])


def main():
    with tempfile.TemporaryDirectory() as empty:
        env = dict(os.environ, MECHNB_CACHE=empty)
        imports, cold, _ = run(env)
        print(f"cold load (convert GGUF, write cache):       {cold:6.2f} s  (after imports of {imports:.2f} s)")
        imports, cached, again = run(env)
        print(f"cached load, first in a fresh process:        {cached:6.2f} s  (after imports of {imports:.2f} s)")
        print(f"cached load, again in the same process:       {again:6.2f} s")
        print(f"cold / cached (fresh process): x{cold / cached:.1f}")


if __name__ == "__main__":
    main()
