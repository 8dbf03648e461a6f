"""The decoding flags shared by generate, chat and eval, and the keyword arguments they become."""

from __future__ import annotations

import argparse


def add_sampling_args(p: argparse.ArgumentParser, kind: str | None = "plain", truncate: bool = True) -> None:
    """The decoding flags, their defaults the `kind` row of the one decoding-defaults table
    (`babyllama.infer.config.DECODING_DEFAULTS`); `kind=None` leaves every flag unset so the
    command's own row applies (eval: each task's). `truncate=False` leaves out --truncate-left:
    chat fits its history to the context itself (oldest turns first), and cutting its token
    prompt from the left would cut the template."""
    from babyllama.infer.config import decoding_defaults

    d = decoding_defaults(kind) if kind else None

    def default(name):
        return getattr(d, name) if d else None

    def shown(note: str = "") -> str:
        # The default is the table's row; eval's is each task's own.
        said = "default: %(default)s" if d else "default: the task's"
        return f"{note}; {said}" if note else said

    g = p.add_argument_group(f"decoding (transformers' GenerationConfig semantics; defaults: the "
                             f"{kind + ' row' if kind else 'task rows'} of DECODING_DEFAULTS)")
    g.add_argument("--max-new-tokens", type=int, default=default("max_new_tokens"), help=shown())
    g.add_argument("--temperature", type=float, default=default("temperature"), help=shown("0 = greedy"))
    g.add_argument("--top-k", type=int, default=default("top_k"), help=shown("0 = off"))
    g.add_argument("--top-p", type=float, default=default("top_p"), help=shown("1 = off"))
    g.add_argument("--min-p", type=float, default=default("min_p"), help=shown("0 = off"))
    g.add_argument("--repetition-penalty", type=float, default=default("repetition_penalty"),
                   help=shown("1 = off"))
    g.add_argument("--frequency-penalty", type=float, default=default("frequency_penalty"), help=shown())
    g.add_argument("--presence-penalty", type=float, default=default("presence_penalty"), help=shown())
    g.add_argument("--no-repeat-ngram-size", type=int, default=default("no_repeat_ngram_size"),
                   help=shown("0 = off"))
    g.add_argument("--num-beams", type=int, default=default("num_beams"), help=shown("> 1: beam search"))
    g.add_argument("--length-penalty", type=float, default=default("length_penalty"),
                   help=shown("beam search"))
    g.add_argument("--stop", action="append", metavar="TEXT",
                   help="stop string (may be repeated); a control token's text such as '<|im_end|>' "
                        "stops at that token")
    g.add_argument("--stop-token-id", action="append", type=int, metavar="ID",
                   help="stop when this token id is generated (may be repeated)")
    if truncate:
        g.add_argument("--truncate-left", action="store_true",
                       help="a prompt that leaves no room for a new token loses its oldest tokens "
                            "(keeping room for --max-new-tokens, at least half the context) instead "
                            "of stopping with an error; a prompt that fits is never cut")
    g.add_argument("--seed", type=int, default=default("seed"))
    p.add_argument("--device", default="auto")


def sampling_kwargs(args) -> dict:
    """The decoding flags as GenerationConfig fields; unset ones (None) are left out."""
    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                    frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty,
                    no_repeat_ngram_size=args.no_repeat_ngram_size, num_beams=args.num_beams,
                    length_penalty=args.length_penalty, stop=tuple(args.stop or ()),
                    stop_token_ids=tuple(args.stop_token_id or ()), seed=args.seed,
                    truncate="left" if getattr(args, "truncate_left", False) else "error")
    return {k: v for k, v in settings.items() if v is not None}
