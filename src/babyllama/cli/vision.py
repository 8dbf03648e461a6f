"""`babyllama align` and `babyllama instruct`: the image-text model's two training stages, and
`babyllama shapes`, which writes the built-in picture set to a folder to look at or reuse.

They take what `babyllama sft` takes (--base, --data, -o, --resume, KEY=VALUE overrides) plus
the image folder and the freezing switches; the data flags land in the run config's `sft:`
section, the image settings in `vlm:`."""

from __future__ import annotations

from pathlib import Path

from babyllama.cli.runs import add_run_args, split_overrides, stage_config
from babyllama.errors import UserError

STAGE_HELP = {
    "align": ("image-text stage 1: train the projector on captions (encoder and language model frozen)",
              "LLaVA's alignment stage. --base is a language-model run (pretrained or chat) or an "
              "image-text run. Data: LLaVA-style JSON/JSONL ({image, conversations}) with --images DIR, "
              "or builtin:shapes-zh (captions of generated pictures). The encoder is a SigLIP-layout ViT, "
              "from --vision-init SIGLIP_DIR or trained from scratch (vlm.vision.* sets its size)."),
    "instruct": ("image-text stage 2: train the projector and the language model on conversations about images",
                 "LLaVA's instruction stage. --base is usually an `align` run. Data as for align "
                 "(builtin:shapes-zh gives questions about colour, shape, count and position). "
                 "Freezing: --freeze-vision/--train-vision, --freeze-language, --freeze-projector; "
                 "rates: train.lr (projector), vlm.vision_lr, vlm.language_lr; --lora adapts the "
                 "language model only."),
}


def add_parser(subparsers) -> None:
    for stage, (short, long) in STAGE_HELP.items():
        p = subparsers.add_parser(stage, help=short, description=long)
        p.add_argument("--base", help="the run to start from (a language-model run, or an image-text run)")
        p.add_argument("--data", nargs="+", metavar="FILE",
                       help="LLaVA-style .json/.jsonl files or folders, or builtin:shapes-zh")
        p.add_argument("--images", help="folder the data's image paths are relative to "
                                        "(default: each data file's folder)")
        p.add_argument("--vision-init", dest="vision_init", metavar="SIGLIP_DIR",
                       help="start the encoder from a local SigLIP checkpoint (config.json + safetensors)")
        p.add_argument("--template", help="chat template (default: the base run's own, else chatml)")
        p.add_argument("--skip-bad-records", action="store_true",
                       help="skip and count malformed records instead of stopping at the first")
        vision = p.add_mutually_exclusive_group()
        vision.add_argument("--freeze-vision", dest="freeze_vision", action="store_const", const=True,
                            help="keep the encoder fixed (default when it is pretrained)")
        vision.add_argument("--train-vision", dest="freeze_vision", action="store_const", const=False,
                            help="train the encoder too (default when it starts from scratch)")
        p.add_argument("--freeze-language", action="store_true", help="keep the language model fixed")
        p.add_argument("--freeze-projector", action="store_true", help="keep the projector fixed")
        if stage == "instruct":
            p.add_argument("--lora", action="store_true", help="LoRA adapters on the language model")
        add_run_args(p)
        p.set_defaults(func=cmd_stage, stage=stage)

    sh = subparsers.add_parser("shapes", help="write the built-in picture set (builtin:shapes-zh) to a folder",
                               description="Pictures of coloured shapes with Chinese captions and checkable "
                                           "questions (颜色, 形状, 数量, 位置), as LLaVA-style data.json + images/.")
    sh.add_argument("-o", "--out", required=True, help="folder to write (data.json, images/)")
    sh.add_argument("--split", default="test", choices=["train", "val", "test"])
    sh.add_argument("--kind", default="qa", choices=["qa", "caption"])
    sh.add_argument("-n", type=int, help="number of pictures (default: the split's size)")
    sh.add_argument("--size", type=int, default=64, help="picture side in pixels (default 64)")
    sh.add_argument("--seed", type=int, default=0)
    sh.set_defaults(func=cmd_shapes)


def stage_values(args, values: dict) -> dict:
    """The stage's flags as config overrides on top of the `section.key=value` ones."""
    sft = values.setdefault("sft", {})
    vlm = values.setdefault("vlm", {})
    if not isinstance(sft, dict) or not isinstance(vlm, dict):
        raise UserError("command line: sft and vlm must be mappings of settings")
    if args.data:
        sft["sources"] = args.data
    if args.template is not None:
        sft["template"] = args.template
    if args.skip_bad_records:
        sft["skip_bad_records"] = True
    flags = {"images": args.images and str(Path(args.images).resolve()),
             "vision_init": args.vision_init and str(Path(args.vision_init).resolve()),
             "freeze_vision": args.freeze_vision,
             "freeze_language": True if args.freeze_language else None,
             "freeze_projector": True if args.freeze_projector else None}
    for key, flag in flags.items():
        if flag is None:
            continue
        if key in vlm and vlm[key] != flag and key not in ("images", "vision_init"):
            raise UserError(f"command line: --{key.replace('_', '-')} and vlm.{key}={vlm[key]} disagree; give one")
        vlm[key] = flag
    if getattr(args, "lora", False):
        values.setdefault("lora", {})["enabled"] = True
    if not vlm:
        del values["vlm"]
    values["out_dir"] = args.out
    return values


def cmd_stage(args) -> None:
    from babyllama.config import parse_overrides
    from babyllama.train.sft import absolute_source
    from babyllama.train.vision import run_vision_stage

    args.data, more = split_overrides(args.data)
    args.overrides = list(args.overrides or []) + more
    values = stage_values(args, parse_overrides(args.overrides))
    if "sources" in values["sft"]:
        values["sft"]["sources"] = [s if s.startswith("builtin:") else absolute_source(s)
                                    for s in values["sft"]["sources"]]
    cfg = stage_config(args, values, "the language-model or image-text run")
    run_dir = run_vision_stage(cfg, resume=args.resume)
    from babyllama.train.distributed import is_main_process

    if not is_main_process():  # under torchrun: one summary, not one per process
        return
    print(f"run directory: {run_dir}")
    print(f"ask about a picture: babyllama chat {run_dir} --image PICTURE.png")


def cmd_shapes(args) -> None:
    from babyllama.data.shapes import write_shapes_folder

    if args.n is not None and args.n < 1:
        raise UserError(f"-n must be at least 1, got {args.n}")
    if args.size < 16:
        raise UserError(f"--size must be at least 16 pixels, got {args.size}")
    data = write_shapes_folder(Path(args.out), args.split, args.n, kind=args.kind, seed=args.seed, size=args.size)
    print(f"wrote {data} and {Path(args.out) / 'images'}/")
