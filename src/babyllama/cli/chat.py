"""`babyllama chat`: talk with a fine-tuned model turn by turn, or answer one message (--prompt)."""

from __future__ import annotations

import os
import sys

from babyllama.cli.decoding import add_sampling_args, sampling_kwargs
from babyllama.errors import UserError
from babyllama.textfile import read_text

CHAT_HELP = """commands: /reset (forget the conversation), /system TEXT (set the system prompt),
/doc FILE (answer about a reference document; /doc alone clears it), /adapter NAME|base
(switch LoRA adapter), /quit"""


def add_parser(subparsers) -> None:
    ch = subparsers.add_parser("chat", help="talk with a fine-tuned model, turn by turn")
    ch.add_argument("run", nargs="?", help="a run directory (or a transformers Llama directory); or --server")
    ch.add_argument("--server", metavar="URL",
                    help="talk to a running `babyllama serve` (or any OpenAI-compatible server) instead")
    ch.add_argument("--model", help="with --server: the model id to use (an adapter's name; default: the server's)")
    ch.add_argument("--api-key", default=os.environ.get("BABYLLAMA_API_KEY"),
                    help="with --server: its API key (default: $BABYLLAMA_API_KEY)")
    ch.add_argument("--prompt", help="answer this one message and exit (for scripts)")
    ch.add_argument("--system", help="system prompt")
    ch.add_argument("--doc", help="a reference document (text file) to answer about (a 资料 passage, as grounded-dialogue data has)")
    ch.add_argument("--adapter", action="append", metavar="[NAME=]DIR",
                    help="load a LoRA run's adapter onto RUN (the base); repeat for several, the "
                         "last is active; switch with /adapter NAME")
    add_sampling_args(ch, "chat", truncate=False)
    ch.set_defaults(func=cmd_chat)


def cmd_chat(args) -> None:
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
    if args.doc:
        session.document = read_document(args.doc)
    kwargs = sampling_kwargs(args)
    if args.prompt is not None:
        for piece in session.send(args.prompt, **kwargs):
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
                print("(conversation cleared)")
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
            for piece in session.send(line, **kwargs):
                sys.stdout.write(piece)
                sys.stdout.flush()
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


def read_document(path: str) -> str:
    """A reference document for chat (`--doc`, `/doc`): the file's text, BOM and surrounding
    whitespace removed."""
    text = read_text(path).strip()
    if not text:
        raise UserError(f"{path}: the document is empty")
    return text
