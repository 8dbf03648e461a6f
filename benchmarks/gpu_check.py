"""One GPU session's checks and measurements, as one markdown table for the README.

Written to run once, unattended, on one CUDA GPU (planned: an H200, ~8 minutes of wall time),
and to work the first time: `--dry-run` runs the very same row functions on CPU with a tiny
model (hidden 64, 2 layers, vocabulary 512) in under a minute, and tests/test_gpu_check.py runs
it, so no row can rot between GPU sessions.

    make gpu-check                                   # on the GPU machine
    python benchmarks/gpu_check.py --json gpu.json   # the same, keeping the rows as JSON
    python benchmarks/gpu_check.py --dry-run         # anywhere, CPU, < 1 minute
    python benchmarks/gpu_check.py --only precision,decode
    python benchmarks/gpu_check.py --dry-run --only demo   # the demo row also runs on CPU (~1 min)

Every row catches its own exceptions: a broken row is FAIL with a one-line reason and the
others still run; a row that cannot apply is SKIP with the reason. Exit status 1 if any row
FAILed, 2 for a usage error (no CUDA device without --dry-run). Progress is printed per row as it
goes; the table comes at the end, under a header line with the device, torch and CUDA versions.

The rows, in the order they run (cheap and essential first, the 500M compile last):

precision PRESET PRECISION -- presets 43m and 92m (their own vocabularies, 64,789 and 35,023
    tokens; batch, seq_len and activation checkpointing from the preset, grad_accum 1): fp32,
    then bf16-mixed, bf16-true and fp16-mixed, 30 optimizer steps each (dry run: 3) at the
    preset's peak learning rate held constant, from the same initial weights (same seed) on the
    same batches. The batches are random tokens drawn from a Zipf distribution (p ∝ 1/rank):
    the model learns it smoothly from ~ln(vocab) toward its entropy (ln(vocab) - 3.4 nats), a
    fresh batch each step, so a precision that trains wrongly ends at another loss. Steps go
    through the trainer's own pieces: prepare_model, build_optimizer, a GradScaler for
    fp16-mixed, optimizer_step (autocast_context inside). The loss before and after is the mean
    over 2 held-out batches, in the row's precision. FAIL if non-finite or if |final - fp32's
    final| > 0.1 nats (bf16-true: 0.25, see PRECISION_TOLERANCE); steps the non-finite guard or
    the loss scaler skipped are counted.
memory 92m -- torch.cuda.max_memory_allocated over building the model on the GPU and 3
    optimizer steps of the 92m preset as seed 2 trained it: seq 512 x batch 4, activation
    checkpointing, fp16-mixed. FAIL above 6 GiB (seed 2's RTX 3060). Dry run: "n/a (CPU)".
sft-packed bool-mask / block-mask -- SFT training steps on packed rows (`SFTBatches(mode=
    "pack")`, random conversations of 32..513 tokens, the first 40% prompt) on the 92m model,
    seq 512 x batch 8, in train.precision=auto (bf16-mixed on a bf16 GPU): `block_mask=False`
    (SDPA with the boolean (B, 1, T, T) mask), then `block_mask=True` (FlexAttention's
    BlockMask; the model compiles flex_attention on CUDA, so its first step compiles, untimed).
    tokens/s counts every position of the rows, the same rows for both. block-mask also reports
    the largest |loss difference| of the two paths over 3 batches with the same weights: FAIL
    above 1e-3 nats in bf16, 1e-5 in fp32. Dry run: FlexAttention has no CPU backward, so the
    block-mask row runs that forward comparison only.
decode greedy-match / batch 1 / batch 16 -- our engine (`infer.engine.Decoder`, as
    benchmarks/generate_throughput.py runs it) against transformers' LlamaForCausalLM.generate
    on the same 92m weights. greedy-match: 32 new tokens of one 16-token prompt must be
    identical. batch 1 / 16: 128 new tokens (dry run: 8) after one 16-token prompt or 16
    left-padded prompts of 8..23 tokens, tokens/s = new tokens / wall time with prefill, median
    of 3 alternating rounds after a warm-up; ratio ours / theirs. fp32 weights for both: what
    every loader of ours gives (`LLM.load` converts nothing), so this is the engine as used.
qlora 92m -- QLoRA SFT steps as `babyllama sft --qlora` builds them (`train.sft.with_lora`:
    NF4 base through bitsandbytes, LoRA r=8 on every linear layer, bf16 compute; the packed
    rows' attention `use_block_mask` picks: FlexAttention on CUDA), seq 512 x batch 4 with
    activation checkpointing: peak CUDA memory of 2 steps, and of the setup (the fp32 weights
    are on the GPU while they are quantized). Dry run: the same on CPU (bitsandbytes quantizes
    there too; boolean masks), memory n/a.
mfu MODEL eager -- tokens/s and model FLOPs utilisation of whole optimizer steps in
    train.precision=auto, no activation checkpointing: the 92m model at seq 512 x batch 32,
    and a ~500M model defined here (M500_MODEL: hidden 1280, 24 layers, 20 heads, intermediate
    3456, vocabulary 32,000 tied: 517M parameters by `parameter_counts()`) at seq 1024 x batch
    16. 3 warm-up + 10 timed steps. FLOPs per token: `Llama.flops_per_token` (6N + 12 L d T,
    PaLM appendix B). Peak: the GPU's data-sheet dense bf16 peak (KNOWN_PEAKS, by
    `torch.cuda.get_device_name()`), else the measured best of an 8192^3 bf16 matmul; the result
    says which, and shows the measured matmul either way.
torchrun ddp / fsdp -- `python -m torch.distributed.run --standalone --nproc_per_node 1 -m
    babyllama.cli pretrain` on a tokenizer and data set built here in a temp folder (generated
    Chinese sentences, the package's own train_tokenizer and prepare; nothing downloaded):
    the demo-cpu model with AdamW, 30 steps (dry run: 4) of 8 x 128, train.strategy left at its
    default (ddp: under torchrun even one process gets a process group and the DDP wrapper),
    then train.strategy=fsdp. OK needs rc 0, a finite last loss in metrics.jsonl and, for fsdp,
    the sharded checkpoint resume/dcp/. Step time: the median of the logged per-step token
    rates, the first step left out.
mfu MODEL compile -- the mfu rows again with train.compile (torch.compile of the model, as
    trainer.wrap_model does); the first step, which compiles, is untimed. Dry run:
    torch.compile(backend="eager"), which traces the model with Dynamo but generates no code.
demo -- `babyllama demo --minutes 1` (the GPU preset on a GPU) in a temp folder: rc, steps and
    the last held-out bits per character of pretraining and SFT, the skill check's
    accuracies and the total time, as it prints them. In a dry run it runs (as `--steps 2`)
    only when --only names it: its tokenizer, data and checks take ~60 s on 2 CPU cores
    whatever the steps (tests/test_demo.py covers the demo on CPU).

Estimated H200 wall time (ROW_ESTIMATE_S; no GPU was at hand to measure): startup ~10 s,
precision ~36 s for its 8 rows, memory ~5 s, sft-packed ~35 s (compiling flex_attention),
decode ~30 s, qlora ~10 s, mfu eager ~15 s, torchrun ~40 s, mfu 92m compile ~50 s, demo ~130 s
(60 s of training, then tokenizer, data, checks): ~6 minutes; then mfu 500m compile ~120 s (24
unrolled layers to compile), ~8 minutes in all. Compile times are the least certain part, so a
row starts only when its estimate fits in what is left of --budget-s (default 450 s): otherwise
it is SKIP with the time left, and `--only NAME` runs it on its own. Rows are printed as they
end and --json rewrites its file after each row, so a run cut short keeps what it did.

Test hook: `--fail-row NAME` (or GPU_CHECK_FAIL_ROW=NAME) raises inside that row, to check that
a broken row is marked FAIL and the exit status is 1 (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate_throughput import hf_generate, ours_generate  # noqa: E402
from train_throughput import hf_twin, matmul_peak, sync  # noqa: E402

from babyllama.config import LoraSection, RunConfig, copy_config, load_config  # noqa: E402
from babyllama.data.sft import SFTBatches, SFTExample  # noqa: E402
from babyllama.infer.engine import prepare_for_decoding  # noqa: E402
from babyllama.model.llama import Llama  # noqa: E402
from babyllama.train.distributed import DistInfo  # noqa: E402
from babyllama.train.trainer import (TrainSetup, autocast_context, build_optimizer, lm_loss,  # noqa: E402
                                     optimizer_step, prepare_model, resolve_precision, wrap_model)

GIB = 2 ** 30
# Dense bf16 tensor-core peaks (FLOP/s, fp32 accumulation, no sparsity) from NVIDIA's data
# sheets, by a substring of torch.cuda.get_device_name(); the first match wins, so the longer
# names come first ("L40S" before "L4", "H100 PCIe" before "H100").
KNOWN_PEAKS = [
    ("H200 NVL", 835e12), ("H200", 989e12),
    ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12),
    ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12),
    ("RTX 4090", 165e12), ("RTX 3090", 71e12),
]
# The dry run's model: every code path, a few milliseconds a step on one CPU thread.
TINY_MODEL = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
              "num_attention_heads": 4, "max_position_embeddings": 128}
TINY_TRAIN = {"seq_len": 64, "batch_size": 4}
# ~500M parameters (517M with this vocabulary, tied): the mfu rows' large model.
M500_MODEL = {"vocab_size": 32000, "hidden_size": 1280, "intermediate_size": 3456, "num_hidden_layers": 24,
              "num_attention_heads": 20, "num_key_value_heads": 20, "max_position_embeddings": 1024,
              "tie_word_embeddings": True}
# nats, |final loss - fp32's| after the precision rows' steps. bf16-true keeps no fp32 master
# weights: an update below 2^-8 of its weight rounds away, so it learns measurably slower by
# design (0.043 nats behind fp32 after 30 steps in a CPU trial at hidden 128, vocabulary 8,000,
# where bf16-mixed and fp16-mixed were within 1e-4); the looser bound still catches a broken path.
PRECISION_TOLERANCE = {"bf16-mixed": 0.1, "fp16-mixed": 0.1, "bf16-true": 0.25}
SFT_TOLERANCE = {"bf16-mixed": 1e-3, "fp16-mixed": 1e-3, "fp32": 1e-5}  # nats, bool vs block mask
MEMORY_BUDGET = 6 * GIB          # seed 2's 6 GB RTX 3060
DEFAULT_BUDGET_S = 450.0
# Estimated seconds of each row on an H200 (the module docstring adds them up): a row starts
# only when its estimate fits in what is left of --budget-s.
ROW_ESTIMATE_S = {"precision 43m": 6, "precision 92m": 3, "memory": 5, "sft-packed bool-mask": 5,
                  "sft-packed block-mask": 30, "decode": 10, "qlora": 10, "mfu 92m eager": 5,
                  "mfu 500m eager": 10, "torchrun": 20, "mfu 92m compile": 50, "demo": 130,
                  "mfu 500m compile": 120}


@dataclass(frozen=True)
class Sizes:
    """Step and token counts of a GPU run or a dry run."""
    precision_steps: int   # optimizer steps per precision
    warmup_steps: int      # untimed steps before a timed run
    timed_steps: int
    sft_examples: int
    decode_new_tokens: int
    decode_match_tokens: int
    decode_rounds: int
    torchrun_steps: int
    torchrun_timeout_s: int  # per torchrun command: a hung process group must not eat the budget
    demo_timeout_s: int


GPU_SIZES = Sizes(precision_steps=30, warmup_steps=3, timed_steps=10, sft_examples=600, decode_new_tokens=128,
                  decode_match_tokens=32, decode_rounds=3, torchrun_steps=30, torchrun_timeout_s=90, demo_timeout_s=240)
DRY_SIZES = Sizes(precision_steps=3, warmup_steps=1, timed_steps=2, sft_examples=60, decode_new_tokens=8,
                  decode_match_tokens=8, decode_rounds=1, torchrun_steps=4, torchrun_timeout_s=90, demo_timeout_s=300)


class Skip(Exception):
    """Raised by a row that cannot apply here; the message says why."""


@dataclass
class Outcome:
    """What a row found: `result` is the table cell, `numbers` go to the JSON."""
    result: str
    status: str = "OK"
    numbers: dict = field(default_factory=dict)


@dataclass
class Row:
    name: str                      # the table's first cell; its first word is the check (--only)
    config: str                    # what was run, in words
    run: Callable[[], Outcome]
    estimate_s: float              # on an H200, for the time budget

    @property
    def check(self) -> str:
        return self.name.split()[0]


class Context:
    """What the rows share: the device, the sizes, a temp folder, and results computed once
    (the fp32 reference losses, the decode models, the prepared data)."""

    def __init__(self, dry_run: bool, tmp: Path | None = None):
        self.dry_run = dry_run
        self.device = torch.device("cpu") if dry_run else torch.device("cuda", 0)
        self.sizes = DRY_SIZES if dry_run else GPU_SIZES
        self.tmp = tmp
        self._memo: dict = {}

    def once(self, key, fn):
        """fn()'s value, computed on the first call only; an exception is remembered too, so
        the rows that depend on a failed computation fail with its reason instead of redoing it."""
        if key not in self._memo:
            try:
                self._memo[key] = (True, fn())
            except Exception as e:  # noqa: BLE001 - remembered and re-raised to each caller
                self._memo[key] = (False, e)
        ok, value = self._memo[key]
        if not ok:
            raise value
        return value

    def peek(self, key):
        """What `once` computed for `key`, or None (not computed, or it raised)."""
        ok, value = self._memo.get(key, (False, None))
        return value if ok else None

    def forget(self, key) -> None:
        self._memo.pop(key, None)

    def end_check(self, check: str) -> None:
        """Drop the models a check's rows shared (memo key ("models", check)): later rows'
        memory peaks must not count them."""
        self.forget(("models", check))

    @property
    def auto_precision(self) -> str:
        """train.precision=auto here: bf16-mixed on a bf16 GPU, fp16-mixed on an older one, fp32 on CPU."""
        return resolve_precision("auto", self.device)

    def model_name(self, name: str) -> str:
        return f"tiny (dry run, in place of {name})" if self.dry_run else name


# ----------------------------------------------------------------------------------------
# Shared pieces: configs, data, the trainer's setup


def run_config(ctx: Context, preset: str, train: dict | None = None, model: dict | None = None) -> RunConfig:
    """`preset` with grad_accum 1 and the `train` / `model` overrides; in a dry run the tiny model
    and TINY_TRAIN's sizes replace the model and sizes."""
    values = {"train": {"grad_accum": 1, **(train or {})}}
    if model:
        values["model"] = dict(model)
    if ctx.dry_run:
        values["model"] = dict(TINY_MODEL)
        values["train"].update(TINY_TRAIN)
    return load_config(preset, values)


