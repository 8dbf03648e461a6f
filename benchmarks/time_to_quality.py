"""Quality per CPU-minute: the demo's pretraining next to a nanoGPT-style baseline, trained for
the same wall time on the same documents, scored in bits per character on the same held-out
documents.

Data: the demo's corpora (`babyllama.demo.CORPORA`), split into train and validation documents
exactly as `babyllama prepare` splits them (`split_documents`, the demo's val_fraction and seed).
Our tokenizer is trained on the train documents only.

Ours: `babyllama pretrain` of the demo preset (or any `--set key=value` changes to it) with
`train.max_minutes` = the budget: the trainer stops when the time is spent and its schedule
follows the time.

The baseline: transformers' `GPT2LMHeadModel` at nanoGPT's documented CPU settings for its
Shakespeare example (README "I only have a macbook": 4 layers, 4 heads, width 128, context
64, batch 12, no dropout; lr 1e-3 with 100 warmup steps and cosine decay to 1e-4, AdamW betas
(0.9, 0.99), weight decay 0.1 on matrices, gradient clipping 1.0, as
config/train_shakespeare_char.py) on a character vocabulary of the train documents (a
character never seen there is one `<unk>` symbol, which flatters the baseline slightly).
Its cosine decay follows the same time budget as ours, as `lr_decay_iters = max_iters` would
if max_iters were what the time allows. Random windows of the character stream, as nanoGPT's
get_batch takes them. The training loop is written here (a library model, our loop's rules):
nothing from nanoGPT is copied.

Scoring, the same rule for both (`babyllama eval --task lm`'s): each validation document
is `[bos] + text + [eos]` (the baseline: a separator symbol on both sides), every symbol after
the first is predicted, in non-overlapping windows of the model's context; bits per character
= total nats / ln 2 / characters of the documents. The curve (bits per character after 2, 5
and 10 minutes) is read from evaluations during the run on evenly spaced windows covering the
validation text (ours: the trainer's periodic evaluation; the baseline: the same windows
rule on its character stream). Evaluation time counts against both budgets.

The two trainings run one after the other in this process; the load average is printed
beside each, so a noisy run can be recognised. A measurement, not a test.

    python benchmarks/time_to_quality.py --out runs/ttq                  # 10 minutes each
    python benchmarks/time_to_quality.py --out runs/ttq --minutes 3 --only ours --set model.hidden_size=192
    python benchmarks/time_to_quality.py --out runs/ttq-dry --dry-run    # seconds: the code path
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from babyllama.config import TrainConfig, apply_values, check, parse_overrides
from babyllama.data.shards import META_FILE, prepare, split_documents
from babyllama.demo import CORPORA, VAL_FRACTION, demo_config
from babyllama.eval.lm import LMOptions, run_lm, window_requests
from babyllama.errors import UserError
from babyllama.llm import load
from babyllama.model.llama import Llama
from babyllama.tokenizer import train_tokenizer
from babyllama.train.pretrain import run_pretrain
from babyllama.train.schedule import lr_at

CURVE_MINUTES = (2, 5, 10)


def load_average() -> str:
    try:
        return "load %.2f" % os.getloadavg()[0]
    except OSError:
        return "load ?"


@dataclass
class Corpus:
    """The documents both models see: `sources` split by `split_documents` at `val_fraction`,
    exactly as `prepare` splits them for our model."""
    sources: list
    val_fraction: float
    train: list[str]
    val: list[str]


def documents(out: Path, dry_run: bool) -> Corpus:
    """The demo's corpora, or for a dry run its first few hundred documents (the same code path
    in seconds), written to out/dry-run.jsonl."""
    sources, val_fraction = CORPORA, VAL_FRACTION
    if dry_run:
        head = [text for _, text in itertools.islice(split_documents(CORPORA, val_fraction=0.0), 300)]
        sources, val_fraction = [out / "dry-run.jsonl"], 0.03
        sources[0].write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in head),
                              encoding="utf-8")
    train, val = [], []
    for split, text in split_documents(sources, val_fraction=val_fraction):
        (val if split == "val" else train).append(text)
    return Corpus(sources, val_fraction, train, val)


# ---------------------------------------------------------------------------------------------
# Ours


def prepared_data(out: Path, vocab_size: int, corpus: Corpus) -> Path:
    """The corpus tokenized into out/data-V (reused when present), with a tokenizer of
    `vocab_size` trained on the train documents."""
    data = out / f"data-{vocab_size}"
    if (data / META_FILE).exists():
        return data
    tok = train_tokenizer(corpus.train, vocab_size, show_progress=False)
    prepare(corpus.sources, tok, data, val_fraction=corpus.val_fraction, progress=False)
    return data


def seconds_per_step(cfg) -> float:
    """Median time of a few optimizer steps of a throwaway copy of the model (to place the
    periodic evaluations at about the same times as the baseline's)."""
    model = Llama(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.train.seq_len + 1))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        model(x[:, :-1], x[:, 1:])[1].backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[1]


