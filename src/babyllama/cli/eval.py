"""`babyllama eval`: score a run on one task; the table is printed and kept under RUN/eval/."""

from __future__ import annotations

import argparse

from babyllama.cli.decoding import add_sampling_args, sampling_kwargs


def add_parser(subparsers) -> None:
    # The task names come with the tasks' result module, which reaches torch: import on use.
    from babyllama.eval.tasks import TASKS

    ev = subparsers.add_parser("eval", help="score a run: lm (perplexity, bits/char), rouge, choice "
                                            "(C-Eval/CMMLU), generation (distinct-n, loop rate), math "
                                            "(final-answer accuracy, pass@k), vqa (answers about images), "
                                            "sentiment (好评/差评 accuracy, polarity of written reviews)",
                               description="Evaluate a run directory (base, SFT or LoRA) on one task; the "
                                           "table is printed and written to RUN/eval/NAME.md and .json.")
    ev.add_argument("run", help="a run directory (or a transformers Llama directory)")
    ev.add_argument("--task", required=True, choices=TASKS)
    ev.add_argument("--data", required=True,
                    help="lm: text/jsonl/folder or a prepared dataset; rouge: tsv/csv/jsonl/LCSTS; "
                         "choice: a C-Eval/CMMLU folder or jsonl; generation: prompts (txt/jsonl); "
                         "math: problems with answers (jsonl: Ape210K, GSM8K, {question, answer}) or "
                         "builtin:arith-zh#test; vqa: LLaVA-style .json/.jsonl conversations about "
                         "images or builtin:shapes-zh#test; sentiment: builtin:reviews-zh#test")
    ev.add_argument("--limit", type=int, default=None,
                    help="quick run: first N documents / examples / prompts (choice: per subject)")
    ev.add_argument("--batch-size", type=int, default=None, help="prompts or rows per batch "
                                                                  "(default: the task's)")
    ev.add_argument("--name", help="result file name under RUN/eval/ (default: TASK-DATANAME)")
    ev.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                    help="prompt through the chat template (default: yes for SFT runs)")
    ev.add_argument("--split", help="lm: split of a prepared dataset (val); choice: test/val/dev "
                                    "(default: test when it has answers, else val)")
    ev.add_argument("--text-field", default="text", help="lm: field holding the text in jsonl/csv")
    ev.add_argument("--stride", type=int, default=None,
                    help="lm: new tokens per window for long documents (default: the context)")
    ev.add_argument("--shots", type=int, default=0, help="choice: examples from the dev split")
    ev.add_argument("--subject", action="append", help="choice: only this subject (repeatable)")
    ev.add_argument("--shots-file", help="choice: examples for a jsonl exam")
    ev.add_argument("--template", help="rouge: the prompt, with {text} where the source goes; "
                                       "math: with {question}")
    ev.add_argument("--k", type=int, default=1, help="math: pass@k (k > 1 needs sampling: --temperature)")
    ev.add_argument("--samples", type=int, default=None,
                    help="math: answers sampled per problem for pass@k (default k); sentiment: reviews "
                         "written per topic and polarity (default 4)")
    ev.add_argument("--rouge-level", default="char", choices=["char", "word"],
                    help="rouge: characters, or jieba words")
    ev.add_argument("--source-field", help="rouge: field/column of the text to summarize")
    ev.add_argument("--target-field", help="rouge: field/column of the reference summary")
    ev.add_argument("--prompt-field", default="prompt", help="generation: field holding the prompt")
    ev.add_argument("--images", metavar="DIR",
                    help="vqa: the folder the data's image paths are relative to (default: the data file's)")
    ev.add_argument("--shuffle-images", action="store_true",
                    help="vqa: also answer with every picture moved to another question (a baseline: "
                         "what the model gets right without the image)")
    add_sampling_args(ev, None)  # each task's own defaults
    ev.set_defaults(func=cmd_eval)


def eval_options(args, chat: bool):
    """The task's options from the command line (validated before the model loads)."""
    from babyllama.eval.tasks import task_options

    spec: dict = {"task": args.task, "data": args.data, "limit": args.limit}
    if args.batch_size is not None:
        spec["batch_size"] = args.batch_size
    if args.task == "lm":
        spec.update(text_field=args.text_field, split=args.split or "val", stride=args.stride)
    elif args.task == "choice":
        spec.update(split=args.split, shots=args.shots, subjects=args.subject or None,
                    shots_file=args.shots_file)
    else:
        spec["generation"] = sampling_kwargs(args)
        if args.task == "rouge":
            spec.update(level=args.rouge_level, source_field=args.source_field,
                        target_field=args.target_field)
            if args.template:
                spec["template"] = args.template.replace("\\n", "\n")
        elif args.task == "vqa":
            spec.update(images=args.images, shuffle_images=args.shuffle_images)
        elif args.task == "math":
            spec.update(k=args.k, samples=args.samples)
            if args.template:
                spec["template"] = args.template.replace("\\n", "\n")
        elif args.task == "sentiment":  # the decoding flags set the written reviews' sampling
            if args.samples is not None:
                spec["writes_per_prompt"] = args.samples
        else:
            spec.update(prompt_field=args.prompt_field)
    return task_options(spec, "command line", chat=chat)  # (lm has no chat setting)


def cmd_eval(args) -> None:
    from babyllama.errors import UserError
    from babyllama.eval.report import write_result
    from babyllama.eval.tasks import run_task
    from babyllama.llm import load
    from babyllama.run import Run

    if args.task == "vqa" and (Run(args.run).require_exists() or not Run(args.run).is_vision()):
        raise UserError(f"{args.run}: the vqa task needs an image-text run (stage align or instruct); "
                        f"this one reads no images")
    chat = Run(args.run).chats() if args.chat is None else args.chat
    task, options = eval_options(args, chat)
    llm = load(args.run, device=args.device)
    result = run_task(task, llm.model, llm.tokenizer, options)
    path = write_result(result, args.run, args.name)
    print(result.table())
    if result.settings.get("skipped"):
        print(f"skipped: {result.settings['skipped']}")
    print(f"-> {path} (numbers: {path.with_suffix('.json').name}"
          + (f", every example: {path.stem}.examples.jsonl)" if result.examples else ")"))
