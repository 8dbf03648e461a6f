"""Full fine-tuning versus LoRA r=8, LoRA r=64 and QLoRA r=64 on the same SFT data and steps.

Seeds 2 and 4 compared these: on a small model LoRA r=8 / alpha 16 barely learns, while a
large rank nears full tuning. Each variant starts from the same pretrained run, sees the same
packed batches (`SFTBatches`, same seed) for the same number of steps and is run in its own
process, so its peak memory (CPU: max RSS; GPU: max allocated) is its own. Printed: final
loss (mean of the last 10 steps), trainable parameters, assistant tokens per second, peak
memory; written: one loss plot with the four curves. A measurement, not a test.

    python benchmarks/full_vs_lora.py --base runs/demo/pretrain            # alpaca_zh if ../shared exists
    python benchmarks/full_vs_lora.py --base runs/demo/pretrain --steps 20 --data builtin:chatterbot-zh
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(os.environ.get("BABYLLAMA_SHARED", Path(__file__).resolve().parents[2] / "shared"))
ALPACA = SHARED / "data" / "sft" / "alpaca_zh" / "zh-data-part-00.json"
# name -> (lora r, alpha, qlora); r=0 is full fine-tuning. alpha = 2r as the seeds used.
VARIANTS = {"full": (0, 0, False), "lora r=8": (8, 16, False), "lora r=64": (64, 128, False),
            "qlora r=64": (64, 128, True)}


def run_one(args) -> dict:
    """Train one variant in this process and return its measurements."""
    import torch

    from babyllama.config import read_run_config
    from babyllama.data.conversations import iter_conversations
    from babyllama.data.sft import SFTBatches, build_examples
    from babyllama.lora import LoraConfig, apply_lora, quantize_base, trainable_counts
    from babyllama.model.llama import Llama
    from babyllama.tokenizer import Tokenizer
    from babyllama.train.checkpoint import load_weights
    from babyllama.train.trainer import build_optimizer

    r, alpha, qlora = VARIANTS[args.one]
    device = torch.device(args.device)
    base = Path(args.base)
    cfg = read_run_config(base)
    tok = Tokenizer.load(base / "tokenizer")
    convs = list(itertools.islice(iter_conversations(args.data, skip_bad=True), args.conversations))
    seq_len = cfg.model.max_position_embeddings
    examples, _ = build_examples(convs, tok, seq_len + 1)
    batches = SFTBatches(examples, seq_len=seq_len, batch_size=args.batch_size, grad_accum=1, seed=0,
                         pad_id=tok.pad_id, mode="pack")
    torch.manual_seed(0)
    model = Llama(cfg.model)
    load_weights(model, base / "model.safetensors")
    model.to(device)
    if r:
        if qlora:
            quantize_base(model)
        model = apply_lora(model, LoraConfig(r=r, alpha=alpha, dropout=0.05))
    trainable, total = trainable_counts(model)
    train_cfg = cfg.train
    train_cfg.lr = args.lr_lora if r else args.lr_full
    train_cfg.weight_decay = 0.0
    optimizer = build_optimizer(model, train_cfg)
    model.train()
    losses, targets, seconds = [], 0, 0.0
    for step in range(args.steps):
        x, y, extra = batches.get(step, 0, device)
        t0 = time.perf_counter()
        _, loss = model(x, y, **extra)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if step >= 2:  # the first steps pay one-off allocation and kernel selection
            seconds += time.perf_counter() - t0
            targets += int((y != -100).sum())
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    return {"name": args.one, "losses": losses, "trainable": trainable, "total": total,
            "tok_per_s": targets / seconds if seconds else 0.0, "peak_mib": peak}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="runs/demo/pretrain", help="a pretrained run directory")
    p.add_argument("--data", default=str(ALPACA) if ALPACA.exists() else "builtin:chatterbot-zh")
    p.add_argument("--conversations", type=int, default=2000)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr-full", type=float, default=1e-3)
    p.add_argument("--lr-lora", type=float, default=2e-3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--plot", default="docs/full_vs_lora.png")
    p.add_argument("--one", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args)))
        return
    if not (Path(args.base) / "model.safetensors").exists():
        p.error(f"{args.base}: not a pretrained run (run `babyllama demo` first, or pass --base)")

    results = []
    for name in VARIANTS:
        cmd = [sys.executable, __file__, "--one", name] + [
            a for k, v in vars(args).items() if k not in ("one", "plot") for a in (f"--{k.replace('_', '-')}", str(v))]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{name}: failed\n{out.stderr[-2000:]}")
            continue
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{name}: done", flush=True)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for res in results:
        ax.plot(range(1, len(res["losses"]) + 1), res["losses"], label=res["name"])
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (assistant tokens)")
    ax.set_title(f"SFT from {args.base}: {args.steps} steps x {args.batch_size} packed rows")
    ax.legend()
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=120)

    memory = "peak GPU MiB" if args.device.startswith("cuda") else "peak RSS MiB"
    print(f"\n{args.data}: {args.steps} steps, batch {args.batch_size}, lr full {args.lr_full:g}, "
          f"lora {args.lr_lora:g}, device {args.device}")
    print(f"| variant | final loss | trainable params | assistant tok/s | {memory} |")
    print("|---|---:|---:|---:|---:|")
    for res in results:
        final = sum(res["losses"][-10:]) / len(res["losses"][-10:])
        print(f"| {res['name']} | {final:.3f} | {res['trainable']:,} ({res['trainable'] / res['total']:.1%}) "
              f"| {res['tok_per_s']:,.0f} | {res['peak_mib']:,.0f} |")
    print(f"\nloss plot: {args.plot}")


if __name__ == "__main__":
    main()