def build_model(cfg: RunConfig, device: torch.device, seed: int = 0) -> Llama:
    """The model, initialised on `device` (a 500M model's init is seconds on a CPU, nothing on a
    GPU); the same seed gives the same weights on the same device."""
    torch.manual_seed(seed)
    with torch.device(device):
        return Llama(cfg.model)


def train_setup(ctx: Context, cfg: RunConfig, model: torch.nn.Module, precision: str,
                compile_model: bool = False) -> TrainSetup:
    """What `trainer.train` builds before its loop, for one process: the model prepared for
    `precision` (activation checkpointing as cfg.train says), its optimizer, a loss scaler for
    fp16-mixed, and torch.compile as `wrap_model` applies it (a dry run compiles with the
    "eager" backend: Dynamo traces the model, nothing is code-generated, seconds not minutes)."""
    prepare_model(model, precision, ctx.device, cfg.train.activation_checkpointing)
    optimizer = build_optimizer(model, cfg.train)
    scaler = torch.amp.GradScaler(ctx.device.type) if precision == "fp16-mixed" else None
    info = DistInfo()
    forward_model, ddp_model = wrap_model(model, ctx.device, info, compile_model=compile_model and not ctx.dry_run)
    if compile_model and ctx.dry_run:
        forward_model = torch.compile(forward_model, backend="eager")
    return TrainSetup(cfg, model, forward_model, ddp_model, optimizer, scaler, precision, ctx.device, info)


