"""`babyllama`: one entry point, one subcommand per stage.

A user mistake (`UserError`) prints one line, `error: <file:line: problem>`, and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from babyllama.errors import UserError
from babyllama.infer.config import CHAT_DEFAULTS
from babyllama.textfile import read_text

SOURCES_HELP = ("text sources: .txt (a document per line), .jsonl/.json, .parquet, .csv, a directory "
                "of those, or builtin:peoples-daily / builtin:reviews")


def vocab_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size or sizes like 4000,8000") from None
    if not sizes:
        raise argparse.ArgumentTypeError("expected at least one size")
    return sizes


def add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="+", metavar="SOURCE", help=SOURCES_HELP)
    p.add_argument("--text-field", default="text", help="field/column holding the text (default: text)")
    p.add_argument("--skip-bad-records", action="store_true",
                   help="skip and count malformed records instead of stopping at the first")


def cmd_tokenizer_train(args) -> None:
    from babyllama.data.readers import BadRecords, iter_documents
    from babyllama.tokenizer import train_tokenizer

    bad = BadRecords()
    texts = (doc for src in args.sources
             for doc in iter_documents(src, text_field=args.text_field, skip_bad=args.skip_bad_records, bad=bad))
    if args.max_documents:
        import itertools

        texts = itertools.islice(texts, args.max_documents)
    kwargs = {"pretokenizer": args.pretokenizer} if args.pretokenizer else {}
    if len(args.vocab_size) > 1:
        return _tokenizer_sweep(args, kwargs)
    tok = train_tokenizer(texts, args.vocab_size[0], **kwargs)
    tok.save(args.out)
    if bad.count:
        print(bad.summary())
    print(f"tokenizer: {tok.vocab_size:,} tokens (bos {tok.bos_id}, eos {tok.eos_id}, pad {tok.pad_id}) "
          f"-> {args.out}")


def _source_texts(args):
    """A factory of fresh document iterators over the command's sources."""
    import itertools

    from babyllama.data.readers import iter_sources

    def texts():
        docs = iter_sources(args.sources, text_field=args.text_field, skip_bad=args.skip_bad_records)
        return itertools.islice(docs, args.max_documents) if getattr(args, "max_documents", 0) else docs
    return texts


def _tokenizer_sweep(args, kwargs) -> None:
    from babyllama.tokenizer.report import held_out_split, sweep_table, sweep_vocab_sizes

    train_texts, held_out = held_out_split(_source_texts(args))
    reports = sweep_vocab_sizes(train_texts, args.vocab_size, held_out, preset=args.preset,
                                save_dir=args.out, **kwargs)
    print(sweep_table(reports))
    print(f"-> {args.out}/vocab-<size> (one tokenizer per size)")


def cmd_tokenizer_trim(args) -> None:
    from babyllama.tokenizer.trim import read_retain_file, trim_sentencepiece

    retain = read_retain_file(args.retain) if args.retain else ()
    result = trim_sentencepiece(args.tokenizer, _source_texts(args)(), keep_cjk=not args.no_keep_cjk,
                                retain=retain)
    result.save(args.out)
    print(result.summary())
    print(f"-> {args.out} (tokenizer.model, tokenizer_config.json, id_map.json)")


def cmd_tokenizer_report(args) -> None:
    from babyllama.atomic import atomic_write_text
    from babyllama.tokenizer.report import tokenizer_report

    report = tokenizer_report(args.tokenizer, _source_texts(args)(), preset=args.preset,
                              name=args.tokenizer, progress=True)
    print(report.table())
    if args.json:
        atomic_write_text(args.json, json.dumps(report.to_dict(), ensure_ascii=False, indent=2) + "\n")


