"""Generation speed on the embedded model: mechnb's `generate` under a steering vector
against transformers' `generate` without it, in one process.

Prints, for 32, 128 and 512 new tokens for 4 prompts (greedy):
- the seconds of `model.generate` with a steering vector at resid_pre.12 (every position),
  through the key/value cache;
- the seconds of transformers' `generate` of the same prompts with no intervention, for
  as many steps as mechnb ran (rows stop at end-of-sequence: every row is made to run
  them, `min_new_tokens`), on the same model object (mechnb's attention function);
- their ratio (the target: at most 1.25 at 128 tokens);
- at 32 and 128 tokens, `cache=False` (a forward of the whole sequence per step, the
  quadratic path) and its ratio.
Each figure is the fastest of a few runs, the two sides alternating, so that other work
on the machine weighs on both alike.

Run: `.venv/bin/python bench/generation.py` (about 5 minutes on 2 cores).
"""

import time

import torch

import mechnb

PROMPTS = ["I think the movie was", "The Eiffel Tower is located in the city of",
           "When Mary and John went to the store, John gave a drink to", "Hello"]
POSITIVE = ["I love this, it is wonderful", "What a great day", "This is fantastic"]
NEGATIVE = ["I hate this, it is awful", "What a terrible day", "This is dreadful"]
SITE, SCALE = "resid_pre.12", 4.0
REPEATS = {32: 3, 128: 2, 512: 1}
WHOLE = (32, 128)


def seconds(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def main():
    model = mechnb.load()
    tokenizer = model.tokenizer
    vector = model.steering_vector(POSITIVE, NEGATIVE, SITE)
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")

    def ours(n, cache=True):
        with model.steered(SITE, vector, scale=SCALE):
            result = model.generate(PROMPTS, max_new_tokens=n, cache=cache)
        return int(result.df.n_tokens.max())

    def theirs(steps):
        with torch.no_grad():
            out = model.hf.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                    pad_token_id=tokenizer.eos_token_id)
        return out.shape[1] - inputs["input_ids"].shape[1]

    ours(4), theirs(4)  # warm up
    print(f"SmolLM2-135M, {len(PROMPTS)} prompts, greedy, steering at {SITE} (scale {SCALE:g}) against "
          f"none, fastest of {REPEATS} runs, {torch.get_num_threads()} threads")
    for n, repeats in REPEATS.items():
        mechnb_times, hf_times = [], []
        for _ in range(repeats):
            took, steps = seconds(lambda: ours(n))
            mechnb_times.append(took)
            took, ran = seconds(lambda: theirs(steps))
            hf_times.append(took)
            assert ran == steps, (ran, steps)
        best, reference = min(mechnb_times), min(hf_times)
        print(f"{n:4d} new tokens ({steps} steps): mechnb {best:7.2f} s, transformers {reference:7.2f} s, "
              f"ratio {best / reference:5.2f}")
        if n in WHOLE:
            took, _ = seconds(lambda: ours(n, cache=False))
            print(f"{'':4s} cache=False (whole sequence each step): {took:7.2f} s, ratio {took / reference:5.2f}")


if __name__ == "__main__":
    main()