def run_steps(setup: TrainSetup, data, first: int, n: int, lr: float) -> list:
    """`n` optimizer steps from step `first` at a constant learning rate; their StepResults."""
    results = []
    for step in range(first, first + n):
        for group in setup.optimizer.param_groups:  # as the trainer's loop sets it
            group["lr"] = lr * group.get("lr_scale", 1.0)
        results.append(optimizer_step(setup, data, step))
    return results


def timed_steps(ctx: Context, setup: TrainSetup, data, lr: float) -> tuple[float, list]:
    """Seconds per optimizer step over sizes.timed_steps steps after sizes.warmup_steps
    untimed ones, and the timed steps' results."""
    s = ctx.sizes
    run_steps(setup, data, 0, s.warmup_steps, lr)
    sync(ctx.device)
    t0 = time.perf_counter()
    results = run_steps(setup, data, s.warmup_steps, s.timed_steps, lr)
    sync(ctx.device)
    return (time.perf_counter() - t0) / s.timed_steps, results


class RandomBatches:
    """The trainer's data (`get(step, micro, device)`): `distinct` fixed batches of random token
    ids, (batch_size, seq_len) each, taken in turn by step (grad_accum 1).

    Ids are drawn independently from a Zipf distribution (p ∝ 1/rank over a random order of
    the vocabulary, as word frequencies roughly go): a model can learn it, from ln(vocab) down
    to its entropy (~ln(vocab) - 3.4 nats), smoothly and without memorising batches, so a
    precision that trains wrongly ends at a different loss, not at the same ln(vocab)."""

    def __init__(self, vocab_size: int, batch_size: int, seq_len: int, distinct: int = 2, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(vocab_size, generator=g)
        p = torch.zeros(vocab_size, dtype=torch.float64)
        p[order] = 1.0 / torch.arange(1, vocab_size + 1, dtype=torch.float64)
        self.entropy = float(-(p / p.sum() * (p / p.sum()).log()).sum())  # nats: the best loss possible
        self.windows = [torch.multinomial(p, batch_size * (seq_len + 1), replacement=True, generator=g)
                        .view(batch_size, seq_len + 1) for _ in range(distinct)]
        self._on_device: dict = {}

    def get(self, step: int, micro: int, device):
        i = (step + micro) % len(self.windows)
        if (i, str(device)) not in self._on_device:
            w = self.windows[i].to(device)
            self._on_device[(i, str(device))] = (w[:, :-1].contiguous(), w[:, 1:].contiguous(), {})
        return self._on_device[(i, str(device))]


def random_examples(n: int, vocab_size: int, max_len: int, seed: int = 0) -> list[SFTExample]:
    """`n` SFT examples of uniform random ids, lengths uniform in [max_len / 16, max_len]; the
    first 40% of each is the prompt (not a target), the rest the answer."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(max(3, max_len // 16), max_len + 1))
        ids = rng.integers(3, vocab_size, length).astype(np.int32)
        mask = np.zeros(length, dtype=bool)
        mask[max(1, int(0.4 * length)):] = True
        out.append(SFTExample(ids, mask))
    return out


def mean_loss(model, batches, precision: str, device) -> float:
    """Mean loss (nats per target) over `batches` of (x, y, extra), no gradients."""
    total = units = 0.0
    with torch.no_grad(), autocast_context(precision, device):
        for batch in batches:
            loss = lm_loss(model, batch)
            total += float(loss.total)
            units += float(loss.units)
    return total / units


def free_memory(device: torch.device) -> None:
    """Drop what earlier rows left (their models are unreferenced by now), so the next row's
    memory peak counts only its own tensors."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def precision_problem(precision: str, device: torch.device) -> str | None:
    """Why `precision` cannot run on `device` (None when it can)."""
    if device.type == "cuda" and "bf16" in precision and not torch.cuda.is_bf16_supported():
        return f"{torch.cuda.get_device_name(device)} has no bf16"
    return None


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def fmt_si(x: float, unit: str) -> str:
    """517e6, "" -> "517M"; 6.2e5, "FLOP" -> "0.62 MFLOP" (three significant digits)."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
        if x >= scale or scale == 1e6:
            return f"{x / scale:.3g}{' ' if unit else ''}{prefix}{unit}"
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------------------
# 1. Precisions


def precision_run(ctx: Context, preset: str, precision: str) -> dict:
    """Train the preset for sizes.precision_steps steps in `precision` (a new batch each step);
    the loss (nats) before and after on 2 held-out batches, and how many steps were skipped."""
    cfg = run_config(ctx, preset)
    t = cfg.train
    steps = ctx.sizes.precision_steps
    data = RandomBatches(cfg.model.vocab_size, t.batch_size, t.seq_len, distinct=steps + 2)
    held_out = [data.get(steps + i, 0, ctx.device) for i in range(2)]
    model = build_model(cfg, ctx.device)
    setup = train_setup(ctx, cfg, model, precision)
    initial = mean_loss(model, held_out, precision, ctx.device)
    results = run_steps(setup, data, 0, steps, t.lr)
    final = mean_loss(model, held_out, precision, ctx.device)
    return {"initial_loss": initial, "final_loss": final, "entropy": data.entropy,
            "skipped_steps": sum(not r.finite for r in results), "steps": len(results), "lr": t.lr}


def precision_row(ctx: Context, preset: str, precision: str) -> Outcome:
    problem = precision_problem(precision, ctx.device)
    if problem:
        raise Skip(problem)
    r = dict(ctx.once(("precision", preset, precision), lambda: precision_run(ctx, preset, precision)))
    skipped = f", {r['skipped_steps']} steps skipped" if r["skipped_steps"] else ""
    if not all(math.isfinite(r[k]) for k in ("initial_loss", "final_loss")):
        return Outcome(f"non-finite loss: {r['initial_loss']:.4g} -> {r['final_loss']:.4g}{skipped}", "FAIL", r)
    if precision == "fp32":
        return Outcome(f"loss {r['initial_loss']:.3f} -> {r['final_loss']:.3f} (the reference){skipped}", "OK", r)
    try:
        ref = ctx.once(("precision", preset, "fp32"), lambda: precision_run(ctx, preset, "fp32"))
    except Exception as e:
        raise RuntimeError(f"no fp32 reference: {one_line(e)}") from e
    diff, tolerance = r["final_loss"] - ref["final_loss"], PRECISION_TOLERANCE[precision]
    r.update(fp32_final_loss=ref["final_loss"], diff=diff, tolerance=tolerance)
    status = "OK" if abs(diff) <= tolerance else "FAIL"
    shown = diff if abs(diff) >= 5e-5 else 0.0  # no "-0.0000"
    return Outcome(f"loss {r['initial_loss']:.3f} -> {r['final_loss']:.3f}, fp32 {ref['final_loss']:.3f}: "
                   f"Δ {shown:+.4f} (tolerance ±{tolerance:g}){skipped}", status, r)


def precision_rows(ctx: Context) -> list[Row]:
    rows = []
    for preset in ("43m", "92m"):
        cfg = run_config(ctx, preset)
        t, m = cfg.train, cfg.model
        for precision in ("fp32", "bf16-mixed", "bf16-true", "fp16-mixed"):
            config = (f"{ctx.model_name(preset)}, vocab {m.vocab_size:,}, {ctx.sizes.precision_steps} steps of "
                      f"{t.batch_size}×{t.seq_len} Zipf tokens at lr {t.lr:g}, same init and batches for all")
            rows.append(Row(f"precision {preset} {precision}", config,
                            lambda p=preset, q=precision: precision_row(ctx, p, q),
                            ROW_ESTIMATE_S[f"precision {preset}"]))
    return rows


# ----------------------------------------------------------------------------------------
# 2. Model FLOPs utilisation


def peak_flops(ctx: Context) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from): the data-sheet dense bf16 peak of a known GPU, else
    the best measured matmul (bf16 on a GPU, fp32 on CPU). The measured matmul is always
    named, so the table shows how close the data sheet is to what a kernel reaches."""
    def measure():
        if ctx.device.type == "cuda":
            return matmul_peak(ctx.device, torch.bfloat16, n=8192) * 1e9
        return matmul_peak(ctx.device, torch.float32, n=256) * 1e9

    measured = ctx.once("matmul peak", measure)
    kind = "bf16" if ctx.device.type == "cuda" else "fp32"
    if ctx.device.type == "cuda":
        name = torch.cuda.get_device_name(ctx.device)
        for key, peak in KNOWN_PEAKS:
            if key in name:
                return peak, f"{key} data-sheet dense bf16 peak {peak / 1e12:.0f} TFLOP/s " \
                             f"(measured {kind} matmul {measured / 1e12:.0f})"
    unit, scale = ("TFLOP/s", 1e12) if measured >= 1e12 else ("GFLOP/s", 1e9)
    return measured, f"measured {kind} matmul peak {measured / scale:.1f} {unit}"


def mfu_config(ctx: Context, name: str) -> RunConfig:
    if name == "500m":
        return run_config(ctx, "92m", {"seq_len": 1024, "batch_size": 16, "activation_checkpointing": False},
                          M500_MODEL)
    return run_config(ctx, "92m", {"batch_size": 32, "activation_checkpointing": False})


def mfu_row(ctx: Context, name: str, compile_model: bool) -> Outcome:
    cfg = mfu_config(ctx, name)
    t = cfg.train
    precision = ctx.auto_precision
    model = build_model(cfg, ctx.device)
    params = model.parameter_counts()["total"]
    flops_per_token = model.flops_per_token(t.seq_len)
    setup = train_setup(ctx, cfg, model, precision, compile_model)
    data = RandomBatches(cfg.model.vocab_size, t.batch_size, t.seq_len)
    if compile_model:
        t0 = time.perf_counter()
        run_steps(setup, data, 0, 1, t.lr)  # compiles (forward and backward)
        compile_s = time.perf_counter() - t0
    step_s, results = timed_steps(ctx, setup, data, t.lr)
    if not all(r.finite for r in results):
        return Outcome(f"non-finite loss in the timed steps ({results[-1].loss})", "FAIL")
    tok_s = t.batch_size * t.seq_len / step_s
    peak, source = peak_flops(ctx)
    mfu = tok_s * flops_per_token / peak
    compiled = f"; first step (compiling) {compile_s:.0f} s" if compile_model else ""
    numbers = {"params": params, "tokens_per_s": tok_s, "step_s": step_s, "flops_per_token": flops_per_token,
               "mfu": mfu, "peak_flops": peak, "peak_source": source, "precision": precision,
               **({"compile_s": compile_s} if compile_model else {})}
    return Outcome(f"{fmt_rate(tok_s)} tok/s, MFU {mfu:.1%} ({fmt_si(params, '')} params, "
                   f"{fmt_si(flops_per_token, 'FLOP')}/token; vs {source}){compiled}", "OK", numbers)


def mfu_rows(ctx: Context, compile_model: bool) -> list[Row]:
    rows = []
    kind = "compile" if compile_model else "eager"
    for name in ("92m", "500m"):
        cfg = mfu_config(ctx, name)
        t = cfg.train
        how = ("torch.compile(backend='eager') (dry run: traced, not code-generated)" if ctx.dry_run
               else "train.compile (torch.compile, as wrap_model)") if compile_model else "no compile"
        config = (f"{ctx.model_name(name)}, {t.batch_size}×{t.seq_len}, {ctx.auto_precision}, {how}, "
                  f"{ctx.sizes.timed_steps} timed steps")
        rows.append(Row(f"mfu {name} {kind}", config, lambda n=name: mfu_row(ctx, n, compile_model),
                        ROW_ESTIMATE_S[f"mfu {name} {kind}"]))
    return rows


# ----------------------------------------------------------------------------------------
# 3. Memory


def memory_row(ctx: Context) -> Outcome:
    cfg = run_config(ctx, "92m")  # seq 512, batch 4, activation checkpointing: seed 2's setting
    t = cfg.train
    free_memory(ctx.device)
    model = build_model(cfg, ctx.device)
    setup = train_setup(ctx, cfg, model, "fp16-mixed")
    results = run_steps(setup, RandomBatches(cfg.model.vocab_size, t.batch_size, t.seq_len), 0, 3, t.lr)
    if not math.isfinite(results[-1].loss):
        return Outcome(f"non-finite loss {results[-1].loss}", "FAIL")
    if ctx.device.type != "cuda":
        return Outcome(f"n/a (CPU); 3 steps ran, loss {results[-1].loss:.3f}", "OK")
    peak = torch.cuda.max_memory_allocated(ctx.device)
    reserved = torch.cuda.max_memory_reserved(ctx.device)
    status = "OK" if peak <= MEMORY_BUDGET else "FAIL"
    return Outcome(f"peak allocated {peak / GIB:.2f} GiB (budget {MEMORY_BUDGET / GIB:.0f} GiB), "
                   f"reserved {reserved / GIB:.2f} GiB", status,
                   {"peak_allocated": peak, "peak_reserved": reserved})


def memory_rows(ctx: Context) -> list[Row]:
    cfg = run_config(ctx, "92m")
    t = cfg.train
    config = (f"{ctx.model_name('92m')}, {t.batch_size}×{t.seq_len}, activation checkpointing, fp16-mixed, "
              "3 steps")
    return [Row("memory 92m", config, lambda: memory_row(ctx), ROW_ESTIMATE_S["memory"])]


# ----------------------------------------------------------------------------------------
# 4. Packed SFT attention: boolean mask vs FlexAttention block mask


def sft_config(ctx: Context) -> RunConfig:
    return run_config(ctx, "92m", {"batch_size": 8, "activation_checkpointing": False})


def sft_batches(ctx: Context, cfg: RunConfig, block_mask: bool) -> SFTBatches:
    """Packed SFT batches of random conversations, with FlexAttention's BlockMask
    (`block_mask`) or the boolean mask; the same rows either way (same examples, same seed)."""
    t = cfg.train
    examples = random_examples(ctx.sizes.sft_examples, cfg.model.vocab_size, t.seq_len + 1)
    return SFTBatches(examples, seq_len=t.seq_len, batch_size=t.batch_size, grad_accum=1, seed=0, pad_id=0,
                      mode="pack", block_mask=block_mask)


def check_mask_kind(batch, block_mask: bool) -> None:
    """Raise unless the batch's attn_mask is what the path should give (a BlockMask, or a
    boolean tensor): a path that silently fell back would measure the other one."""
    mask = batch[2].get("attn_mask")
    if block_mask:
        from torch.nn.attention.flex_attention import BlockMask
        if not isinstance(mask, BlockMask):
            raise RuntimeError(f"block_mask=True gave attn_mask of type {type(mask).__name__}, not a BlockMask")
    elif not (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool):
        raise RuntimeError(f"the boolean path gave attn_mask {type(mask).__name__}")


class FullBatches:
    """`data` (SFTBatches, grad_accum 1) without the batches of fewer rows than batch_size (the
    end of an epoch's packing): a new batch shape inside the timed steps would recompile the
    compiled flex_attention (dynamic=False) and time the compiler."""

    def __init__(self, data: SFTBatches, full: list[int]):
        self.data, self.full = data, full

    def get(self, step: int, micro: int, device):
        return self.data.get(self.full[step % len(self.full)], micro, device)


def full_batch_steps(ctx: Context, cfg: RunConfig) -> list[int]:
    """The steps of the first epoch whose packed batch has all batch_size rows (read from the
    boolean-mask twin on CPU: the same rows, no block masks to build)."""
    plain = sft_batches(ctx, cfg, False)
    full = [g for g in range(plain.batches_per_epoch) if plain.get(g, 0, "cpu")[0].shape[0] == cfg.train.batch_size]
    if not full:
        raise RuntimeError(f"no packed batch of {cfg.train.batch_size} rows: too few examples")
    return full


def sft_train_rate(ctx: Context, block_mask: bool) -> dict:
    cfg = sft_config(ctx)
    t = cfg.train
    data = FullBatches(sft_batches(ctx, cfg, block_mask), full_batch_steps(ctx, cfg))
    check_mask_kind(data.get(0, 0, ctx.device), block_mask)
    model = build_model(cfg, ctx.device)
    setup = train_setup(ctx, cfg, model, ctx.auto_precision)
    step_s, results = timed_steps(ctx, setup, data, t.lr)
    if not all(r.finite for r in results):
        raise RuntimeError(f"non-finite loss in the timed steps ({results[-1].loss})")
    return {"tokens_per_s": t.batch_size * t.seq_len / step_s, "step_s": step_s, "fill": data.data.fill}


def sft_bool_row(ctx: Context) -> Outcome:
    r = ctx.once("sft bool", lambda: sft_train_rate(ctx, False))
    return Outcome(f"{fmt_rate(r['tokens_per_s'])} tok/s (rows {r['fill']:.0%} full)", "OK", r)


def sft_block_row(ctx: Context) -> Outcome:
    cfg = sft_config(ctx)
    precision = ctx.auto_precision
    # The same weights and the same packed rows through both paths, before any training.
    plain, flex = sft_batches(ctx, cfg, False), sft_batches(ctx, cfg, True)
    model = build_model(cfg, ctx.device)
    prepare_model(model, precision, ctx.device, False)
    diffs = []
    for step in range(3):
        a, b = plain.get(step, 0, ctx.device), flex.get(step, 0, ctx.device)
        check_mask_kind(b, True)
        if not (torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])):
            raise RuntimeError(f"batch {step}: the two paths packed different rows")
        diffs.append(abs(mean_loss(model, [a], precision, ctx.device) - mean_loss(model, [b], precision, ctx.device)))
    del model
    diff, tolerance = max(diffs), SFT_TOLERANCE[precision]
    status = "OK" if diff <= tolerance else "FAIL"
    agreement = f"max |Δloss| {diff:.2e} over 3 batches (tolerance {tolerance:g})"
    if ctx.device.type != "cuda":
        # FlexAttention's backward is CUDA-only: on CPU the forward above is all that can run.
        return Outcome(f"training n/a on CPU (no FlexAttention backward); {agreement}", status,
                       {"max_loss_diff": diff, "tolerance": tolerance})
    r = {**sft_train_rate(ctx, True), "max_loss_diff": diff, "tolerance": tolerance}
    plain_rate = ctx.peek("sft bool")  # None when the boolean row failed or did not run
    ratio = f", {r['tokens_per_s'] / plain_rate['tokens_per_s']:.2f}x the boolean mask's" if plain_rate else ""
    return Outcome(f"{fmt_rate(r['tokens_per_s'])} tok/s{ratio}; {agreement}", status, r)


