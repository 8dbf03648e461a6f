"""`babyllama generate`: continue prompts with a trained model, streamed or as one batch."""

from __future__ import annotations

import sys

from babyllama.cli.decoding import add_sampling_args, sampling_kwargs


def add_parser(subparsers) -> None:
    ge = subparsers.add_parser("generate", help="continue a prompt with a trained model")
    ge.add_argument("run", help="a run directory (or a transformers Llama directory)")
    ge.add_argument("--prompt", action="append", required=True, help="may be repeated")
    ge.add_argument("--num-return-sequences", type=int, default=1, help="continuations per prompt")
    add_sampling_args(ge)
    ge.set_defaults(func=cmd_generate)


def cmd_generate(args) -> None:
    from babyllama.llm import load

    llm = load(args.run, device=args.device)
    kwargs = sampling_kwargs(args)
    n = args.num_return_sequences
    if len(args.prompt) > 1 or n > 1:
        # Several prompts (or samples) go through the engine as one batch, printed when done.
        results = llm.generate(args.prompt, num_return_sequences=n, **kwargs)
        for prompt, texts in zip(args.prompt, results):
            for i, text in enumerate(texts if n > 1 else [texts]):
                print(f"[{i + 1}] {prompt}{text}" if n > 1 else f"{prompt}{text}")
        return
    for prompt in args.prompt:
        pieces = llm.stream(prompt, num_return_sequences=n, **kwargs)  # n < 1 is refused there
        first = next(pieces, "")  # bad settings or a too-long prompt fail before anything is shown
        sys.stdout.write(prompt + first)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
