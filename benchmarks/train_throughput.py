"""Training throughput of babyllama's `Llama` next to transformers' `LlamaForCausalLM`.

What is measured: whole optimizer steps, exactly as the trainer runs them -- forward with the
loss, backward, gradient clipping, AdamW step, zero_grad -- in tokens per second (batch * seq_len
tokens per step). Both models are built from the same ModelConfig (transformers' twin gets the
same field values, attention_dropout=0, attn_implementation="sdpa", use_cache=False as in any
training setup), carry the same weights (our state dict loaded into theirs), see the same batch,
and get the same optimizer (`build_optimizer`: torch AdamW, same lr/betas/eps/weight-decay groups,
torch's fused/foreach defaults). The loss is the same fp32 cross-entropy on the logits for both,
so only the model code differs. fp32 on CPU; bf16 autocast with --device cuda.

Why alternate: a shared machine's load drifts (other people's tests come and go). Running all of
one model's steps and then all of the other's would put any drift on one side only. Instead each
of R rounds times N steps of ours and then N of theirs, and the median over rounds is reported,
so slow periods hit both. The load average is printed so a noisy run can be recognised.

Achieved GFLOP/s uses `Llama.flops_per_token` (6N + 12*L*d*T, PaLM appendix B) and is set next
to the best GFLOP/s of one large matmul on the same device and thread count, a practical peak
(MFU-style: the share of what the matmul kernel itself reaches).

This is a measurement, never a pass/fail test; the one assertion is a sanity guard that both
models compute the same loss on the same batch before any timing.

    python benchmarks/train_throughput.py                      # demo-cpu, seq 256, batch 8
    python benchmarks/train_throughput.py --preset 43m --vocab-size 8000 --batch-size 4 --steps 3 --rounds 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from babyllama.config import load_config
from babyllama.model.llama import Llama, ModelConfig
from babyllama.train.trainer import autocast_context, build_optimizer


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def hf_twin(model: Llama):
    """transformers' LlamaForCausalLM with our config and a copy of our weights."""
    import transformers

    c = model.config
    hf_config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.kv_heads, max_position_embeddings=c.max_position_embeddings,
        rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings, initializer_range=c.initializer_range,
        attention_dropout=0.0, use_cache=False)
    hf = transformers.LlamaForCausalLM._from_config(hf_config, attn_implementation="sdpa")
    state = model.state_dict()
    if c.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"state dicts differ: missing {missing}, unexpected {unexpected}")
    if c.tie_word_embeddings and hf.lm_head.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("transformers' twin did not tie lm_head to the embedding")
    return hf


def ours_loss(model, x, y):
    return model(x, y)[1]


def hf_loss(model, x, y):
    # The same loss computation as ours (fp32 cross-entropy over every position), on their logits.
    logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-100)


def make_step(model, loss_fn, optimizer, x, y, precision, device, clip):
    def step():
        with autocast_context(precision, device):
            loss = loss_fn(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())  # the trainer reads the loss every step too (and this syncs CUDA)
    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, n, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return time.perf_counter() - t0