def sft_rows(ctx: Context) -> list[Row]:
    cfg = sft_config(ctx)
    t = cfg.train
    base = (f"{ctx.model_name('92m')}, packed {t.batch_size}×{t.seq_len}, {ctx.sizes.sft_examples} random "
            f"conversations, {ctx.auto_precision}, {ctx.sizes.timed_steps} timed steps")
    return [Row("sft-packed bool-mask", f"{base}, boolean (B,1,T,T) mask", lambda: sft_bool_row(ctx),
                ROW_ESTIMATE_S["sft-packed bool-mask"]),
            Row("sft-packed block-mask", f"{base}, FlexAttention BlockMask", lambda: sft_block_row(ctx),
                ROW_ESTIMATE_S["sft-packed block-mask"])]


# ----------------------------------------------------------------------------------------
# 5. Decoding: our engine vs transformers' generate


def decode_models(ctx: Context):
    """(ours, transformers' twin) with the same random weights on the device, in fp32: the
    weights' dtype every loader of ours gives (`LLM.load`, `babyllama generate`, the server)."""
    cfg = run_config(ctx, "92m")
    torch.manual_seed(0)
    ours = Llama(cfg.model).eval()
    theirs = hf_twin(ours)
    theirs.config.use_cache = True
    theirs.generation_config.use_cache = True
    ours, theirs = ours.to(ctx.device), theirs.to(ctx.device).eval()
    prepare_for_decoding(ours)  # as LLM.load does (a no-op on a GPU)
    return ours, theirs


