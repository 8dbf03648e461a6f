"""`babyllama`: one entry point, one subcommand per stage.

Each command is a module here whose `add_parser(subparsers)` registers its flags next to its
handler; COMMANDS orders them as `babyllama --help` lists them. Shared flag groups: sources.py
(text sources), decoding.py (generation settings), runs.py (a training run's directory,
--resume and KEY=VALUE overrides). The modules import torch and the rest only inside their
handlers, so building the parser stays cheap.

A user mistake (`UserError`) prints one line, `error: <file:line: problem>`, and exits 2.
"""

from __future__ import annotations

import argparse
import sys

from babyllama.cli import (chat, clean, demo, export, generate, import_, merge_lora, model, preference,
                           prepare, pretrain, serve, sft, tokenizer, vision)
from babyllama.cli import eval as eval_  # the module; plain `eval` would hide the builtin here
from babyllama.cli.chat import read_document  # noqa: F401  (importable as before the split)
from babyllama.errors import UserError

COMMANDS = (tokenizer, clean, prepare, pretrain, generate, sft, preference, vision, chat, serve, eval_,
            merge_lora, export, import_, model, demo)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="babyllama", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse gives a `KEY=VALUE...` positional only one run of words; overrides that come
    # after a later flag (`... train.lr=1e-3 --lora lora.r=16`) arrive here and are theirs.
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        # A path the system cannot write or read where the user pointed (-o under a file, a
        # folder in /proc): one line naming it, as for the errors we check ourselves.
        if e.filename is None:
            raise
        print(f"error: {e.filename}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