def cmd_clean(args) -> None:
    from babyllama.data.clean import CleanConfig, clean

    cfg = CleanConfig(
        normalize=args.normalize, simplify=not args.no_simplify, html=not args.no_html,
        mask=args.mask_pii, min_chars=args.min_chars, max_chars=args.max_chars,
        min_chinese_ratio=args.min_chinese_ratio, max_repeated_line_ratio=args.max_repeated_line_ratio,
        max_junk_ratio=args.max_junk_ratio, exact_dedup=not args.no_dedup,
        near_dedup=not (args.no_dedup or args.no_near_dedup), num_perm=args.num_perm,
        bands=args.bands, ngram=args.ngram, near_jaccard=args.near_jaccard, shard_mb=args.shard_mb, workers=args.workers,
        text_field=args.text_field)
    report = clean(args.inputs, args.out, cfg)
    out = Path(args.out)
    md = read_text(out / "_report.md")
    print(md.split("## Examples removed")[0].rstrip())
    print(f"-> {out} ({', '.join(report['shards'])}; _report.md, _report.json with examples)")


def cmd_prepare(args) -> None:
    from babyllama.data.shards import prepare
    from babyllama.tokenizer import Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    meta = prepare(args.sources, tok, args.out, val_fraction=args.val_fraction, workers=args.workers,
                   text_field=args.text_field, skip_bad=args.skip_bad_records)
    print_prepare_summary(meta, args.out)


def print_prepare_summary(meta: dict, out) -> None:
    parts = [f"{name}: {s['n_tokens']:,} tokens in {s['n_documents']:,} documents"
             for name, s in meta["splits"].items()]
    print(f"prepared -> {out} ({meta['dtype']})  " + "; ".join(parts))
    if meta["bad_records"]["count"]:
        print(meta["bad_records"]["summary"])


def resume_config(args):
    """The saved config of the run in --out, with the few overrides that may change on resume."""
    from babyllama.config import apply_values, parse_overrides, read_run_config

    cfg = read_run_config(Path(args.out))
    if args.overrides:
        values = parse_overrides(args.overrides)
        allowed = {"train": {"max_steps", "eval_every", "sample_every", "save_every", "log_every",
                             "device"}}
        for section, keys in values.items():
            bad = set(keys) - allowed.get(section, set()) if isinstance(keys, dict) else {section}
            if bad:
                raise UserError(f"command line: {section}.{sorted(bad)[0]} cannot change when "
                                "resuming (only train.max_steps and logging intervals can)")
        apply_values(cfg, values)
    # The run may have moved, or be resumed from another directory: trust the paths given now.
    cfg.out_dir = args.out
    return cfg


def build_config(args):
    from babyllama.config import check, load_config

    if args.resume:
        cfg = resume_config(args)
        if args.data:
            cfg.data = args.data
        if args.tokenizer:
            cfg.tokenizer = args.tokenizer
        check(cfg)
        return cfg
    cfg = load_config(args.preset or args.config, args.overrides)
    if args.data:
        cfg.data = args.data
    if args.tokenizer:
        cfg.tokenizer = args.tokenizer
    cfg.out_dir = args.out
    return cfg


def cmd_pretrain(args) -> None:
    from babyllama.train.pretrain import run_pretrain

    cfg = build_config(args)
    run_dir = run_pretrain(cfg, resume=args.resume)
    print(f"run directory: {run_dir}  (model.safetensors, metrics.jsonl, loss.png, samples.txt)")


def cmd_sft(args) -> None:
    from babyllama.config import parse_overrides
    from babyllama.train.sft import given_train_keys, run_sft, sft_config

    if args.resume:
        cfg = resume_config(args)
        if cfg.stage != "sft":
            raise UserError(f"{args.out}: is a {cfg.stage} run; resume it with `babyllama {cfg.stage}`")
        given = set()
    else:
        if not args.base:
            raise UserError("pass --base RUN (the pretrained run to fine-tune)")
        values = parse_overrides(args.overrides)
        sft = values.setdefault("sft", {})
        if not isinstance(sft, dict):
            raise UserError("command line: sft must be a mapping of settings")
        if args.data:
            sft["sources"] = args.data
        for key in ("format", "template", "system_prompt", "loss_on", "mode"):
            if getattr(args, key, None) is not None:
                sft[key] = getattr(args, key)
        if args.skip_bad_records:
            sft["skip_bad_records"] = True
        if args.lora or args.qlora:
            lora = values.setdefault("lora", {})
            if not isinstance(lora, dict):
                raise UserError("command line: lora must be a mapping of settings")
            lora["enabled"] = True
            if args.qlora:
                lora["qlora"] = True
        cfg = sft_config(args.base, values)
        cfg.out_dir = args.out
        given = given_train_keys(values)
    run_dir = run_sft(cfg, resume=args.resume, given=given)
    from babyllama.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    weights = f"{ADAPTER_CONFIG}, {ADAPTER_WEIGHTS}" if cfg.lora.enabled else "model.safetensors"
    print(f"run directory: {run_dir}  ({weights}, metrics.jsonl, loss.png, samples.txt)")
    print(f"talk to it:    babyllama chat {run_dir}")


