"""`babyllama dpo`, `babyllama reward`, `babyllama grpo` and `babyllama score`: the stages after
SFT (preference pairs, a reward model, reinforcement learning) and reading a reward model.

They take what `babyllama sft` takes (--base, --data, -o, --resume, KEY=VALUE overrides, LoRA
flags) plus their own settings; the data flags land in the run config's `sft:` section, which
every stage that starts from a base run reads."""

from __future__ import annotations

from pathlib import Path

from babyllama.cli.runs import add_run_args, split_overrides, stage_config
from babyllama.errors import UserError

STAGE_HELP = {
    "dpo": ("preference-tune a chat run on chosen/rejected pairs (DPO, IPO or SimPO)",
            "Direct preference optimisation. Pairs: {prompt, chosen, rejected}, ShareGPT "
            "conversations + chosen/rejected, or OpenAI-style chosen/rejected message lists. "
            "Settings: dpo.loss=sigmoid|ipo|simpo dpo.beta=0.1 train.lr=... sft.epochs=2."),
    "reward": ("train a reward model (scalar head, Bradley-Terry loss) on preference pairs",
               "Reward modelling from a chat run's backbone. Settings: reward.margin=0 "
               "reward.center_rewards_coefficient=0 sft.epochs=2. Read it with `babyllama score`."),
    "grpo": ("reinforcement learning with a reward (GRPO): math answers, a reward model or a Python function",
             "Group relative policy optimisation. Prompts: math problems ({question, answer}, "
             "Ape210K, GSM8K) or builtin:arith-zh. Settings: grpo.num_generations=8 "
             "grpo.max_new_tokens=64 grpo.temperature=1.0 grpo.beta=0 grpo.format_bonus=0 "
             "train.max_steps=..."),
}


def add_parser(subparsers) -> None:
    for stage, (short, long) in STAGE_HELP.items():
        p = subparsers.add_parser(stage, help=short, description=long)
        p.add_argument("--base", help="the chat (SFT) run to start from")
        p.add_argument("--data", nargs="+", metavar="FILE",
                       help="prompts (grpo) or preference pairs (dpo, reward): json/jsonl files or folders")
        if stage != "grpo":
            p.add_argument("--format", help="the pair schema of every file: prompt, sharegpt or openai "
                                            "(default: detected per file)")
        p.add_argument("--template", help="chat template (default: the base run's own)")
        p.add_argument("--system-prompt", dest="system_prompt", help="system prompt for records without one")
        p.add_argument("--skip-bad-records", action="store_true",
                       help="skip and count malformed records instead of stopping at the first")
        if stage == "dpo":
            p.add_argument("--loss", choices=["sigmoid", "ipo", "simpo"], help="the preference loss")
            p.add_argument("--beta", type=float, help="β (default 0.1)")
        if stage == "grpo":
            p.add_argument("--reward", help="math (default), rm:REWARD_RUN, or module:function")
            p.add_argument("--num-generations", dest="num_generations", type=int,
                           help="answers sampled per prompt (default 8)")
            p.add_argument("--eval-data", dest="eval_data",
                           help="problems scored (greedy exact match) at each evaluation "
                                "(default: the held-out share of --data, math reward only)")
            p.add_argument("--eval-limit", dest="eval_limit", type=positive, default=200,
                           help="at most this many evaluation problems (default 200)")
        if stage != "reward":
            p.add_argument("--lora", action="store_true", help="train low-rank adapters only")
            p.add_argument("--qlora", action="store_true", help="LoRA over a 4-bit NF4 base (bitsandbytes)")
        add_run_args(p)
        p.set_defaults(func=cmd_stage, stage=stage)

    sc = subparsers.add_parser("score", help="print a reward model's scores of preference pairs",
                               description="Rewards of the chosen and rejected answers of each pair, "
                                           "the margin, and the pairwise accuracy over the file.")
    sc.add_argument("run", help="a reward model run (babyllama reward)")
    sc.add_argument("--data", required=True, help="preference pairs (any format `babyllama dpo` reads)")
    sc.add_argument("--limit", type=positive, help="score at most this many pairs")
    sc.add_argument("--show", type=positive, default=10, help="pairs to print (default 10; the accuracy covers all)")
    sc.add_argument("--jsonl", help="also write every pair's rewards to this JSON lines file")
    sc.add_argument("--format", help="the pair schema of every file: prompt, sharegpt or openai (default: detected)")
    sc.add_argument("--skip-bad-records", action="store_true", help="skip and count malformed pairs")
    sc.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, mps")
    sc.set_defaults(func=cmd_score)


