"""Arithmetic word problems on CPU: SFT, then GRPO (and DPO on the model's own answers), with
held-out exact-match accuracy before and after.

Math word problems are far beyond a ~5M-parameter model, so the task is the built-in
`builtin:arith-zh` set (Chinese addition and subtraction word problems with operands up to 20,
train/val/test split by a hash of the problem). The steps are the README's commands:

    1. babyllama sft  --base PRETRAINED --data builtin:arith-zh#train sft.epochs=E     -> sft
    2. babyllama eval sft --task math --data builtin:arith-zh#test                     (before)
    3. babyllama grpo --base sft --data builtin:arith-zh#train train.max_steps=S      -> grpo
    4. pairs from the SFT model's own samples on training problems: a right answer as chosen,
       a wrong one as rejected; babyllama dpo --base sft --data pairs.jsonl            -> dpo
    5. babyllama eval grpo|dpo --task math --data builtin:arith-zh#test                (after)

Printed: one table (accuracy before/after, the GRPO reward at its start and end, wall times);
written: OUT/grpo/loss.png (loss and reward curve). A measurement, not a test.

    python benchmarks/rl_arithmetic.py --base runs/demo/pretrain -o runs/arith
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def cli(*argv: str) -> None:
    from babyllama.cli import main

    code = main([str(a) for a in argv])
    if code:
        raise SystemExit(f"babyllama {' '.join(map(str, argv))} exited with {code}")


def accuracy(run: Path, name: str) -> float:
    cli("eval", run, "--task", "math", "--data", "builtin:arith-zh#test", "--name", name)
    return json.loads((run / "eval" / f"{name}.json").read_text(encoding="utf-8"))["metrics"]["accuracy"]


def own_pairs(run: Path, out: Path, problems: int, samples: int, seed: int) -> int:
    """Write {prompt, chosen, rejected} pairs from `run`'s own sampled answers to training
    problems: for each problem with a right and a wrong answer among `samples`, one pair."""
    from babyllama.data.problems import arithmetic_problems
    from babyllama.eval.math import answers_match, extract_answer
    from babyllama.infer.chat import prompt_ids
    from babyllama.infer.config import decoding_defaults
    from babyllama.infer.generate import complete
    from babyllama.run import Run

    r = Run(run)
    model, tokenizer = r.load_model().eval(), r.load_tokenizer()
    cfg = decoding_defaults("samples", temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
                            max_new_tokens=32, num_return_sequences=samples, seed=seed)
    rows = []
    todo = arithmetic_problems("train", seed=seed)[-problems:]  # the end: SFT saw these least
    for start in range(0, len(todo), 16):
        chunk = todo[start:start + 16]
        prompts = [prompt_ids(tokenizer, [{"role": "user", "content": p.question}], budget=200)[0] for p in chunk]
        answers = complete(model, tokenizer, prompts, cfg)
        for i, p in enumerate(chunk):
            texts = [a.text.strip() for a in answers[i * samples:(i + 1) * samples]]
            right = [t for t in texts if answers_match(extract_answer(t), p.answer)]
            wrong = [t for t in texts if not answers_match(extract_answer(t), p.answer)]
            if right and wrong:
                rows.append({"prompt": p.question, "chosen": right[0], "rejected": wrong[0]})
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="a pretrained run (e.g. runs/demo/pretrain)")
    ap.add_argument("--sft", help="an SFT run made by step 1 earlier (skips it)")
    ap.add_argument("-o", "--out", default="runs/arith")
    ap.add_argument("--sft-epochs", type=float, default=3.0)
    # The defaults are the best of the settings tried (see the README): LoRA at a high rate for
    # a few dozen steps; longer runs, and full fine-tuning at 2e-5..1.5e-4, lost accuracy.
    ap.add_argument("--grpo-steps", type=int, default=40)
    ap.add_argument("--grpo-lr", type=float, default=5e-4)
    ap.add_argument("--grpo-lora-rank", type=int, default=16, help="0: full fine-tuning")
    ap.add_argument("--grpo-prompts", type=int, default=8, help="prompts per GRPO step (x 8 answers)")
    ap.add_argument("--grpo-temperature", type=float, default=1.0)
    ap.add_argument("--pair-problems", type=int, default=600, help="training problems sampled for DPO pairs")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    times = {}

    t0 = time.perf_counter()
    sft = Path(args.sft) if args.sft else out / "sft"
    if not args.sft:
        if not args.base:
            ap.error("pass --base PRETRAINED (or --sft SFT_RUN)")
        cli("sft", "--base", args.base, "--data", "builtin:arith-zh#train", "-o", sft,
            f"sft.epochs={args.sft_epochs}", "sft.val_fraction=0.02")
    times["sft"] = time.perf_counter() - t0
    before = accuracy(sft, "math-test")

    t0 = time.perf_counter()
    lora = ["--lora", f"lora.r={args.grpo_lora_rank}", f"lora.alpha={2 * args.grpo_lora_rank}"] \
        if args.grpo_lora_rank else []
    cli("grpo", "--base", sft, "--data", "builtin:arith-zh#train", "-o", out / "grpo", *lora,
        "--eval-data", "builtin:arith-zh#val", "--eval-limit", "100",
        f"train.max_steps={args.grpo_steps}", f"train.lr={args.grpo_lr}", "grpo.num_generations=8",
        f"train.batch_size={8 * args.grpo_prompts}", f"grpo.temperature={args.grpo_temperature}",
        "grpo.max_new_tokens=24", f"train.eval_every={max(1, args.grpo_steps // 4)}", "train.sample_every=0")
    times["grpo"] = time.perf_counter() - t0
    after_grpo = accuracy(out / "grpo", "math-test")
    records = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in records if "reward" in r]
    k = max(1, len(rewards) // 10)
    reward_start, reward_end = sum(rewards[:k]) / k, sum(rewards[-k:]) / k

    t0 = time.perf_counter()
    n_pairs = own_pairs(sft, out / "own_pairs.jsonl", args.pair_problems, 8, args.seed)
    cli("dpo", "--base", sft, "--data", out / "own_pairs.jsonl", "-o", out / "dpo",
        "train.sample_every=0")
    times["dpo"] = time.perf_counter() - t0
    after_dpo = accuracy(out / "dpo", "math-test")
    dpo_metrics = [json.loads(line) for line in (out / "dpo" / "metrics.jsonl").read_text().splitlines()]
    dpo_val = [r for r in dpo_metrics if "val_rewards/accuracies" in r][-1]

    print()
    print("| stage | held-out accuracy (arith-zh test, 300, greedy) | wall time |")
    print("|---|---|---|")
    sft_time = "an earlier run" if args.sft else f"{times['sft']:.0f} s"
    print(f"| SFT ({args.sft_epochs:g} epochs) | {before:.1%} | {sft_time} |")
    kind = f"LoRA r={args.grpo_lora_rank}" if args.grpo_lora_rank else "full"
    print(f"| + GRPO ({kind}, {args.grpo_steps} steps x {args.grpo_prompts} prompts x 8 answers, "
          f"lr {args.grpo_lr:g}, T {args.grpo_temperature:g}) | {after_grpo:.1%} "
          f"({(after_grpo - before) * 100:+.1f} points) | {times['grpo']:.0f} s |")
    print(f"| + DPO on {n_pairs} pairs of its own answers | {after_dpo:.1%} ({(after_dpo - before) * 100:+.1f} "
          f"points) | {times['dpo']:.0f} s (sampling included) |")
    print(f"GRPO mean reward: first tenth {reward_start:.3f} -> last tenth {reward_end:.3f}")
    print(f"DPO held-out reward accuracy {dpo_val['val_rewards/accuracies']:.1%}, "
          f"margin {dpo_val['val_rewards/margins']:.3f}")
    print(f"reward curve: {out / 'grpo' / 'loss.png'}")


if __name__ == "__main__":
    main()
