"""What every training stage (pretrain, sft) takes: its run directory, --resume and config
overrides, and the saved config a resumed run continues with."""

from __future__ import annotations

import argparse
import re

from babyllama.errors import UserError


def add_run_args(p: argparse.ArgumentParser) -> None:
    """What every training stage takes: its run directory, --resume and config overrides."""
    p.add_argument("-o", "--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")


def resume_config(args, values: dict | None = None):
    """The saved config of the run in --out, with the command's settings (`values`, default:
    its KEY=VALUE overrides) checked against it: only `config.RESUME_KEYS` may change, the
    rest may be restated. Paths and the run directory are the flags' business, not compared."""
    from babyllama import config
    from babyllama.run import Run

    values = dict(config.parse_overrides(args.overrides) if values is None else values)
    for key in ("out_dir", "data", "tokenizer", "preset"):
        values.pop(key, None)
    return config.resume_config(Run(args.out).config(), values, args.out)


OVERRIDE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*=.*", re.DOTALL)


def split_overrides(items: list[str] | None) -> tuple[list[str], list[str]]:
    """(files, KEY=VALUE overrides) of a multi-value flag: `--data a.json train.lr=1e-3`
    hands argparse's `--data` both, since it takes every word up to the next flag."""
    items = items or []
    return [i for i in items if not OVERRIDE.fullmatch(i)], [i for i in items if OVERRIDE.fullmatch(i)]


def stage_config(args, values: dict, what: str):
    """The config of a stage that starts from a base run (`args.stage`, read by `babyllama dpo`,
    `instruct`, ...): with --resume the saved one, the command's `values` checked against it
    (the run must be of this stage); else the base's config with `values` applied. `what`
    names the base a new run needs ("the chat run")."""
    from pathlib import Path

    from babyllama.run import Run
    from babyllama.train.sft import sft_config

    if args.resume:
        stage = Run(args.out).config().stage
        if stage != args.stage:
            raise UserError(f"{args.out}: is a {stage} run; resume it with `babyllama {stage}`")
        if args.base:
            values["sft"]["base"] = str(Path(args.base).resolve())
        return resume_config(args, values)
    if not args.base:
        raise UserError(f"pass --base RUN ({what} to start {args.stage} from)")
    return sft_config(args.base, values, stage=args.stage)