def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    import argparse

    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def stage_values(args, values: dict) -> dict:
    """The stage's flags as config overrides on top of the `section.key=value` ones."""
    sft = values.setdefault("sft", {})
    if not isinstance(sft, dict):
        raise UserError("command line: sft must be a mapping of settings")
    if args.data:
        sft["sources"] = args.data
    for key in ("format", "template", "system_prompt"):
        if getattr(args, key, None) is not None:
            sft[key] = getattr(args, key)
    if args.skip_bad_records:
        sft["skip_bad_records"] = True
    section = {"dpo": ("loss", "beta"), "grpo": ("reward", "num_generations"), "reward": ()}[args.stage]
    for key in section:
        flag = getattr(args, key, None)
        if flag is None:
            continue
        given = values.setdefault(args.stage, {})
        if not isinstance(given, dict):
            raise UserError(f"command line: {args.stage} must be a mapping of settings")
        if key in given and given[key] != flag:
            # Two answers to one question: say so rather than let one win unseen.
            raise UserError(f"command line: --{key.replace('_', '-')} {flag} and {args.stage}.{key}={given[key]} "
                            f"disagree; give one")
        given[key] = flag
    if getattr(args, "lora", False) or getattr(args, "qlora", False):
        lora = values.setdefault("lora", {})
        lora["enabled"] = True
        if args.qlora:
            lora["qlora"] = True
    values["out_dir"] = args.out
    return values


def cmd_stage(args) -> None:
    from babyllama.config import parse_overrides
    from babyllama.train.sft import absolute_source

    args.data, more = split_overrides(args.data)
    args.overrides = list(args.overrides or []) + more
    values = stage_values(args, parse_overrides(args.overrides))
    if "sources" in values["sft"]:
        values["sft"]["sources"] = [absolute_source(s) for s in values["sft"]["sources"]]
    reward = values.get("grpo", {}).get("reward") if isinstance(values.get("grpo"), dict) else None
    if isinstance(reward, str):  # file paths absolute, so --resume works from any directory
        target, _, name = reward.rpartition(":")
        if reward.startswith("rm:"):
            values["grpo"]["reward"] = "rm:" + str(Path(reward[3:]).resolve())
        elif target.endswith(".py"):
            values["grpo"]["reward"] = f"{Path(target).resolve()}:{name}"
    cfg = stage_config(args, values, "the chat run")
    if args.stage == "dpo":
        from babyllama.train.dpo import run_dpo

        run_dir = run_dpo(cfg, resume=args.resume)
    elif args.stage == "reward":
        from babyllama.train.reward import run_reward

        run_dir = run_reward(cfg, resume=args.resume)
    else:
        from babyllama.train.grpo import run_grpo

        run_dir = run_grpo(cfg, resume=args.resume, eval_data=args.eval_data, eval_limit=args.eval_limit)
    from babyllama.train.distributed import is_main_process

    if not is_main_process():  # under torchrun: one summary, not one per process
        return
    print(f"run directory: {run_dir}")
    if args.stage == "reward":
        print(f"score pairs:   babyllama score {run_dir} --data PAIRS")
    else:
        print(f"talk to it:    babyllama chat {run_dir}")


def cmd_score(args) -> None:
    import json

    from babyllama.atomic import atomic_write_text
    from babyllama.data.preference import build_pairs, iter_pairs
    from babyllama.device import pick_device
    from babyllama.run import Run
    from babyllama.train.pairs import pair_scores

    if args.jsonl and Path(args.jsonl).is_dir():
        raise UserError(f"--jsonl {args.jsonl}: is a directory; name a file")
    run = Run(args.run)
    run.require_exists()
    model = run.load_reward_model()
    device = pick_device(args.device)
    model.to(device).eval()
    tokenizer = run.load_tokenizer()
    # Pairs are scored as the reward model was trained: with its default system prompt.
    system = run.config().sft.system_prompt or None
    pairs = list(iter_pairs(args.data, args.format, skip_bad=args.skip_bad_records, system=system))
    if args.limit:
        pairs = pairs[:args.limit]
    examples, stats = build_pairs(pairs, tokenizer, model.config.max_position_embeddings)
    if not examples:
        raise UserError(f"{args.data}: no pair fits the reward model's context: {stats.summary()}")
    scores = pair_scores(lambda b: model(b.input_ids, b.last), examples, 16, tokenizer.pad_id, device,
                         progress=True, full=True)
    rows = []
    for e, (c, r) in zip(examples, scores.tolist()):
        rows.append({"source": e.source, "chosen": c, "rejected": r, "margin": c - r, "correct": c > r})
    print(f"{'pair':<28} {'chosen':>8} {'rejected':>9} {'margin':>8}  right")
    for row in rows[:args.show]:
        print(f"{Path(row['source']).name[-28:]:<28} {row['chosen']:>8.3f} {row['rejected']:>9.3f} "
              f"{row['margin']:>8.3f}  {'yes' if row['correct'] else 'no'}")
    accuracy = sum(r["correct"] for r in rows) / len(rows)
    mean_margin = sum(r["margin"] for r in rows) / len(rows)
    print(f"{len(rows):,} pairs ({stats.summary()}): accuracy {accuracy:.1%}, mean margin {mean_margin:.3f}")
    if args.jsonl:
        atomic_write_text(Path(args.jsonl), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"rewards: {args.jsonl}")
