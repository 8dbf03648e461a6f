"""`babyllama chat`: talk with a fine-tuned model turn by turn, or answer one message (--prompt,
or the message after RUN); an image-text run answers about pictures (--image FILE, /image FILE)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from babyllama.cli.decoding import add_sampling_args, sampling_kwargs
from babyllama.errors import UserError
from babyllama.textfile import read_text

CHAT_HELP = """commands: /reset (forget the conversation and its pictures), /system TEXT (set the
system prompt), /doc FILE (answer about a reference document; /doc alone clears it), /image FILE
(ask your next message about a picture, with an image-text run; /image alone drops it),
/adapter NAME|base (switch LoRA adapter), /quit"""


def add_parser(subparsers) -> None:
    ch = subparsers.add_parser("chat", help="talk with a fine-tuned model, turn by turn")
    ch.add_argument("run", nargs="?", help="a run directory (or a transformers Llama directory); or --server")
    ch.add_argument("--server", metavar="URL",
                    help="talk to a running `babyllama serve` (or any OpenAI-compatible server) instead")
    ch.add_argument("--model", help="with --server: the model id to use (an adapter's name; default: the server's)")
    ch.add_argument("--api-key", default=os.environ.get("BABYLLAMA_API_KEY"),
                    help="with --server: its API key (default: $BABYLLAMA_API_KEY)")
    ch.add_argument("message", nargs="?", help="answer this one message and exit (as --prompt)")
    ch.add_argument("--prompt", help="answer this one message and exit (for scripts)")
    # `--image FILE "question"` reads as written: argparse takes no positional after a flag.
    ch.add_argument("--image", nargs="+", action=ImageArgs, metavar=("FILE", "MESSAGE"),
                    help="a picture the (first) message is about, optionally followed by that message "
                         "(answered, then exit): an image-text run (`babyllama align`, then `instruct`) "
                         "reads it; the picture stays in the conversation")
    ch.add_argument("--system", help="system prompt")
    ch.add_argument("--doc", help="a reference document (text file) to answer about (a 资料 passage, as grounded-dialogue data has)")
    ch.add_argument("--adapter", action="append", metavar="[NAME=]DIR",
                    help="load a LoRA run's adapter onto RUN (the base); repeat for several, the "
                         "last is active; switch with /adapter NAME")
    add_sampling_args(ch, "chat", truncate=False)
    ch.set_defaults(func=cmd_chat, image_message=None)


def cmd_chat(args) -> None:
    if args.run is None and args.image_message is not None and not args.server:
        # `chat --image FILE RUN`: the word after the file is the run, not a message.
        args.run, args.image_message = args.image_message, None
    if args.server:
        if args.run or args.adapter:
            raise UserError("give a run directory or --server URL, not both (the server has its model "
                            "and adapters: pick one with --model)")
        from babyllama.serve.client import RemoteChat

        llm = None
        session = RemoteChat(args.server, model=args.model, api_key=args.api_key, system=args.system)
    elif args.run is None:
        raise UserError("give a run directory to chat with, or --server URL")
    elif args.model:
        raise UserError("--model picks a model on a --server; with a run directory use --adapter")
    else:
        llm, session = local_session(args)
    given = [m for m in (args.message, args.image_message, args.prompt) if m is not None]
    if len(given) > 1:
        raise UserError("give the message once: after the run directory, after --image FILE, or as --prompt")
    prompt = given[0] if given else None
    if args.doc:
        session.document = read_document(args.doc)
    kwargs = sampling_kwargs(args)
    image = None  # the picture the next message is about (what session.send takes as image=)
    if args.image:
        image, note = attach_image(llm, args.image, args.run)
        print(note, file=sys.stderr if prompt is not None else sys.stdout)
    if prompt is not None:
        for piece in session.send(prompt, **kwargs, **({"image": image} if image is not None else {})):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    print(f"chatting with {args.run or args.server}. {CHAT_HELP}")
    while True:
        try:
            line = input("\n你> ").strip()
        except EOFError:
            print()
            return
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, rest = line.partition(" ")
            if cmd in ("/quit", "/exit"):
                return
            elif cmd == "/reset":
                session.reset()
                image = None
                print("(conversation cleared)")
            elif cmd == "/image":
                if not rest.strip():
                    print("(image dropped)" if image is not None else "(no image to drop)")
                    image = None
                    continue
                try:
                    image, note = attach_image(llm, rest.strip(), args.run)
                except UserError as e:
                    print(f"error: {e}")
                    continue
                print(note)
            elif cmd == "/system":
                session.system = rest.strip() or None
                print(f"(system prompt {'set' if session.system else 'cleared'})")
            elif cmd == "/doc":
                try:
                    session.document = read_document(rest.strip()) if rest.strip() else None
                except UserError as e:
                    print(f"error: {e}")
                    continue
                print(f"(document {'loaded: ' + str(len(session.document)) + ' characters' if session.document else 'cleared'})")
            elif cmd == "/adapter" and rest.strip() and llm is None:
                session.model = None if rest.strip() == "base" else rest.strip()
                print(f"(now using {session.model or 'the served model'})")
            elif cmd == "/adapter" and rest.strip():
                try:
                    llm.use_adapter(None if rest.strip() == "base" else rest.strip())
                except UserError as e:
                    print(f"error: {e}")
                    continue
                print(f"(now using {llm.adapter or 'the base model'})")
            else:
                if cmd != "/help":
                    print(f"(unknown command {cmd})")
                print(CHAT_HELP)
            continue
        sys.stdout.write("助手> ")
        try:
            for piece in session.send(line, **kwargs, **({"image": image} if image is not None else {})):
                sys.stdout.write(piece)
                sys.stdout.flush()
            image = None  # it is in the conversation now
        except UserError as e:  # e.g. a message too long for the context: say so, keep chatting
            sys.stdout.write(f"(error: {e})")
        sys.stdout.write("\n")


def local_session(args):
    """The model of `args.run` (with its --adapter runs) and a chat session with it."""
    from babyllama.llm import load
    from babyllama.run import Run

    llm = load(args.run, device=args.device)
    if not args.adapter and not Run(args.run).chats():
        print(f"note: {args.run} is not a chat model (no SFT, no chat template in a transformers "
              "directory): it continues the rendered prompt as text; `babyllama sft` makes one that "
              "answers", file=sys.stderr)
    for spec in args.adapter or []:
        name, sep, path = spec.partition("=")
        llm.add_adapter(path if sep else spec, name if sep else None)
    return llm, llm.chat_session(system=args.system)


class ImageArgs(argparse.Action):
    """`--image FILE [MESSAGE]`: the file in `image`, the message (if any) in `image_message`."""

    def __call__(self, parser, namespace, values, option_string=None):
        if len(values) > 2:
            parser.error(f"{option_string} takes FILE and at most one MESSAGE (quote a message with spaces), "
                         f"got {len(values)} words")
        namespace.image = values[0]
        namespace.image_message = values[1] if len(values) == 2 else None


def attach_image(llm, path: str, run: str | None) -> tuple[object, str]:
    """(the picture at `path` as `session.send(image=)` takes it, a one-line confirmation):
    pixel values for a local image-text model (`llm`), a data URL for a server (`llm` None; the
    file is checked here, so a broken one is named before anything is sent). Raises UserError
    for a text model, a missing or unreadable image."""
    from babyllama.data.images import open_image

    if llm is None:
        from babyllama.llm import image_data_url

        width, height = open_image(Path(path)).size
        return image_data_url(path), f"(image: {path}, {width}x{height}; it goes with your next message)"
    if not llm.is_vision:
        raise UserError(f"{run} is a text model: it reads no images (--image and /image need an image-text "
                        f"run: `babyllama align`, then `babyllama instruct`)")
    from babyllama.infer.images import image_positions

    picture = open_image(Path(path))
    pixels = llm.image_pixels(picture)
    side = pixels.shape[-1]
    return pixels, (f"(image: {path}, {picture.width}x{picture.height} → {side}x{side}, "
                    f"{image_positions(llm.model)} positions; it goes with your next message)")


def read_document(path: str) -> str:
    """A reference document for chat (`--doc`, `/doc`): the file's text, BOM and surrounding
    whitespace removed."""
    text = read_text(path).strip()
    if not text:
        raise UserError(f"{path}: the document is empty")
    return text
