"""`babyllama pretrain`: pretrain a model on prepared shards, from a preset or a YAML config."""

from __future__ import annotations

import sys

from babyllama.cli.runs import add_run_args, resume_config


def add_parser(subparsers) -> None:
    # babyllama.config imports the model (torch): only here, where the presets are listed.
    from babyllama.config import list_presets

    pt = subparsers.add_parser("pretrain", help="pretrain a model on prepared shards",
                               description="Pretrain a Llama. Any config field can be overridden as "
                                           "section.key=value, e.g. train.lr=3e-4 model.num_hidden_layers=8.")
    src = pt.add_mutually_exclusive_group()
    src.add_argument("--preset", help=f"a preset: {', '.join(list_presets())}")
    src.add_argument("-c", "--config", help="a YAML config file")
    pt.add_argument("--data", help="a directory made by `babyllama prepare`")
    pt.add_argument("--tokenizer", help="tokenizer (default: the one saved with the data)")
    add_run_args(pt)
    pt.set_defaults(func=cmd_pretrain)


def build_config(args):
    """The run's config from the flags: --data, --tokenizer and --out are overrides like any
    `section.key=value` (on --resume, only paths and the RESUME_KEYS may change)."""
    from babyllama.config import copy_config, load_config, parse_overrides
    from babyllama.run import Run

    paths = {k: v for k, v in (("data", args.data), ("tokenizer", args.tokenizer)) if v}
    if args.resume:
        if args.preset or args.config:
            # Re-running the original command with --resume is the natural way to continue, so
            # the preset is accepted, but its settings are the run's already: say it is unread.
            flag = f"--preset {args.preset}" if args.preset else f"-c {args.config}"
            print(f"note: {flag} is not read when resuming: the run continues with "
                  f"{Run(args.out).config_file} (train.max_steps=N makes a run without a time budget "
                  "longer)", file=sys.stderr)
        return copy_config(resume_config(args), **paths)
    values = parse_overrides(args.overrides)
    values.update(paths, out_dir=args.out)
    return load_config(args.preset or args.config, values)


def cmd_pretrain(args) -> None:
    from babyllama.train.pretrain import run_pretrain

    cfg = build_config(args)
    run_dir = run_pretrain(cfg, resume=args.resume)
    from babyllama.train.distributed import is_main_process

    if not is_main_process():  # under torchrun: one summary, not one per process
        return
    from babyllama.run import LOSS_PLOT, METRICS, SAMPLES, WEIGHTS

    print(f"run directory: {run_dir}  ({WEIGHTS}, {METRICS}, {LOSS_PLOT}, {SAMPLES})")
