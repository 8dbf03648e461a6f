"""What every training stage (pretrain, sft) takes: its run directory, --resume and config
overrides, and the saved config a resumed run continues with."""

from __future__ import annotations

import argparse


def add_run_args(p: argparse.ArgumentParser) -> None:
    """What every training stage takes: its run directory, --resume and config overrides."""
    p.add_argument("-o", "--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")


def resume_config(args):
    """The saved config of the run in --out, with the few overrides that may change on resume
    (`config.RESUME_KEYS`)."""
    from babyllama import config
    from babyllama.run import Run

    return config.resume_config(Run(args.out).config(), args.overrides, args.out)