def decode_prompts(vocab_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """One 16-token prompt, and 16 prompts of 8..23 tokens (benchmarks/generate_throughput.py's)."""
    g = torch.Generator().manual_seed(1)
    one = [torch.randint(3, vocab_size, (16,), generator=g).tolist()]
    sixteen = [torch.randint(3, vocab_size, (8 + i,), generator=g).tolist() for i in range(16)]
    return one, sixteen


def greedy_match_row(ctx: Context) -> Outcome:
    ours, theirs = ctx.once(("models", "decode"), lambda: decode_models(ctx))
    one, _ = decode_prompts(ours.config.vocab_size)
    n = ctx.sizes.decode_match_tokens
    a, b = ours_generate(ours, one, n)[0], hf_generate(theirs, one, n, ctx.device)[0]
    if a == b:
        return Outcome(f"{n} greedy tokens identical (fp32)", "OK")
    first = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y) if len(a) == len(b) else min(len(a), len(b))
    return Outcome(f"differ from new token {first}: ours {a[first:first + 4]} vs transformers {b[first:first + 4]}",
                   "FAIL")


def decode_rates(ctx: Context) -> dict:
    """Median tokens/s of ours and transformers at batch 1 and 16, alternating each round."""
    ours, theirs = ctx.once(("models", "decode"), lambda: decode_models(ctx))
    one, sixteen = decode_prompts(ours.config.vocab_size)
    n = ctx.sizes.decode_new_tokens
    runs = {"ours": lambda p: ours_generate(ours, p, n),
            "transformers": lambda p: hf_generate(theirs, p, n, ctx.device)}
    for fn in runs.values():  # warm-up: kernels, caches, transformers' first-call setup
        fn(one)
    times = {(name, b): [] for name in runs for b in (1, 16)}
    for _ in range(ctx.sizes.decode_rounds):
        for batch, prompts in ((1, one), (16, sixteen)):
            for name, fn in runs.items():
                sync(ctx.device)
                t0 = time.perf_counter()
                fn(prompts)
                sync(ctx.device)
                times[(name, batch)].append(time.perf_counter() - t0)
    return {f"{name} batch {b}": b * n / statistics.median(ts) for (name, b), ts in times.items()}


