"""`babyllama merge-lora`: fold a LoRA run's adapter into its base, giving a plain run directory."""

from __future__ import annotations

from babyllama.errors import UserError


def add_parser(subparsers) -> None:
    ml = subparsers.add_parser("merge-lora", help="fold a LoRA run's adapter into its base: a plain run directory")
    ml.add_argument("run", help="a run directory trained with --lora or --qlora")
    ml.add_argument("-o", "--out", required=True, help="the merged run directory")
    ml.set_defaults(func=cmd_merge_lora)


def cmd_merge_lora(args) -> None:
    from babyllama.lora import ADAPTER_WEIGHTS
    from babyllama.run import CONFIG, TOKENIZER, WEIGHTS, Run

    run, out = Run(args.run), Run(args.out)
    if not run.has_adapter():
        raise UserError(f"{run}: no {ADAPTER_WEIGHTS} (not a LoRA run)")
    out.refuse_nonempty()
    cfg = run.config()
    out.write_plain_run(run.load_model(cfg.model), run.load_tokenizer(), cfg)
    print(f"merged {run} into its base {cfg.sft.base} -> {out} ({WEIGHTS}, {TOKENIZER}/, {CONFIG})")
