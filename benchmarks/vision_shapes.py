"""Image-text model on builtin:shapes-zh: train align -> instruct on CPU, then score held-out
questions per type against two baselines, side by side in one run.

    python benchmarks/vision_shapes.py --base runs/demo/sft --out runs/vision
    python benchmarks/vision_shapes.py --base runs/demo/sft --out runs/vision --variants

Baselines (seed 0's worry: is the model using the picture, or guessing from the text?):
- majority: always answering the most frequent answer of the question type (chance level);
- shuffled: the same model, with each question's picture swapped for another question's.

`--variants` adds seed 0's freezing comparison: instruct with everything trained, with the
language model frozen, with the encoder frozen, and with both frozen (projector only), each
from the same align run for `--variant-steps` steps.

Figures are measurements of one run on this machine, not pass/fail tests; the README's table
comes from here. Writes RUN_DIR/vision_shapes.md and, with --picture, a PNG of test pictures
with the model's answers.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch


def train_stage(stage: str, base: Path, out: Path, overrides: list[str]) -> tuple[Path, float]:
    from babyllama.config import parse_overrides
    from babyllama.run import Run
    from babyllama.train.sft import sft_config
    from babyllama.train.vision import run_vision_stage

    if Run(out).is_trained():
        print(f"{out}: already trained, reused")
        return out, float("nan")
    values = parse_overrides(overrides)
    values.setdefault("sft", {})["sources"] = ["builtin:shapes-zh"]
    values["out_dir"] = str(out)
    start = time.perf_counter()
    run_vision_stage(sft_config(base, values, stage=stage))
    return out, time.perf_counter() - start


def evaluate(run_dir: Path, limit: int, seed: int) -> dict:
    """Accuracy per question type: the model, the model with shuffled pictures, the majority answer."""
    from babyllama.data.llava import image_conversations
    from babyllama.eval.vqa import majority_baseline, vqa_scores
    from babyllama.run import Run
    from babyllama.train.vision import image_processing

    run = Run(run_dir)
    cfg = run.config()
    model = run.load_model().eval()
    tokenizer = run.load_tokenizer()
    convs = image_conversations("builtin:shapes-zh#test", kind="qa", size=cfg.vlm.vision.image_size)
    random.Random(seed).shuffle(convs)
    convs = convs[:limit]
    proc = image_processing(cfg)
    start = time.perf_counter()
    real = vqa_scores(model, tokenizer, convs, proc)
    seconds = time.perf_counter() - start
    shuffled = vqa_scores(model, tokenizer, convs, proc, shuffle=True, seed=seed)
    return {"real": real, "shuffled": shuffled, "majority": majority_baseline(convs), "seconds": seconds,
            "n": len(convs), "model": model, "tokenizer": tokenizer, "convs": convs, "proc": proc}


def train_rate(run_dir: Path, seconds: float) -> str:
    from babyllama.run import Run

    cfg = Run(run_dir).config()
    images = cfg.train.max_steps * cfg.train.batch_size * cfg.train.grad_accum
    return f"{images / seconds:.1f}" if seconds == seconds else "-"


def accuracy_table(rows: list[tuple[str, dict]]) -> str:
    from babyllama.data.shapes import QTYPES

    head = "| model | " + " | ".join(QTYPES) + " | all |"
    lines = [head, "|" + "---|" * (len(QTYPES) + 2)]
    for name, acc in rows:
        lines.append(f"| {name} | " + " | ".join(f"{acc.get(q, float('nan')):.1%}" for q in QTYPES)
                     + f" | {acc.get('all', float('nan')):.1%} |")
    return "\n".join(lines)


def picture(result: dict, path: Path, n: int = 8) -> None:
    """A grid of test pictures, each with its question, the model's answer and the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from babyllama.atomic import atomic_path

    # A font with Chinese glyphs, where the system has one (Debian: fonts-wqy-microhei or
    # fonts-noto-cjk); matplotlib's own DejaVu has none.
    from matplotlib import font_manager

    found = [f for pattern in ("wqy*", "*Noto*CJK*", "*DroidSansFallback*")
             for f in sorted(Path("/usr/share/fonts").rglob(pattern)) if f.suffix in (".ttc", ".ttf", ".otf")]
    if found:
        font_manager.fontManager.addfont(str(found[0]))
        plt.rcParams["font.sans-serif"] = [font_manager.FontProperties(fname=str(found[0])).get_name(), "DejaVu Sans"]
    else:
        print("note: no Chinese font found (apt install fonts-wqy-microhei): the picture's titles show boxes")
    convs, predictions = result["convs"], result["real"].examples
    picked, seen = [], set()
    for i, c in enumerate(convs):  # one question of each type first, then any
        if c.qtype not in seen or len(seen) == 4:
            picked.append(i)
            seen.add(c.qtype)
        if len(picked) == n:
            break
    fig, axes = plt.subplots(2, n // 2, figsize=(2.4 * n // 2, 5.6))
    for ax, i in zip(axes.flat, picked):
        c, p = convs[i], predictions[i]
        ax.imshow(c.image)
        ax.set_axis_off()
        mark = "对" if p.correct else "错"
        ax.set_title(f"{p.question}\n{mark} {p.prediction}  (ref {p.reference})", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="a language-model run (e.g. runs/demo/sft)")
    p.add_argument("--out", default="runs/vision", help="where the runs go")
    p.add_argument("--align-steps", type=int, default=300)
    p.add_argument("--instruct-steps", type=int, default=900)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=800, help="test questions scored (default 800)")
    p.add_argument("--variants", action="store_true", help="also the freezing variants of instruct")
    p.add_argument("--variant-steps", type=int, default=400, help="instruct steps of each variant (default 400)")
    p.add_argument("--picture", help="write a PNG of test pictures and the model's answers here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="KEY=VALUE settings for both stages (vlm.vision.*, ...)")
    args = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    out = Path(args.out)
    common = [f"train.batch_size={args.batch_size}", *args.overrides]
    align, align_s = train_stage("align", Path(args.base), out / "align",
                                 [f"train.max_steps={args.align_steps}", *common])
    instruct_overrides = [f"train.max_steps={args.instruct_steps}", *common]
    instruct, instruct_s = train_stage("instruct", align, out / "instruct", instruct_overrides)
    runs = [(f"instruct {args.instruct_steps} steps (encoder + projector + LM)", instruct, instruct_s)]
    if args.variants:
        short = [f"train.max_steps={args.variant_steps}", *common]
        for name, flags in (("all trained", []), ("LM frozen", ["vlm.freeze_language=true"]),
                            ("encoder frozen", ["vlm.freeze_vision=true"]),
                            ("projector only", ["vlm.freeze_language=true", "vlm.freeze_vision=true"])):
            slug = name.replace(" ", "-")
            run_dir, seconds = train_stage("instruct", align, out / f"variant-{slug}", short + flags)
            runs.append((f"{args.variant_steps} steps, {name}", run_dir, seconds))

    from babyllama.run import Run

    first = Run(instruct)
    counts = first.load_model().parameter_counts()
    k = first.config().vlm.image_tokens
    lines = [f"# builtin:shapes-zh, {args.limit} held-out questions (test split)", "",
             f"parameters: {counts['total'] / 1e6:.2f}M (encoder {counts['vision'] / 1e6:.2f}M = "
             f"{counts['vision'] / counts['total']:.0%}, projector {counts['projector'] / 1e6:.2f}M, language model "
             f"{counts['language'] / 1e6:.2f}M); {k} positions per image", "",
             f"training: align {args.align_steps} steps in {align_s:.0f} s ({train_rate(align, align_s)} images/s), "
             f"instruct {args.instruct_steps} steps in {instruct_s:.0f} s ({train_rate(instruct, instruct_s)} "
             f"images/s), batch {args.batch_size}", ""]
    rows = []
    first_result = None
    for name, run_dir, seconds in runs:
        result = evaluate(run_dir, args.limit, args.seed)
        first_result = first_result or result
        rows.append((f"{name} ({seconds:.0f} s)", result["real"].accuracy))
        rows.append((f"{name}, shuffled pictures", result["shuffled"].accuracy))
    rows.append(("majority answer (chance)", first_result["majority"]))
    lines.append(accuracy_table(rows))
    lines += ["", f"scoring: {first_result['n'] / first_result['seconds']:.1f} questions/s (greedy, batched)"]
    report = "\n".join(lines)
    print(report)
    from babyllama.atomic import atomic_write_text

    atomic_write_text(out / "vision_shapes.md", report + "\n")
    if args.picture:
        picture(first_result, Path(args.picture))
        print(f"picture: {args.picture}")


if __name__ == "__main__":
    main()
