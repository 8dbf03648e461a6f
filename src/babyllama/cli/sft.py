"""`babyllama sft`: fine-tune a pretrained run on conversations (full weights, LoRA or QLoRA)."""

from __future__ import annotations

from pathlib import Path

from babyllama.cli.runs import add_run_args, resume_config, split_overrides
from babyllama.errors import UserError


def add_parser(subparsers) -> None:
    sf = subparsers.add_parser("sft", help="fine-tune a pretrained run on conversations (chat model)",
                               description="Supervised fine-tuning. Any config field can be overridden as "
                                           "section.key=value, e.g. train.lr=1e-4 sft.epochs=2 "
                                           "sft.mode=pad sft.replay_ratio=0.1.")
    sf.add_argument("--base", help="the pretrained run directory to start from")
    sf.add_argument("--data", nargs="+", metavar="FILE",
                    help="conversation files (jsonl/json/csv/tsv/txt/yaml), or builtin:chatterbot-zh, "
                         "builtin:reviews-zh[#train|#val|#test] and the other built-in sets; "
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


def cmd_sft(args) -> None:
    from babyllama.config import parse_overrides
    from babyllama.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
    from babyllama.run import LOSS_PLOT, METRICS, SAMPLES, WEIGHTS, Run
    from babyllama.train.sft import absolute_source, run_sft, sft_config

    args.data, more = split_overrides(args.data)
    args.overrides = list(args.overrides or []) + more
    if args.resume:
        stage = Run(args.out).config().stage
        if stage != "sft":
            raise UserError(f"{args.out}: is a {stage} run; resume it with `babyllama {stage}`")
        # The SFT flags restate the run's settings (checked, never silently ignored).
        values = sft_overrides(args, parse_overrides(args.overrides))
        if "sources" in values["sft"]:
            values["sft"]["sources"] = [absolute_source(s) for s in values["sft"]["sources"]]
        if args.base:
            values["sft"]["base"] = str(Path(args.base).resolve())
        cfg = resume_config(args, values)
    else:
        if not args.base:
            raise UserError("pass --base RUN (the pretrained run to fine-tune)")
        cfg = sft_config(args.base, sft_overrides(args, parse_overrides(args.overrides)))
    run_dir = run_sft(cfg, resume=args.resume)
    from babyllama.train.distributed import is_main_process

    if not is_main_process():  # under torchrun: one summary, not one per process
        return
    weights = f"{ADAPTER_CONFIG}, {ADAPTER_WEIGHTS}" if cfg.lora.enabled else WEIGHTS
    print(f"run directory: {run_dir}  ({weights}, {METRICS}, {LOSS_PLOT}, {SAMPLES})")
    print(f"talk to it:    babyllama chat {run_dir}")


def sft_overrides(args, values: dict) -> dict:
    """The SFT flags as config overrides on top of the `section.key=value` ones in `values`."""
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
    values["out_dir"] = args.out
    return values