def decode_rate_row(ctx: Context, batch: int) -> Outcome:
    r = ctx.once("decode rates", lambda: decode_rates(ctx))
    ours, theirs = r[f"ours batch {batch}"], r[f"transformers batch {batch}"]
    return Outcome(f"ours {fmt_rate(ours)} tok/s, transformers {fmt_rate(theirs)} tok/s: {ours / theirs:.2f}x",
                   "OK", {"ours_tokens_per_s": ours, "transformers_tokens_per_s": theirs, "ratio": ours / theirs})


def decode_rows(ctx: Context) -> list[Row]:
    name = ctx.model_name("92m")
    n, rounds = ctx.sizes.decode_new_tokens, ctx.sizes.decode_rounds
    timing = f"greedy, {n} new tokens, fp32, median of {rounds} round{'s' * (rounds > 1)}"
    return [Row("decode greedy-match", f"{name}, one 16-token prompt, {ctx.sizes.decode_match_tokens} new tokens, "
                "fp32, ours vs transformers", lambda: greedy_match_row(ctx), ROW_ESTIMATE_S["decode"]),
            Row("decode batch 1", f"{name}, one 16-token prompt, {timing}", lambda: decode_rate_row(ctx, 1),
                ROW_ESTIMATE_S["decode"]),
            Row("decode batch 16", f"{name}, 16 left-padded prompts of 8..23 tokens, {timing}",
                lambda: decode_rate_row(ctx, 16), ROW_ESTIMATE_S["decode"])]


# ----------------------------------------------------------------------------------------
# 6. QLoRA memory


def qlora_row(ctx: Context) -> Outcome:
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None or importlib.util.find_spec("peft") is None:
        raise Skip("QLoRA needs bitsandbytes and peft (pip install 'babyllama[bnb,lora]')")
    from babyllama.train.sft import use_block_mask, with_lora

    precision = ctx.auto_precision
    compute = {"bf16-mixed": "bf16", "fp16-mixed": "fp16"}.get(precision, "fp32")
    cfg = run_config(ctx, "92m")
    cfg = copy_config(cfg, stage="sft", lora=LoraSection(enabled=True, qlora=True, compute_dtype=compute))
    t = cfg.train
    free_memory(ctx.device)
    torch.manual_seed(0)
    model = Llama(cfg.model)  # on CPU, then moved by with_lora, as train.sft.finetune_model does
    model = with_lora(model, cfg, ctx.device, verbose=False)
    setup = train_setup(ctx, cfg, model, precision)
    data = SFTBatches(random_examples(ctx.sizes.sft_examples, cfg.model.vocab_size, t.seq_len + 1),
                      seq_len=t.seq_len, batch_size=t.batch_size, grad_accum=1, seed=0, pad_id=0, mode="pack",
                      block_mask=use_block_mask(cfg, ctx.device))  # as run_sft picks (flex on CUDA)
    on_gpu = ctx.device.type == "cuda"
    setup_peak = torch.cuda.max_memory_allocated(ctx.device) if on_gpu else 0
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    results = run_steps(setup, data, 0, 2, t.lr)
    if not all(r.finite for r in results):
        return Outcome(f"non-finite loss {results[-1].loss}", "FAIL")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not on_gpu:
        return Outcome(f"n/a (CPU); 2 steps ran, loss {results[-1].loss:.3f}, {trainable:,} trainable", "OK")
    step_peak = torch.cuda.max_memory_allocated(ctx.device)
    return Outcome(f"step peak {step_peak / GIB:.2f} GiB, setup peak {setup_peak / GIB:.2f} GiB "
                   f"(fp32 weights on the GPU while quantizing); {trainable:,} trainable", "OK",
                   {"step_peak_allocated": step_peak, "setup_peak_allocated": setup_peak, "trainable": trainable})


def qlora_rows(ctx: Context) -> list[Row]:
    cfg = run_config(ctx, "92m")
    t = cfg.train
    config = (f"{ctx.model_name('92m')}, NF4 base + LoRA r=8 on all linear layers, {ctx.auto_precision}, "
              f"packed {t.batch_size}×{t.seq_len} ({'boolean mask' if ctx.dry_run else 'FlexAttention'}, as "
              "run_sft picks), activation checkpointing, 2 steps")
    return [Row("qlora 92m", config, lambda: qlora_row(ctx), ROW_ESTIMATE_S["qlora"])]