def add_run_args(p: argparse.ArgumentParser) -> None:
    """What every training stage takes: its run directory, --resume and config overrides."""
    p.add_argument("-o", "--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")


def sampling_kwargs(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty,
                no_repeat_ngram_size=args.no_repeat_ngram_size, num_beams=args.num_beams,
                length_penalty=args.length_penalty, stop=tuple(args.stop or ()),
                stop_token_ids=tuple(args.stop_token_id or ()), seed=args.seed,
                truncate="left" if getattr(args, "truncate_left", False) else "error")


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int = 100, temperature: float = 0.8,
                      top_k: int = 0, repetition_penalty: float = 1.0, truncate: bool = True) -> None:
    """The decoding flags. `truncate=False` leaves out --truncate-left: chat fits its history
    to the context itself (oldest turns first), and cutting its token prompt from the left
    would cut the template."""
    g = p.add_argument_group("decoding (transformers' GenerationConfig semantics)")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    g.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=top_k, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    g.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    g.add_argument("--repetition-penalty", type=float, default=repetition_penalty, help="1 = off")
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--no-repeat-ngram-size", type=int, default=0, help="0 = off")
    g.add_argument("--num-beams", type=int, default=1, help="> 1: beam search")
    g.add_argument("--length-penalty", type=float, default=1.0, help="beam search")
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
    g.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto")


CHAT_HELP = """commands: /reset (forget the conversation), /system TEXT (set the system prompt),
/doc FILE (answer about a reference document; /doc alone clears it), /adapter NAME|base
(switch LoRA adapter), /quit"""


def cmd_chat(args) -> None:
    from babyllama.llm import load

    llm = load(args.run, device=args.device)
    for spec in args.adapter or []:
        name, sep, path = spec.partition("=")
        llm.add_adapter(path if sep else spec, name if sep else None)
    session = llm.chat_session(system=args.system)
    if args.doc:
        session.document = read_document(args.doc)
    kwargs = sampling_kwargs(args)
    if args.prompt is not None:
        for piece in session.send(args.prompt, **kwargs):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    print(f"chatting with {args.run}. {CHAT_HELP}")
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
            elif cmd == "/adapter" and rest.strip():
                try:
                    llm.use_adapter(None if rest.strip() == "base" else rest.strip())
                except UserError as e:
                    print(f"error: {e}")
                    continue
                print(f"(now using {llm.adapter or 'the base model'})")
            else:
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


def read_document(path: str) -> str:
    """A reference document for chat (`--doc`, `/doc`): the file's text, BOM and surrounding
    whitespace removed."""
    text = read_text(path).strip()
    if not text:
        raise UserError(f"{path}: the document is empty")
    return text


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
        settings = {k: v for k, v in sampling_kwargs(args).items() if v is not None}
        spec["generation"] = settings
        if args.task == "rouge":
            spec.update(level=args.rouge_level, source_field=args.source_field,
                        target_field=args.target_field)
            if args.template:
                spec["template"] = args.template.replace("\\n", "\n")
        else:
            spec.update(prompt_field=args.prompt_field)
    return task_options(spec, "command line", chat=chat)  # (lm has no chat setting)


def cmd_eval(args) -> None:
    from babyllama.eval.prompting import run_uses_chat
    from babyllama.eval.report import write_result
    from babyllama.eval.tasks import run_task
    from babyllama.llm import load

    chat = run_uses_chat(args.run) if args.chat is None else args.chat
    task, options = eval_options(args, chat)
    llm = load(args.run, device=args.device)
    result = run_task(task, llm.model, llm.tokenizer, options)
    path = write_result(result, args.run, args.name)
    print(result.table())
    print(f"-> {path} (numbers: {path.with_suffix('.json').name}"
          + (f", every example: {path.stem}.examples.jsonl)" if result.examples else ")"))