def run_ours(out: Path, name: str, minutes: float, overrides: list[str], corpus: Corpus, eval_every_s: float) -> dict:
    cfg = demo_config(out, torch.device("cpu"))
    apply_values(cfg, parse_overrides(overrides), source="--set")
    check(cfg, "--set")
    data = prepared_data(out, cfg.model.vocab_size, corpus)
    val_tokens = json.loads((data / META_FILE).read_text(encoding="utf-8"))["splits"]["val"]["n_tokens"]
    t = cfg.train
    run_dir = out / name
    apply_values(cfg, {"data": str(data), "out_dir": str(run_dir), "train": {
        "max_minutes": minutes, "max_steps": 10**7, "sample_prompts": [], "save_every": 10**7,
        # Periodic evaluations on windows that cover the whole validation split, at about the
        # baseline's evaluation times.
        "eval_batches": max(1, math.ceil(val_tokens / (t.seq_len * t.batch_size))),
        "eval_every": max(1, round(eval_every_s / seconds_per_step(cfg)))}})
    print(f"ours: {load_average()}", flush=True)
    t0 = time.perf_counter()
    run_pretrain(cfg)
    seconds = time.perf_counter() - t0
    llm = load(run_dir)
    scored = run_lm(llm.model, llm.tokenizer, LMOptions(data=str(data), progress=False)).metrics
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    steps = [r for r in records if "loss" in r]
    return {"name": f"babyllama {name}", "params": llm.model.parameter_counts()["total"],
            "seconds": seconds, "steps": steps[-1]["step"], "chars_seen": None, "tokens_seen": steps[-1]["tokens"],
            "bpc": scored["bpc"], "val_chars": scored["chars"],
            "curve": [(r["elapsed_s"], r["val_bpc"]) for r in records if "val_bpc" in r],
            "settings": " ".join(overrides), "tok_per_s": steps[-1]["tokens"] / seconds}


# ---------------------------------------------------------------------------------------------
# The baseline


@dataclass
class BaselineSettings:
    """nanoGPT's config/train_shakespeare_char.py at its README's CPU overrides."""
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    batch_size: int = 12
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    beta2: float = 0.99
    weight_decay: float = 0.1
    grad_clip: float = 1.0


class CharVocab:
    """Characters of the train documents; 0 = <unk>, 1 = the document separator."""

    def __init__(self, docs: list[str]):
        chars = sorted(set("".join(docs)))
        self.index = {c: i + 2 for i, c in enumerate(chars)}
        self.size = len(chars) + 2

    def encode(self, text: str) -> list[int]:
        return [self.index.get(c, 0) for c in text]

    def document(self, text: str) -> list[int]:
        return [1] + self.encode(text) + [1]


def baseline_model(vocab_size: int, s: BaselineSettings):
    import transformers

    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=s.block_size, n_embd=s.n_embd,
                                     n_layer=s.n_layer, n_head=s.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, bos_token_id=1, eos_token_id=1)
    torch.manual_seed(1337)
    return transformers.GPT2LMHeadModel(config)