def matmul_peak(device, dtype, n=2048, repeats=5, inner=4) -> float:
    """Best GFLOP/s of an n x n @ n x n matmul (2 n^3 FLOPs each) over a few timed groups."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up
    best = 0.0
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.matmul(a, b)
        sync(device)
        best = max(best, inner * 2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return best


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo-cpu")
    p.add_argument("--vocab-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed steps per model per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model before round 1")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    args = p.parse_args(argv)

    threads = args.threads or available_cores()
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    precision = "bf16-mixed" if device.type == "cuda" else "fp32"
    peak_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    cfg = load_config(args.preset)
    mcfg: ModelConfig = cfg.model
    if args.vocab_size:
        mcfg = dataclasses.replace(mcfg, vocab_size=args.vocab_size)
    mcfg = dataclasses.replace(mcfg, dropout=0.0)
    if args.seq_len > mcfg.max_position_embeddings:
        p.error(f"--seq-len {args.seq_len} is longer than the preset's context "
                f"({mcfg.max_position_embeddings})")

    torch.manual_seed(args.seed)
    ours = Llama(mcfg).to(device)
    theirs = hf_twin(ours).to(device)
    x_all = torch.randint(0, mcfg.vocab_size, (args.batch_size, args.seq_len + 1), device=device)
    x, y = x_all[:, :-1].contiguous(), x_all[:, 1:].contiguous()

    # Sanity guard (not a timing check): same weights, same batch -> same loss.
    ours.eval(), theirs.eval()
    with torch.no_grad():
        l_ours, l_theirs = float(ours_loss(ours, x, y)), float(hf_loss(theirs, x, y))
    assert abs(l_ours - l_theirs) <= 1e-4, f"losses differ: babyllama {l_ours} vs transformers {l_theirs}"
    ours.train(), theirs.train()

    clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
    impls = {}
    for name, model, loss_fn in (("babyllama", ours, ours_loss), ("transformers", theirs, hf_loss)):
        opt = build_optimizer(model, cfg.train)
        impls[name] = make_step(model, loss_fn, opt, x, y, precision, device, clip)

    peak_before = matmul_peak(device, peak_dtype)
    flops_per_token = ours.flops_per_token(args.seq_len)
    tokens_per_step = args.batch_size * args.seq_len
    load_before = os.getloadavg()

    for step in impls.values():
        for _ in range(args.warmup):
            step()
    rates: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(args.rounds):
        for name, step in impls.items():
            rates[name].append(args.steps * tokens_per_step / time_steps(step, args.steps, device))
    load_after = os.getloadavg()
    # Measured before and after the steps, best kept: a peak taken while someone else's job
    # holds a core would understate it and flatter the % of peak.
    peak = max(peak_before, matmul_peak(device, peak_dtype))

    params = ours.parameter_counts()["total"]
    rows = {}
    for name, r in rates.items():
        tok_s = statistics.median(r)
        gflops = tok_s * flops_per_token / 1e9
        rows[name] = {"tokens_per_s": tok_s, "tokens_per_s_rounds": r, "gflop_per_s": gflops,
                      "pct_of_peak": 100 * gflops / peak}
    ratio = rows["babyllama"]["tokens_per_s"] / rows["transformers"]["tokens_per_s"]

    peak_name = "bf16" if device.type == "cuda" else "fp32"
    print(f"preset {args.preset}  params {params / 1e6:.2f}M  vocab {mcfg.vocab_size}  "
          f"seq {args.seq_len}  batch {args.batch_size}  threads {threads}  device {args.device}  "
          f"load {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print(f"{args.rounds} rounds x {args.steps} steps each, alternating; median of rounds  "
          f"(loss check: {l_ours:.5f} vs {l_theirs:.5f})")
    print(f"{'impl':<14}{'tokens/s':>10}{'GFLOP/s':>10}{f'% of {peak_name} peak':>18}   per round")
    for name, row in rows.items():
        per_round = " ".join(f"{v:,.0f}" for v in row["tokens_per_s_rounds"])
        print(f"{name:<14}{row['tokens_per_s']:>10,.0f}{row['gflop_per_s']:>10.1f}"
              f"{row['pct_of_peak']:>17.1f}%   {per_round}")
    print(f"ratio babyllama / transformers: {ratio:.2f}x   "
          f"({peak_name} matmul peak: {peak:.0f} GFLOP/s, {flops_per_token / 1e6:.1f} MFLOP/token)")

    result = {
        "preset": args.preset, "model": mcfg.to_dict(), "params": params, "seq_len": args.seq_len,
        "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
        "rounds": args.rounds, "threads": threads, "device": args.device, "precision": precision,
        "loadavg_before": load_before, "loadavg_after": load_after,
        "loss_check": {"babyllama": l_ours, "transformers": l_theirs},
        "flops_per_token": flops_per_token, "matmul_peak_gflop_per_s": peak, "results": rows,
        "ratio_babyllama_over_transformers": ratio,
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "machine": platform.processor() or platform.machine(),
    }
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
