"""Generation speed of babyllama's engine next to transformers' `generate`, same weights, same
process.

What is measured: greedy decoding of `--new-tokens` tokens after a 16-token prompt at batch 1,
and after 16 prompts of 8..23 tokens (left-padded, one batch) at batch 16; tokens per second
= new tokens / wall time, prefill included. transformers' `LlamaForCausalLM` gets our config
and a copy of our weights (randomly initialised: speed does not depend on training) and runs
`generate(do_sample=False, min_new_tokens=max_new_tokens)` with its default dynamic KV cache
and SDPA attention; ours runs the engine's `Decoder` (the loop behind `llm.generate`). Both
produce the same tokens at batch 1 (checked before timing).

Rounds alternate ours and theirs, and the median round is reported, so a shared machine's
drifting load hits both sides.

"weights-only bound": the tokens/s if a step did nothing but the model's matrix products for
one token (every Linear once, in our layout, nothing else): at batch 1 on a CPU a step is
bounded by streaming the fp32 weights from memory, whatever the code around them does.

    python benchmarks/generate_throughput.py                       # demo-cpu and 43m presets
    python benchmarks/generate_throughput.py --presets demo-cpu --new-tokens 64 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_throughput import available_cores, hf_twin  # noqa: E402

from babyllama.config import load_config  # noqa: E402
from babyllama.infer.config import GenerationConfig  # noqa: E402
from babyllama.infer.engine import Decoder, prepare_for_decoding  # noqa: E402
from babyllama.model.llama import Llama  # noqa: E402


def ours_generate(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    decoder = Decoder(model, prompts, GenerationConfig(temperature=0, max_new_tokens=new_tokens))
    with torch.inference_mode():
        while not decoder.done:
            decoder.step()
    return decoder.tokens


def hf_generate(hf, prompts: list[list[int]], new_tokens: int, device="cpu") -> list[list[int]]:
    """transformers' greedy generate of exactly `new_tokens` tokens after left-padded prompts."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    with torch.inference_mode():
        out = hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[:, width:].tolist()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def weights_only_rate(model, rounds: int = 5, steps: int = 50) -> float:
    """Tokens/s of the matrix products alone at batch 1 (best of `rounds`)."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(1, m.in_features) for m in linears]
    best = float("inf")
    with torch.inference_mode():
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(steps):
                for m, x in zip(linears, inputs):
                    torch.nn.functional.linear(x, m.weight)
            best = min(best, (time.perf_counter() - start) / steps)
    return 1 / best


def measure(preset: str, new_tokens: int, rounds: int) -> dict:
    torch.manual_seed(0)
    model = Llama(load_config(preset).model).eval()
    hf = hf_twin(model)
    hf.config.use_cache = True
    hf.generation_config.use_cache = True
    fast = Llama(model.config).eval()
    fast.load_state_dict(model.state_dict())
    prepare_for_decoding(fast)
    g = torch.Generator().manual_seed(1)
    V = model.config.vocab_size
    one = [torch.randint(3, V, (16,), generator=g).tolist()]
    sixteen = [torch.randint(3, V, (8 + i,), generator=g).tolist() for i in range(16)]
    assert ours_generate(fast, one, 12) == ours_generate(model, one, 12) == hf_generate(hf, one, 12), \
        "engine and transformers disagree at batch 1"
    runs = {"ours": lambda p: ours_generate(fast, p, new_tokens),
            "ours-plain": lambda p: ours_generate(model, p, new_tokens),
            "hf": lambda p: hf_generate(hf, p, new_tokens)}
    times = {(name, b): [] for name in runs for b in (1, 16)}
    for fn in runs.values():  # warm-up
        fn(one)
    for _ in range(rounds):
        for batch, prompts in ((1, one), (16, sixteen)):
            for name, fn in runs.items():
                times[(name, batch)].append(timed(lambda fn=fn, ps=prompts: fn(ps)))
    rates = {key: key[1] * new_tokens / statistics.median(ts) for key, ts in times.items()}
    rates["bound"] = weights_only_rate(fast)
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["demo-cpu", "43m"])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads on {available_cores()} cores, "
          f"fp32 CPU, greedy, {args.new_tokens} new tokens, median of {args.rounds} rounds, "
          f"load average {os.getloadavg()[0]:.2f}")
    print()
    print("| preset | batch | transformers tok/s | ours, plain layout tok/s | ours tok/s | ours / transformers | weights-only bound tok/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for preset in args.presets:
        r = measure(preset, args.new_tokens, args.rounds)
        for b in (1, 16):
            bound = f"{r['bound']:,.0f}" if b == 1 else ""
            print(f"| {preset} | {b} | {r[('hf', b)]:,.0f} | {r[('ours-plain', b)]:,.0f} | "
                  f"{r[('ours', b)]:,.0f} | {r[('ours', b)] / r[('hf', b)]:.2f}x | {bound} |", flush=True)
        print(f"| {preset} | 16 vs 1 | {r[('hf', 16)] / r[('hf', 1)]:.1f}x | "
              f"{r[('ours-plain', 16)] / r[('ours-plain', 1)]:.1f}x | {r[('ours', 16)] / r[('ours', 1)]:.1f}x | | |",
              flush=True)


if __name__ == "__main__":
    main()