# ----------------------------------------------------------------------------------------
# 7. DDP and FSDP under torchrun

PHRASES = ["今天天气很好", "我们去公园散步", "中国的经济发展很快", "人民生活水平不断提高", "这个手机的屏幕很大",
           "电池也很耐用", "机器学习很有意思", "自然语言处理", "房间很干净", "服务也很周到", "下次还会再来",
           "新年献词", "迈向新世纪", "学生们在教室里读书", "老师讲得很清楚", "火车站人很多", "春天来了",
           "花开得很漂亮", "价格不贵", "早餐有点少"]


def torchrun_data(ctx: Context) -> Path:
    """A tokenizer and prepared shards of generated sentences, in the temp folder."""
    from babyllama.data.shards import prepare
    from babyllama.tokenizer import train_tokenizer

    rng = np.random.default_rng(0)
    lines = ["，".join(rng.choice(PHRASES, size=int(rng.integers(2, 7)))) + "。" for _ in range(3000)]
    text = ctx.tmp / "corpus.txt"
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tok = train_tokenizer(lines, 512, show_progress=False)
    out = ctx.tmp / "data"
    prepare([str(text)], tok, out, val_fraction=0.02, workers=1, progress=False)
    return out


def run_command(cmd: list[str], timeout_s: int) -> tuple[subprocess.CompletedProcess, float]:
    """Run `cmd` with its output captured; (the finished process, wall seconds). Raises
    RuntimeError (one line, without the long command) when it runs past `timeout_s`."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"timed out after {timeout_s} s") from None
    return proc, time.perf_counter() - t0


def last_error_line(text: str) -> str:
    """The line of a failed command's output that says why: its `error:` line, else the
    last line of a traceback, else its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:") or re.match(r"^\w+(\.\w+)*(Error|Exception)\b", line):
            return line[:300]
    return lines[-1][:300] if lines else "(no output)"


def torchrun_row(ctx: Context, strategy: str) -> Outcome:
    data = ctx.once("torchrun data", lambda: torchrun_data(ctx))
    out = ctx.tmp / f"run-{strategy}"
    steps = ctx.sizes.torchrun_steps
    overrides = ["train.optimizer=adamw", "train.seq_len=128", "train.batch_size=8", f"train.max_steps={steps}",
                 "train.warmup_steps=0", "train.log_every=1", "train.eval_every=0", "train.eval_batches=2",
                 "train.save_every=1000", "train.sample_prompts=[]"]
    if strategy != "ddp":  # ddp: the default, left unset
        overrides.append(f"train.strategy={strategy}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "babyllama.cli", "pretrain", "--preset", "demo-cpu", "--data", str(data), "-o", str(out), *overrides]
    proc, wall = run_command(cmd, ctx.sizes.torchrun_timeout_s)
    if proc.returncode != 0:
        return Outcome(f"rc {proc.returncode}: {last_error_line(proc.stderr + proc.stdout)}", "FAIL")
    metrics = out / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    train_records = [r for r in records if "loss" in r and "tok_per_s" in r]
    if not train_records or not math.isfinite(train_records[-1]["loss"]):
        return Outcome(f"rc 0 but no finite training loss in {metrics.name}", "FAIL")
    if strategy == "fsdp" and not (out / "resume" / "dcp" / ".metadata").exists():
        return Outcome("rc 0 but no sharded checkpoint resume/dcp/: was FSDP used?", "FAIL")
    # tok_per_s of each logged step (log_every=1); the first step carries the warm-up.
    rates = [r["tok_per_s"] for r in train_records[1:] if r["tok_per_s"] > 0] or [train_records[0]["tok_per_s"]]
    step_ms = 1000 * 8 * 128 / statistics.median(rates)
    loss = train_records[-1]["loss"]
    return Outcome(f"rc 0, loss {train_records[0]['loss']:.3f} -> {loss:.3f} in {train_records[-1]['step']} steps, "
                   f"step {step_ms:.1f} ms, {wall:.0f} s with startup", "OK",
                   {"step_ms": step_ms, "final_loss": loss, "wall_s": wall})


def torchrun_rows(ctx: Context) -> list[Row]:
    base = (f"torchrun --standalone --nproc_per_node 1, demo-cpu model, adamw, {ctx.sizes.torchrun_steps} steps "
            f"of 8×128 on data built here, precision auto")
    return [Row("torchrun ddp", f"{base}, train.strategy default (ddp: a process group of one, DDP wrapper)",
                lambda: torchrun_row(ctx, "ddp"), ROW_ESTIMATE_S["torchrun"]),
            Row("torchrun fsdp", f"{base}, train.strategy=fsdp", lambda: torchrun_row(ctx, "fsdp"),
                ROW_ESTIMATE_S["torchrun"])]


# ----------------------------------------------------------------------------------------
# 8. The demo

VAL_LINE = re.compile(r"step (\d+): val loss ([\d.]+)\s+ppl [\d.]+\s+acc [\d.]+%\s+bpc ([\d.]+)")


def demo_summary(stdout: str) -> dict:
    """The final numbers `babyllama demo` prints: per training stage the last evaluation's
    step and bits per character, the skill check's accuracies, the total minutes. Raises
    ValueError when the pretraining numbers are missing."""
    def section(start: str, end: str) -> str:
        i = stdout.find(start)
        j = stdout.find(end, i + 1) if i >= 0 else -1
        return stdout[i:j if j >= 0 else None] if i >= 0 else ""

    out = {}
    for stage, start, end in (("pretrain", "=== 3/6 pretrain", "=== 4/6"), ("sft", "=== 4/6 sft", "=== 5/6")):
        found = VAL_LINE.findall(section(start, end))
        if found:
            step, loss, bpc = found[-1]
            out[stage] = {"step": int(step), "val_loss": float(loss), "val_bpc": float(bpc)}
    if "pretrain" not in out:
        raise ValueError("no pretraining evaluation line (step N: val loss ... bpc ...) in the demo's output")
    for label, key in (("classification", "classification"), ("written reviews", "written")):
        m = re.search(rf"^\| {label}[^|]*\| \d+ \| ([\d.]+) \|", stdout, re.M)
        if m:
            out[key] = float(m.group(1))
    m = re.search(r"^done in ([\d.]+) minutes", stdout, re.M)
    if m:
        out["minutes"] = float(m.group(1))
    return out


def demo_result(s: dict) -> str:
    parts = [f"pretrain {s['pretrain']['step']:,} steps, val bpc {s['pretrain']['val_bpc']:.3f}"]
    if "sft" in s:
        parts.append(f"SFT {s['sft']['step']:,} steps, val bpc {s['sft']['val_bpc']:.3f}")
    if "classification" in s:
        parts.append(f"classification {s['classification']:.3f}")
    if "written" in s:
        parts.append(f"written reviews {s['written']:.3f}")
    if "minutes" in s:
        parts.append(f"done in {s['minutes']:.1f} min")
    return "; ".join(parts)


def demo_row(ctx: Context, selected: bool) -> Outcome:
    if ctx.dry_run and not selected:
        raise Skip("dry run: its tokenizer, data and checks take ~60 s on 2 CPU cores whatever the steps; "
                   "`--dry-run --only demo` runs it")
    flags = ["--steps", "2", "--minutes", "1"] if ctx.dry_run else ["--minutes", "1"]
    cmd = [sys.executable, "-m", "babyllama.cli", "demo", *flags, "-o", str(ctx.tmp / "demo")]
    proc, wall = run_command(cmd, ctx.sizes.demo_timeout_s)
    if proc.returncode != 0:
        return Outcome(f"rc {proc.returncode}: {last_error_line(proc.stderr + proc.stdout)}", "FAIL")
    summary = demo_summary(proc.stdout)
    return Outcome(f"rc 0; {demo_result(summary)} ({wall:.0f} s wall)", "OK", {**summary, "wall_s": wall})


def demo_rows(ctx: Context, only: set[str]) -> list[Row]:
    selected = "demo" in only
    flags = "--steps 2 --minutes 1 (dry run)" if ctx.dry_run else "--minutes 1"
    return [Row("demo", f"babyllama demo {flags}, on {'CPU' if ctx.dry_run else 'the GPU preset'}",
                lambda: demo_row(ctx, selected), ROW_ESTIMATE_S["demo"])]


# ----------------------------------------------------------------------------------------
# The run


def plan(ctx: Context, only: set[str] | None = None) -> list[Row]:
    """Every row, in the order they run; `only` (check or row names) keeps those."""
    only = only or set()
    rows = (precision_rows(ctx) + memory_rows(ctx) + sft_rows(ctx) + decode_rows(ctx) + qlora_rows(ctx)
            + mfu_rows(ctx, compile_model=False) + torchrun_rows(ctx))
    compiled = mfu_rows(ctx, compile_model=True)
    # The 92m compile says whether train.compile works at all; the 500m one, the least
    # predictable in time, goes last, where the budget can leave it out.
    rows += compiled[:1] + demo_rows(ctx, only) + compiled[1:]
    if only:
        rows = [r for r in rows if r.check in only or r.name in only]
    return rows


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def run_row(ctx: Context, row: Row, fail_row: str | None) -> tuple[Outcome, float]:
    """The row's outcome (FAIL with the exception's first line if it raised) and its seconds."""
    t0 = time.perf_counter()
    try:
        if fail_row and row.name == fail_row:
            raise RuntimeError("forced failure (test hook --fail-row / GPU_CHECK_FAIL_ROW)")
        outcome = row.run()
    except Skip as e:
        outcome = Outcome(str(e), "SKIP")
    except Exception as e:  # noqa: BLE001 - a row's failure is a table cell, not the end of the run
        outcome = Outcome(one_line(e), "FAIL")
    finally:
        if row.name.endswith("compile"):
            torch._dynamo.reset()  # the next compiled model starts with clean caches and guards
        free_memory(ctx.device)
    return outcome, time.perf_counter() - t0


def header(ctx: Context) -> str:
    versions = f"torch {torch.__version__}"
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        device = (f"{torch.cuda.get_device_name(ctx.device)} ({props.total_memory / GIB:.0f} GiB, "
                  f"compute capability {props.major}.{props.minor})")
        versions += f", CUDA {torch.version.cuda}"
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), dry run"
        versions += f", CUDA {torch.version.cuda or 'none (CPU build)'}"
    try:
        import transformers
        versions += f", transformers {transformers.__version__}"
    except ImportError:
        pass
    return f"device: {device}; {versions}; python {platform.python_version()}"


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(rows: list[tuple[Row, Outcome]]) -> str:
    lines = ["| check | config | result | status |", "|---|---|---|---|"]
    lines += [f"| {r.name} | {cell(r.config)} | {cell(o.result)} | {o.status} |" for r, o in rows]
    return "\n".join(lines)