def cmd_merge_lora(args) -> None:
    from babyllama.config import read_run_config, save_config
    from babyllama.llm import load_model
    from babyllama.tokenizer import Tokenizer
    from babyllama.train.checkpoint import save_weights

    run, out = Path(args.run), Path(args.out)
    if not (run / "adapter_model.safetensors").exists():
        raise UserError(f"{run}: no adapter_model.safetensors (not a LoRA run)")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: exists and is not empty; choose another -o")
    cfg = read_run_config(run)
    model = load_model(run, cfg.model)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out / "model.safetensors")
    Tokenizer.load(run / "tokenizer").save(out / "tokenizer")
    cfg.lora.enabled = cfg.lora.qlora = False  # a plain run now
    cfg.out_dir = str(out)
    save_config(cfg, out / "config.yaml")
    print(f"merged {run} into its base {cfg.sft.base} -> {out} (model.safetensors, tokenizer/, config.yaml)")


def cmd_export(args) -> None:
    from babyllama.export import check_export_options, export_run

    check_export_options(args.format, args.dtype)  # before the model loads
    result = export_run(args.run, args.format, args.out, dtype=args.dtype, merge=args.merge)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    names = ", ".join(f.name for f in result.files)
    print(f"exported {args.run} as {args.format} -> {result.path} ({names}; "
          f"{result.size / 2**20:.1f} MiB)")


def cmd_import(args) -> None:
    from babyllama.export.hf import import_hf

    out = import_hf(args.src, args.out)
    print(f"imported {args.src} -> {out} (config.yaml, model.safetensors, tokenizer/): "
          f"`babyllama generate {out}`, `babyllama sft` with sft.base={out}")


def cmd_model_info(args) -> None:
    from babyllama.config import load_config, read_run_config
    from babyllama.model.llama import Llama

    if Path(args.preset).is_dir():
        cfg = read_run_config(Path(args.preset)).model
    else:
        cfg = load_config(args.preset).model
    if args.vocab_size:
        cfg.vocab_size = args.vocab_size
    if args.tied is not None:
        cfg.tie_word_embeddings = args.tied
    import torch

    with torch.device("meta"):  # count without allocating (the big presets are hundreds of MB)
        model = Llama(cfg)
    print(format_param_table(model, args.preset))


def format_param_table(model, name: str) -> str:
    c = model.config
    n = model.parameter_counts()
    rows = [("embedding", n["embedding"]),
            ("lm_head" + (" (tied: shares the embedding)" if c.tie_word_embeddings else ""), n["lm_head"]),
            (f"decoder layers ({c.num_hidden_layers} x {n['layers'] // c.num_hidden_layers:,})", n["layers"]),
            ("final norm", n["final_norm"])]
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{name}: hidden {c.hidden_size}, {c.num_hidden_layers} layers, {c.num_attention_heads} heads "
             f"({c.kv_heads} kv), intermediate {c.intermediate_size}, vocab {c.vocab_size:,}, "
             f"context {c.max_position_embeddings}",
             f"{'part':<{width}}{'parameters':>14}{'share':>9}"]
    for label, count in rows:
        lines.append(f"{label:<{width}}{count:>14,}{count / n['total']:>9.1%}")
    lines.append(f"{'total':<{width}}{n['total']:>14,}{1:>9.1%}  ({n['total'] / 1e6:.1f}M)")
    return "\n".join(lines)


def cmd_demo(args) -> None:
    from babyllama.demo import run_demo

    run_demo(Path(args.out), minutes=args.minutes, steps=args.steps)


