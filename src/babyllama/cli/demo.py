"""`babyllama demo`: tokenizer -> prepare -> pretrain -> SFT -> skill check -> chat on the built-in corpora."""

from __future__ import annotations

from pathlib import Path


def add_parser(subparsers) -> None:
    de = subparsers.add_parser("demo", help="tokenizer -> prepare -> pretrain -> SFT -> skill check -> chat "
                                            "on the built-in corpora")
    de.add_argument("-o", "--out", default="runs/demo")
    # The default lives in babyllama.demo (MINUTES): importing it here would import torch for --help.
    de.add_argument("--minutes", type=float, default=None,
                    help="training time budget, shared by pretraining (3/4) and SFT (1/4); default 9. "
                         "The tokenizer, data preparation and checks come on top")
    de.add_argument("--steps", type=int, default=0,
                    help="cap each training stage at N steps (a quick check; 0, the default: no cap)")
    de.set_defaults(func=cmd_demo)


def cmd_demo(args) -> None:
    from babyllama.demo import run_demo
    from babyllama.errors import UserError

    if args.minutes is not None and not 0 < args.minutes < float("inf"):
        raise UserError(f"--minutes must be a positive number, got {args.minutes:g}")
    if args.steps < 0:
        raise UserError(f"--steps must not be negative, got {args.steps}")
    run_demo(Path(args.out), steps=args.steps, **({"minutes": args.minutes} if args.minutes else {}))