@torch.no_grad()
def baseline_bpc(model, docs: list[list[int]], chars: int, context: int) -> float:
    """Bits per character of documents (symbol ids with separators), `babyllama eval --task
    lm`'s windows rule."""
    model.eval()
    nats = 0.0
    for ids in docs:
        for ctx, cont in window_requests(ids, context, context):
            x = torch.tensor([ctx + cont[:-1]])
            logits = model(input_ids=x).logits[0, -len(cont):].float()
            nats -= torch.log_softmax(logits, -1).gather(1, torch.tensor(cont)[:, None]).sum().item()
    model.train()
    return nats / math.log(2) / chars


@torch.no_grad()
def baseline_window_bpc(model, stream: torch.Tensor, windows: int, block: int, chars: int) -> float:
    """The periodic evaluation: evenly spaced windows over the validation stream (chars = the
    characters their targets spell)."""
    model.eval()
    starts = torch.linspace(0, len(stream) - block - 1, windows).long().unique()
    x = torch.stack([stream[s:s + block] for s in starts])
    y = torch.stack([stream[s + 1:s + block + 1] for s in starts])
    nats = torch.nn.functional.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten(),
                                             reduction="sum").item()
    model.train()
    return nats / math.log(2) / chars


def run_baseline(minutes: float, train_docs: list[str], val_docs: list[str], eval_every_s: float) -> dict:
    s = BaselineSettings()
    vocab = CharVocab(train_docs)
    stream = torch.tensor([i for d in train_docs for i in vocab.document(d)[:-1]] + [1])
    val_ids = [vocab.document(d) for d in val_docs]
    val_chars = sum(len(d) for d in val_docs)
    val_stream = torch.tensor([i for ids in val_ids for i in ids[:-1]] + [1])
    n_windows = max(1, len(val_stream) // s.block_size)
    window_chars = n_windows * s.block_size * val_chars / len(val_stream)  # separators are not characters
    model = baseline_model(vocab.size, s)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=s.lr, betas=(0.9, s.beta2))
    # Our schedule function with nanoGPT's numbers: warmup in steps, cosine over the budget.
    schedule = TrainConfig(lr=s.lr, min_lr_ratio=s.min_lr / s.lr, warmup_steps=s.warmup_iters, max_steps=10**9)
    rng = random.Random(1337)
    budget = minutes * 60
    print(f"baseline: {load_average()}", flush=True)
    t0 = time.perf_counter()
    step, curve, next_eval = 0, [], eval_every_s
    while True:
        elapsed = time.perf_counter() - t0
        if elapsed >= budget:
            break
        if elapsed >= next_eval:
            curve.append((elapsed, baseline_window_bpc(model, val_stream, n_windows, s.block_size, window_chars)))
            next_eval += eval_every_s
        for group in opt.param_groups:
            group["lr"] = lr_at(step, schedule, elapsed / budget)
        starts = [rng.randrange(len(stream) - s.block_size - 1) for _ in range(s.batch_size)]
        x = torch.stack([stream[i:i + s.block_size] for i in starts])
        y = torch.stack([stream[i + 1:i + s.block_size + 1] for i in starts])
        loss = torch.nn.functional.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
    seconds = time.perf_counter() - t0
    curve.append((seconds, baseline_window_bpc(model, val_stream, n_windows, s.block_size, window_chars)))
    return {"name": "nanoGPT-style char GPT-2 (transformers)", "params": sum(p.numel() for p in model.parameters()),
            "seconds": seconds, "steps": step, "chars_seen": step * s.batch_size * s.block_size, "tokens_seen": None,
            "bpc": baseline_bpc(model, val_ids, val_chars, s.block_size), "val_chars": val_chars, "curve": curve,
            "settings": f"vocab {vocab.size:,} characters"}


# ---------------------------------------------------------------------------------------------
# Report


def at_minutes(curve: list[tuple[float, float]], minutes: float) -> float | None:
    """Bits per character `minutes` into the run, linearly interpolated between the evaluations
    around it (the two sides evaluate at different times); None outside the evaluated span."""
    t = minutes * 60
    points = sorted(curve)
    for (t0, b0), (t1, b1) in zip(points, points[1:]):
        if t0 <= t <= t1:
            return b0 + (b1 - b0) * (t - t0) / (t1 - t0) if t1 > t0 else b1
    return None