def build_parser() -> argparse.ArgumentParser:
    from babyllama.config import list_presets

    p = argparse.ArgumentParser(prog="babyllama", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tok = sub.add_parser("tokenizer", help="train, trim or report on a tokenizer").add_subparsers(dest="tokenizer_command",
                                                                                 required=True, metavar="ACTION")
    tt = tok.add_parser("train", help="train a byte-level BPE tokenizer on text sources")
    add_source_args(tt)
    tt.add_argument("--vocab-size", type=vocab_sizes, default=[8000],
                    help="one size, or several (4000,8000,16000) to train each and compare them "
                         "on held-out documents")
    tt.add_argument("--preset", default=None, help="with several sizes: report the embedding share "
                                                   "of this model preset")
    tt.add_argument("--pretokenizer", default=None, help="pre-tokenization (default: the measured best; see README)")
    tt.add_argument("--max-documents", type=int, default=0, help="train on at most N documents (0: all)")
    tt.add_argument("-o", "--out", required=True, help="output directory")
    tt.set_defaults(func=cmd_tokenizer_train)

    tm = tok.add_parser("trim", help="shrink a SentencePiece tokenizer to the pieces a corpus uses "
                                     "(plus all CJK pieces and a retain list)")
    tm.add_argument("tokenizer", help="a SentencePiece .model or a tokenizer directory")
    add_source_args(tm)
    tm.add_argument("--retain", help="a file of pieces or words to keep (one per line), e.g. English words")
    tm.add_argument("--no-keep-cjk", action="store_true", help="keep only the CJK pieces the corpus uses")
    tm.add_argument("--max-documents", type=int, default=0, help="read at most N documents (0: all)")
    tm.add_argument("-o", "--out", required=True, help="output directory")
    tm.set_defaults(func=cmd_tokenizer_trim)

    tr = tok.add_parser("report", help="chars/token, byte fallback, coverage and embedding share on a corpus")
    tr.add_argument("tokenizer", help="a tokenizer directory, tokenizer.json or SentencePiece .model")
    add_source_args(tr)
    tr.add_argument("--preset", default=None, help="a model preset: the embedding's share of its parameters")
    tr.add_argument("--max-documents", type=int, default=0, help="read at most N documents (0: all)")
    tr.add_argument("--json", help="also write the numbers to this JSON file")
    tr.set_defaults(func=cmd_tokenizer_report)

    cl = sub.add_parser("clean", help="raw corpora -> clean, deduplicated jsonl shards with a report")
    cl.add_argument("inputs", nargs="+", metavar="INPUT",
                    help="files or folders: .txt in any Chinese encoding (a document per line), "
                         ".jsonl/.json/.csv/.parquet, MediaWiki dumps (.xml, .xml.bz2)")
    cl.add_argument("-o", "--out", required=True, help="output folder (part-*.jsonl, _report.md/json)")
    cl.add_argument("--normalize", default="width", choices=["width", "nfkc", "none"],
                    help="width: full-width Latin letters/digits to ASCII, Chinese punctuation kept "
                         "(default); nfkc: Unicode NFKC")
    cl.add_argument("--no-simplify", action="store_true", help="keep traditional characters")
    cl.add_argument("--no-html", action="store_true", help="do not strip HTML tags")
    cl.add_argument("--mask-pii", action="store_true", help="e-mail addresses and phone numbers -> <email>/<phone>")
    cl.add_argument("--min-chars", type=int, default=20)
    cl.add_argument("--max-chars", type=int, default=200_000)
    cl.add_argument("--min-chinese-ratio", type=float, default=0.3, help="Han characters / non-space characters")
    cl.add_argument("--max-repeated-line-ratio", type=float, default=0.3)
    cl.add_argument("--max-junk-ratio", type=float, default=0.25, help="symbols that are neither text nor punctuation")
    cl.add_argument("--no-dedup", action="store_true", help="keep exact and near duplicates")
    cl.add_argument("--no-near-dedup", action="store_true", help="exact duplicates only")
    cl.add_argument("--num-perm", type=int, default=128, help="MinHash permutations")
    cl.add_argument("--bands", type=int, default=32, help="LSH bands (more: lower Jaccard threshold; 32 x 4 rows: ~0.42)")
    cl.add_argument("--ngram", type=int, default=5, help="character n-gram size of the shingles")
    cl.add_argument("--near-jaccard", type=float, default=0.6,
                    help="estimated Jaccard at which a candidate pair counts as a near-duplicate")
    cl.add_argument("--shard-mb", type=int, default=64)
    cl.add_argument("--workers", type=int, default=None, help="processes (default: cores - 1)")
    cl.add_argument("--text-field", default="text", help="field/column holding the text (default: text)")
    cl.set_defaults(func=cmd_clean)

    pr = sub.add_parser("prepare", help="tokenize text sources into token shards (train + val split)")
    add_source_args(pr)
    pr.add_argument("--tokenizer", required=True,
                    help="a tokenizer directory, a SentencePiece .model, or a tokenizer.json")
    pr.add_argument("-o", "--out", required=True, help="output directory")
    pr.add_argument("--val-fraction", type=float, default=0.01)
    pr.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: CPU count)")
    pr.set_defaults(func=cmd_prepare)

    pt = sub.add_parser("pretrain", help="pretrain a model on prepared shards",
                        description="Pretrain a Llama. Any config field can be overridden as "
                                    "section.key=value, e.g. train.lr=3e-4 model.num_hidden_layers=8.")
    src = pt.add_mutually_exclusive_group()
    src.add_argument("--preset", help=f"a preset: {', '.join(list_presets())}")
    src.add_argument("-c", "--config", help="a YAML config file")
    pt.add_argument("--data", help="a directory made by `babyllama prepare`")
    pt.add_argument("--tokenizer", help="tokenizer (default: the one saved with the data)")
    add_run_args(pt)
    pt.set_defaults(func=cmd_pretrain)

    ge = sub.add_parser("generate", help="continue a prompt with a trained model")
    ge.add_argument("run", help="a run directory (or a transformers Llama directory)")
    ge.add_argument("--prompt", action="append", required=True, help="may be repeated")
    ge.add_argument("--num-return-sequences", type=int, default=1, help="continuations per prompt")
    add_sampling_args(ge)
    ge.set_defaults(func=cmd_generate)

    sf = sub.add_parser("sft", help="fine-tune a pretrained run on conversations (chat model)",
                        description="Supervised fine-tuning. Any config field can be overridden as "
                                    "section.key=value, e.g. train.lr=1e-4 sft.epochs=2 "
                                    "sft.mode=pad sft.replay_ratio=0.1.")
    sf.add_argument("--base", help="the pretrained run directory to start from")
    sf.add_argument("--data", nargs="+", metavar="FILE",
                    help="conversation files (jsonl/json/csv/tsv/txt/yaml, or builtin:chatterbot-zh); "
                         "FILE@WEIGHT repeats (2) or subsamples (0.5) a file when mixing")
    sf.add_argument("--format", help="the schema of every file (default: detected per file)")
    sf.add_argument("--template", help="chat template: chatml (default), babyllama, phi2, "
                                       "llama2-chinese, or a .jinja file")
    sf.add_argument("--system-prompt", dest="system_prompt", help="system prompt for conversations without one")
    sf.add_argument("--loss-on", dest="loss_on", choices=["all", "last"],
                    help="train on all assistant turns (default) or only the last")
    sf.add_argument("--mode", choices=["pack", "pad"], help="pack conversations into full rows "
                                                             "(default) or pad length-sorted batches")
    sf.add_argument("--skip-bad-records", action="store_true",
                    help="skip and count malformed conversations instead of stopping at the first")
    sf.add_argument("--lora", action="store_true",
                    help="train low-rank adapters only (lora.r=8 lora.alpha=16 ... to shape them)")
    sf.add_argument("--qlora", action="store_true",
                    help="LoRA over a 4-bit NF4 base (bitsandbytes); lora.compute_dtype=fp32|bf16|fp16")
    add_run_args(sf)
    sf.set_defaults(func=cmd_sft)

    ch = sub.add_parser("chat", help="talk with a fine-tuned model, turn by turn")
    ch.add_argument("run", help="a run directory (or a transformers Llama directory)")
    ch.add_argument("--prompt", help="answer this one message and exit (for scripts)")
    ch.add_argument("--system", help="system prompt")
    ch.add_argument("--doc", help="a reference document (text file) to answer about (seed 0's 资料)")
    ch.add_argument("--adapter", action="append", metavar="[NAME=]DIR",
                    help="load a LoRA run's adapter onto RUN (the base); repeat for several, the "
                         "last is active; switch with /adapter NAME")
    add_sampling_args(ch, **CHAT_DEFAULTS, truncate=False)
    ch.set_defaults(func=cmd_chat)

    ev = sub.add_parser("eval", help="score a run: lm (perplexity, bits/char), rouge, choice "
                                     "(C-Eval/CMMLU), generation (distinct-n, loop rate)",
                        description="Evaluate a run directory (base, SFT or LoRA) on one task; the "
                                    "table is printed and written to RUN/eval/NAME.md and .json.")
    ev.add_argument("run", help="a run directory (or a transformers Llama directory)")
    ev.add_argument("--task", required=True, choices=["lm", "rouge", "choice", "generation"])
    ev.add_argument("--data", required=True,
                    help="lm: text/jsonl/folder or a prepared dataset; rouge: tsv/csv/jsonl/LCSTS; "
                         "choice: a C-Eval/CMMLU folder or jsonl; generation: prompts (txt/jsonl)")
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
    ev.add_argument("--template", help="rouge: the prompt, with {text} where the source goes")
    ev.add_argument("--rouge-level", default="char", choices=["char", "word"],
                    help="rouge: characters, or jieba words")
    ev.add_argument("--source-field", help="rouge: field/column of the text to summarize")
    ev.add_argument("--target-field", help="rouge: field/column of the reference summary")
    ev.add_argument("--prompt-field", default="prompt", help="generation: field holding the prompt")
    add_sampling_args(ev, max_new_tokens=None, temperature=0.0)
    ev.set_defaults(func=cmd_eval)

    ml = sub.add_parser("merge-lora", help="fold a LoRA run's adapter into its base: a plain run directory")
    ml.add_argument("run", help="a run directory trained with --lora or --qlora")
    ml.add_argument("-o", "--out", required=True, help="the merged run directory")
    ml.set_defaults(func=cmd_merge_lora)

    ex = sub.add_parser("export", help="write a run for transformers (hf), llama.cpp (gguf) or onnxruntime (onnx)")
    ex.add_argument("run", help="a run directory (or a transformers directory)")
    ex.add_argument("--format", "-f", required=True, help="hf | gguf | onnx")
    ex.add_argument("-o", "--out", required=True,
                    help="the directory to write (hf, onnx); for gguf a .gguf file or a directory")
    ex.add_argument("--dtype", help="weights: hf f32|f16|bf16 (default f32); gguf f16|f32|q8_0 "
                                    "(default f16); onnx f32")
    ex.add_argument("--merge", action="store_true",
                    help="a LoRA run: fold the adapter into its base while exporting")
    ex.set_defaults(func=cmd_export)

    im = sub.add_parser("import", help="a transformers Llama directory -> a run directory")
    im.add_argument("src", help="a directory with config.json, model.safetensors and tokenizer files")
    im.add_argument("-o", "--out", required=True, help="the run directory to write")
    im.set_defaults(func=cmd_import)

    mo = sub.add_parser("model", help="inspect model presets").add_subparsers(dest="model_command",
                                                                              required=True, metavar="ACTION")
    mi = mo.add_parser("info", help="parameter counts of a preset or a run")
    mi.add_argument("preset", help=f"a preset ({', '.join(list_presets())}), a YAML file or a run directory")
    mi.add_argument("--vocab-size", type=int, default=None)
    tied = mi.add_mutually_exclusive_group()
    tied.add_argument("--tied", dest="tied", action="store_true", default=None, help="tie the LM head to the embedding")
    tied.add_argument("--untied", dest="tied", action="store_false")
    mi.set_defaults(func=cmd_model_info)

    de = sub.add_parser("demo", help="tokenizer -> prepare -> pretrain -> samples on the built-in corpora")
    de.add_argument("-o", "--out", default="runs/demo")
    de.add_argument("--minutes", type=float, default=10.0, help="training time budget")
    de.add_argument("--steps", type=int, default=0, help="exact number of training steps (overrides --minutes)")
    de.set_defaults(func=cmd_demo)
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
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
