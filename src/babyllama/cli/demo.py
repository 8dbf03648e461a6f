"""`babyllama demo`: tokenizer -> prepare -> pretrain -> samples on the built-in corpora."""

from __future__ import annotations

from pathlib import Path


def add_parser(subparsers) -> None:
    de = subparsers.add_parser("demo", help="tokenizer -> prepare -> pretrain -> samples on the built-in corpora")
    de.add_argument("-o", "--out", default="runs/demo")
    de.add_argument("--minutes", type=float, default=10.0, help="training time budget")
    de.add_argument("--steps", type=int, default=0, help="exact number of training steps (overrides --minutes)")
    de.set_defaults(func=cmd_demo)


def cmd_demo(args) -> None:
    from babyllama.demo import run_demo

    run_demo(Path(args.out), minutes=args.minutes, steps=args.steps)