def table(results: list[dict], minutes: float) -> str:
    marks = [m for m in CURVE_MINUTES if m < minutes] + [minutes]
    head = ["model", "params", "steps", "seen", "held-out bits/char"] + [f"{m:g} min" for m in marks[:-1]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        seen = f"{r['tokens_seen'] / 1e6:.2f}M tokens" if r["tokens_seen"] else f"{r['chars_seen'] / 1e6:.2f}M chars"
        cells = [r["name"], f"{r['params'] / 1e6:.2f}M", f"{r['steps']:,}", seen, f"**{r['bpc']:.3f}**"]
        for m in marks[:-1]:
            v = at_minutes(r["curve"], m)
            cells.append(f"{v:.3f}" if v is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="working directory (data, our run, results.json); required to train")
    ap.add_argument("--minutes", type=float, default=10.0, help="wall time of each training (default 10)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="change the demo preset (repeatable), e.g. model.hidden_size=192")
    ap.add_argument("--only", choices=["ours", "baseline"], help="train one side only")
    ap.add_argument("--name", default="demo-preset", help="our run's directory under --out (a sweep names each)")
    ap.add_argument("--dry-run", action="store_true", help="a few hundred documents and seconds of training")
    ap.add_argument("--report", type=Path, metavar="RESULTS_JSON", help="print the table of an earlier run's results")
    args = ap.parse_args()
    if args.report:
        results = read_results(args.report, ap)
        print(table(results, round(max(r["seconds"] for r in results) / 60, 1)))
        print_ratio(results)
        return
    if args.out is None:
        ap.error("--out DIR is required (or --report RESULTS_JSON)")
    if not 0 < args.minutes < math.inf:
        ap.error(f"--minutes must be a positive number, got {args.minutes:g}")
    try:
        run(args)
    except UserError as e:  # a bad --set, or data that cannot be read: one line, as the CLI
        raise SystemExit(f"error: {e}") from None


def read_results(path: Path, ap: argparse.ArgumentParser) -> list[dict]:
    """The results list an earlier run wrote (results-*.json); a parser error when it is not one."""
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        ap.error(f"--report {path}: cannot read it ({e.strerror or e})")
    except json.JSONDecodeError as e:
        ap.error(f"--report {path}: line {e.lineno}: not JSON ({e.msg})")
    keys = {"name", "params", "steps", "seconds", "bpc", "curve", "tokens_seen", "chars_seen"}
    if not (isinstance(results, list) and results and all(isinstance(r, dict) and keys <= set(r) for r in results)):
        ap.error(f"--report {path}: not a results file of this benchmark (a list of results with {sorted(keys)})")
    return results


def run(args) -> None:
    threads = torch.get_num_threads()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        args.minutes = min(args.minutes, 0.1)
    corpus = documents(args.out, args.dry_run)
    print(f"{len(corpus.train):,} train documents ({sum(map(len, corpus.train)):,} characters), "
          f"{len(corpus.val):,} validation documents ({sum(map(len, corpus.val)):,} characters); "
          f"{args.minutes:g} minutes each, {threads} thread{'s' if threads != 1 else ''}", flush=True)
    results = []
    if args.only != "baseline":
        results.append(run_ours(args.out, args.name, args.minutes, args.overrides, corpus, args.minutes * 6))
    if args.only != "ours":
        results.append(run_baseline(args.minutes, corpus.train, corpus.val, eval_every_s=args.minutes * 6))
    tag = {"ours": args.name, "baseline": "baseline"}.get(args.only, "both")
    (args.out / f"results-{tag}.json").write_text(json.dumps(results, indent=1, ensure_ascii=False),
                                                  encoding="utf-8")
    print()
    print(table(results, args.minutes))
    print_ratio(results)


def print_ratio(results: list[dict]) -> None:
    if len(results) == 2:
        ours, base = results
        print(f"\nours / baseline bits per character: {ours['bpc'] / base['bpc']:.3f} "
              f"(ours {1 - ours['bpc'] / base['bpc']:.1%} lower)")


if __name__ == "__main__":
    main()
