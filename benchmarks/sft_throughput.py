"""SFT throughput: padding versus packing on the same conversations, same model, same steps.

What is measured: whole optimizer steps as the trainer runs them (forward with the loss,
backward, clipping, AdamW, zero_grad) on batches from `SFTBatches`, in *assistant tokens
trained per second* -- the tokens that carry a loss; padding and prompt tokens cost compute
but teach nothing.

- pack: rows of seq_len tokens holding several conversations each, a block-diagonal attention
  mask keeping them apart;
- pad:  length-sorted buckets, each batch right-padded to its longest conversation; its batch
  size is set so that a batch holds about as many conversations as a packed batch (so both
  modes see the same data per step, and only the layout differs).

Like train_throughput.py, the modes alternate in rounds and the median is reported, so load
drift on a shared machine hits both. A measurement, never a pass/fail test.

    python benchmarks/sft_throughput.py                          # alpaca_zh from ../shared/data if present
    python benchmarks/sft_throughput.py --data builtin:chatterbot-zh --steps 5
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from pathlib import Path

import torch

from babyllama.config import load_config
from babyllama.data.conversations import iter_conversations
from babyllama.data.sft import SFTBatches, build_examples
from babyllama.model.llama import Llama
from babyllama.tokenizer import train_tokenizer
from babyllama.train.trainer import build_optimizer

SHARED = Path(os.environ.get("BABYLLAMA_SHARED", Path(__file__).resolve().parents[2] / "shared"))
ALPACA = SHARED / "data" / "sft" / "alpaca_zh" / "zh-data-part-00.json"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ALPACA) if ALPACA.exists() else "builtin:chatterbot-zh")
    p.add_argument("--conversations", type=int, default=3000)
    p.add_argument("--preset", default="demo-cpu")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8, help="packed rows per step")
    p.add_argument("--steps", type=int, default=8, help="timed steps per mode per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    convs = list(itertools.islice(iter_conversations(args.data, skip_bad=True), args.conversations))
    texts = (m["content"] for c in convs for m in c.messages)
    cfg = load_config(args.preset)
    tok = train_tokenizer(texts, cfg.model.vocab_size, show_progress=False)
    examples, stats = build_examples(convs, tok, args.seq_len + 1)
    n_tokens = sum(len(e.ids) for e in examples)
    mean_len = n_tokens / len(examples)
    print(f"data: {args.data}: {stats.summary()}; mean {mean_len:.0f} tokens, "
          f"{sum(int(e.mask.sum()) for e in examples) / n_tokens:.0%} of them assistant tokens")

    cfg.model.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    model = Llama(cfg.model)
    pack = SFTBatches(examples, seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=1, seed=0,
                      pad_id=tok.pad_id, mode="pack")
    per_batch = len(examples) / pack.batches_per_epoch
    pad = SFTBatches(examples, seq_len=args.seq_len, batch_size=max(1, round(per_batch)), grad_accum=1,
                     seed=0, pad_id=tok.pad_id, mode="pad")
    modes = {"pad": pad, "pack": pack}
    optimizer = build_optimizer(model, cfg.train)

    def run(batches, first_step: int, n: int) -> tuple[float, int, int]:
        targets = positions = 0
        t0 = time.perf_counter()
        for step in range(first_step, first_step + n):
            x, y, extra = batches.get(step, 0, "cpu")
            _, loss = model(x, y, **extra)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            targets += int((y != -100).sum())
            positions += y.numel()
        return time.perf_counter() - t0, targets, positions

    for batches in modes.values():
        run(batches, 0, 2)  # warm-up
    rates = {name: [] for name in modes}
    fill = {}
    for r in range(args.rounds):
        for name, batches in modes.items():
            seconds, targets, positions = run(batches, 2 + r * args.steps, args.steps)
            rates[name].append(targets / seconds)
            fill[name] = targets / positions
    print(f"\n{args.preset}, seq_len {args.seq_len}, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} rounds x {args.steps} steps (load {os.getloadavg()[0]:.1f})")
    print(f"{'mode':<6}{'batch':>8}{'batches/epoch':>15}{'trained share':>15}{'assistant tok/s':>17}")
    for name, batches in modes.items():
        shape = f"{batches.batch_size}" + (f"x{args.seq_len}" if name == "pack" else "")
        print(f"{name:<6}{shape:>8}{batches.batches_per_epoch:>15,}{fill[name]:>15.0%}"
              f"{statistics.median(rates[name]):>17,.0f}")
    ratio = statistics.median(rates["pack"]) / statistics.median(rates["pad"])
    print(f"\npack / pad: {ratio:.2f}x assistant tokens per second; "
          f"{pad.batches_per_epoch / pack.batches_per_epoch:.2f}x fewer steps per epoch")
    return {"rates": rates, "ratio": ratio}


if __name__ == "__main__":
    main()