def write_json(path: str, head: str, ctx: Context, done: list[tuple[Row, Outcome, float]]) -> None:
    data = {"header": head, "dry_run": ctx.dry_run, "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu",
            "rows": [{"name": r.name, "config": r.config, "result": o.result, "status": o.status,
                      "seconds": round(s, 2), "numbers": o.numbers} for r, o, s in done]}
    Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, a few steps: the same code paths")
    p.add_argument("--only", default="", metavar="NAME[,NAME]",
                   help="run only these checks (precision, memory, sft-packed, decode, qlora, mfu, torchrun, demo) "
                        "or rows (as named in the table)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows here (after each row)")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"start no row whose estimated seconds exceed what is left (default {DEFAULT_BUDGET_S:g} "
                        "on a GPU, none in a dry run)")
    p.add_argument("--fail-row", default=os.environ.get("GPU_CHECK_FAIL_ROW"), metavar="NAME",
                   help="test hook: raise inside this row (also GPU_CHECK_FAIL_ROW)")
    args = p.parse_args(argv)
    t_start = time.perf_counter()

    if not args.dry_run and not torch.cuda.is_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else "torch sees no GPU"
        print(f"error: no CUDA device ({why}); --dry-run checks the code paths on CPU", file=sys.stderr)
        return 2
    only = {name.strip() for name in args.only.split(",") if name.strip()}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        ctx = Context(args.dry_run, Path(tmp))
        every = plan(ctx)
        known = {r.check for r in every} | {r.name for r in every}
        if only - known:
            print(f"error: --only {', '.join(sorted(only - known))}: no such check or row; checks: "
                  f"{', '.join(dict.fromkeys(r.check for r in every))}", file=sys.stderr)
            return 2
        rows = plan(ctx, only)
        budget = args.budget_s if args.budget_s is not None else (0 if args.dry_run else DEFAULT_BUDGET_S)
        head = header(ctx)
        print(head, flush=True)
        done: list[tuple[Row, Outcome, float]] = []
        for i, row in enumerate(rows, 1):
            left = budget - (time.perf_counter() - t_start)
            if budget and row.estimate_s > left:
                outcome, seconds = Outcome(f"not started: ~{row.estimate_s:.0f} s needed, {max(0, left):.0f} s of "
                                           f"--budget-s {budget:g} left (run it with --only)", "SKIP"), 0.0
            else:
                print(f"[{i}/{len(rows)}] {row.name} ...", flush=True)
                outcome, seconds = run_row(ctx, row, args.fail_row)
            print(f"[{i}/{len(rows)}] {row.name}: {outcome.status}  {outcome.result}  ({seconds:.1f} s)", flush=True)
            if i == len(rows) or rows[i].check != row.check:
                ctx.end_check(row.check)
                free_memory(ctx.device)
            done.append((row, outcome, seconds))
            if args.json:
                write_json(args.json, head, ctx, done)
    print()
    print(head)
    print()
    print(table([(r, o) for r, o, _ in done]))
    failed = [r.name for r, o, _ in done if o.status == "FAIL"]
    print(f"\n{len(done)} rows in {time.perf_counter() - t_start:.0f} s: "
          f"{sum(o.status == 'OK' for _, o, _ in done)} OK, {len(failed)} FAIL, "
          f"{sum(o.status == 'SKIP' for _, o, _ in done)} SKIP", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
