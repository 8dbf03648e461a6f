"""The one training loop, shared by pretraining, SFT and preference tuning.

What differs between those stages is only the data (`train_data.get(step, micro, device)`
returns inputs, targets with -100 where a token must not count, and extra model arguments such
as a packed batch's attention mask), the evaluation set and how samples are prompted;
precision, accumulation, clipping, schedules, the non-finite guard, evaluation, samples,
logging, checkpoints and DDP all live here.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from babyllama.config import RunConfig
from babyllama.errors import UserError
from babyllama.eval.report import default_name, write_result
from babyllama.eval.scoring import target_scores, wide_float
from babyllama.eval.tasks import run_task, task_options
from babyllama.infer.config import GenerationConfig
from babyllama.infer.generate import generate_text
from babyllama.train.checkpoint import find_resume_dir, load_resume, publish_weights, save_resume
from babyllama.train.distributed import DistInfo, all_reduce_sum
from babyllama.train.metrics import MetricsLog, plot_loss
from babyllama.train.schedule import lr_at


class TrainData(Protocol):
    def get(self, step: int, micro: int, device) -> tuple[torch.Tensor, torch.Tensor, dict]: ...


@dataclass
class EvalSet:
    """Fixed evaluation batches, with the characters and UTF-8 bytes their targets spell
    (for bits per character / byte, which compare models across tokenizers)."""
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    chars: int
    bytes: int

    @classmethod
    def from_windows(cls, windows, batch_size: int, tokenizer) -> "EvalSet":
        w = torch.as_tensor(windows, dtype=torch.long)
        batches = [(w[i:i + batch_size, :-1], w[i:i + batch_size, 1:]) for i in range(0, len(w), batch_size)]
        # Decoding window by window can split a character at the edges; that miscounts at most
        # one character per window, which is noise next to thousands of characters.
        texts = [tokenizer.decode(row.tolist()) for row in w[:, 1:]]
        return cls(batches, sum(len(t) for t in texts), sum(len(t.encode("utf-8")) for t in texts))


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        if precision != "fp32" and device.type == "cpu":
            # Allowed (it works), but warn: this CPU has no fast bf16 matmul.
            print(f"note: {precision} on CPU is much slower than fp32 on CPUs without AMX/AVX-512-BF16")
        return precision
    if device.type == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "fp16-mixed"
    return "fp32"


def autocast_context(precision: str, device: torch.device):
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16-mixed":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    # Decay matrices (projections, embeddings); never norms' gains: shrinking them toward 0
    # only fights the normalisation.
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("train.optimizer=adamw8bit needs bitsandbytes: pip install 'babyllama[bnb]'") from None
        return bnb.optim.AdamW8bit(groups, **kwargs)
    on_cuda = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, fused=on_cuda or None, **kwargs)


@torch.no_grad()
def evaluate(model, eval_set: EvalSet, device, precision: str, info: DistInfo) -> dict:
    """Loss, perplexity, next-token accuracy and bits per character/byte on the eval set, by
    the scoring `babyllama eval --task lm` uses. Batches are split across ranks and the sums
    reduced, so DDP evaluates each window once.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=wide_float(device), device=device)  # nats, tokens, correct
    for i, (x, y) in enumerate(eval_set.batches):
        if i % info.world_size != info.rank:
            continue
        x, y = x.to(device), y.to(device)
        with autocast_context(precision, device):
            nats, n, correct = target_scores(model, x, y)
        sums[0] += nats.sum()
        sums[1] += n.sum()
        sums[2] += correct.sum()
    all_reduce_sum(sums, info)
    model.train(was_training)
    nats, n, correct = sums.tolist()
    if n == 0:
        return {}
    loss = nats / n
    bits = nats / math.log(2)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_acc": correct / n,
            "val_bpc": bits / max(1, eval_set.chars), "val_bpb": bits / max(1, eval_set.bytes)}


def train(cfg: RunConfig, model: torch.nn.Module, tokenizer, train_data: TrainData,
          eval_set: EvalSet | None, run_dir: Path, device: torch.device,
          info: DistInfo = DistInfo(), resume: bool = False, sample_fn=None) -> dict:
    """Run (or continue) training up to `cfg.train.max_steps`; returns the last metrics.

    `tokens` in the metrics counts trained targets (every position when pretraining, the
    assistant tokens in SFT). `sample_fn(model, tokenizer, prompt, sampling) -> str` writes the
    samples (default: plain continuation; SFT passes one that formats a chat turn).
    """
    t = cfg.train
    run_dir = Path(run_dir)
    precision = resolve_precision(t.precision, device)
    if precision == "bf16-true":
        model.to(torch.bfloat16)  # seed 4's "bf16-true": weights and optimizer state in bf16
    model.to(device)
    # Set on our Llama itself: on a LoRA (peft) wrapper the attribute would land on the wrapper.
    base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    base_model.gradient_checkpointing = t.activation_checkpointing
    model.train()
    optimizer = build_optimizer(model, t)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16-mixed" else None

    start_step, tokens_seen = 0, 0
    if resume:
        resume_dir = find_resume_dir(run_dir)
        if resume_dir is None:
            raise UserError(f"{run_dir}: nothing to resume (no resume/ state); start without --resume")
        state = load_resume(resume_dir, model, optimizer, scaler)
        start_step, tokens_seen = state["step"], state["tokens"]

    # Built before the first step, so a mistake in train.eval_tasks stops the run at once.
    tasks = [task_options(spec, f"train.eval_tasks[{i}]", chat=cfg.stage == "sft", progress=False)
             for i, spec in enumerate(t.eval_tasks)] if info.is_main else []

    forward_model = ddp_model = model
    if info.enabled:
        forward_model = ddp_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if t.compile:
        forward_model = torch.compile(forward_model)

    metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=start_step if resume else None) \
        if info.is_main else None
    # Redraw often on a terminal; in a log file every redraw is a new line, so rarely.
    bar = tqdm(total=t.max_steps, initial=start_step, unit="step", dynamic_ncols=True,
               disable=not info.is_main, desc="train", mininterval=0.2 if sys.stderr.isatty() else 15)
    last: dict = {}
    bad_in_a_row = 0
    window_t0, window_tokens = time.perf_counter(), 0
    clip = t.grad_clip if t.grad_clip > 0 else float("inf")
    # Micro-steps backpropagate loss sums divided by this constant (the same on every rank and
    # micro-step, or the rescaling below would not be exact); a micro-batch's positions keep the
    # backward's magnitudes those of a mean loss, which fp16 loss scaling relies on.
    norm = t.batch_size * t.seq_len

    for step in range(start_step, t.max_steps):
        lr = lr_at(step, t)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # The step's loss is the mean over ALL its target tokens, however they are split into
        # micro-batches and ranks. A mean per micro-batch, averaged, would weight a micro-batch
        # of 2 answer tokens like one of 500 (the bug transformers, torchtune and nanochat fixed
        # in 2024). Each micro-step backpropagates its loss *sum* / `norm`; once the step's
        # target count is known (all ranks), the gradients are rescaled to the mean.
        # [loss sum, target count]: one tensor, so DDP reduces (and the host reads) both at once.
        sums = torch.zeros(2, dtype=torch.float32, device=device)  # (no float64 on MPS)
        for micro in range(t.grad_accum):
            x, y, extra = train_data.get(step, micro, device)
            # DDP all-reduces gradients on every backward; skip that on all but the last
            # micro-step of the accumulation.
            sync = micro == t.grad_accum - 1
            no_sync = ddp_model.no_sync() if info.enabled and not sync else contextlib.nullcontext()
            with no_sync, autocast_context(precision, device):
                _, loss_sum = forward_model(x, y, loss_reduction="sum", **extra)
            scaled = loss_sum / norm
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
            sums[0] += loss_sum.detach().float()
            sums[1] += (y != -100).sum()
        if scaler is not None:
            scaler.unscale_(optimizer)
        loss_total, step_tokens = all_reduce_sum(sums, info).tolist()
        step_tokens = int(step_tokens)
        # DDP averaged the gradients over ranks: x world_size gives their sum, / tokens the mean.
        # No target at all (possible only with hand-made data) makes the step non-finite: skipped.
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        torch._foreach_mul_(grads, norm * info.world_size / step_tokens if step_tokens else math.nan)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        loss_value = loss_total / step_tokens if step_tokens else math.nan
        norm_value = float(grad_norm)
        finite = math.isfinite(loss_value) and math.isfinite(norm_value)
        if scaler is not None:
            if step_tokens:
                scaler.step(optimizer)  # skips the update by itself on inf/nan gradients
            scaler.update()
        elif finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += step_tokens
        window_tokens += step_tokens
        done = step + 1

        if not finite:
            bad_in_a_row += 1
            if metrics:
                metrics.write({"step": done, "tokens": tokens_seen, "skipped": "non-finite loss or gradient",
                               "loss_raw": str(loss_value), "grad_norm_raw": str(norm_value)})
                bar.write(f"step {done}: non-finite loss/gradient, update skipped "
                          f"({bad_in_a_row} in a row)")
            if bad_in_a_row >= t.max_bad_steps:
                raise UserError(f"{bad_in_a_row} non-finite steps in a row at step {done}: lower "
                                "train.lr, use fp32/bf16, or check the data")
        else:
            bad_in_a_row = 0

        if finite and (done % t.log_every == 0 or done == t.max_steps or done == start_step + 1):
            elapsed = time.perf_counter() - window_t0
            rate = window_tokens / elapsed if elapsed > 0 else 0.0
            last = {"step": done, "tokens": tokens_seen, "loss": loss_value, "lr": lr,
                    "grad_norm": norm_value, "tok_per_s": rate}
            if metrics:
                metrics.write(last)
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}", refresh=False)
            window_t0, window_tokens = time.perf_counter(), 0
        bar.update(1)

        final = done == t.max_steps
        at_eval = final or (t.eval_every and done % t.eval_every == 0)
        if eval_set is not None and at_eval:
            result = evaluate(model, eval_set, device, precision, info)
            if result and metrics:
                metrics.write({"step": done, "tokens": tokens_seen, **result})
                bar.write(f"step {done}: val loss {result['val_loss']:.3f}  ppl {result['val_ppl']:.1f}"
                          f"  acc {result['val_acc']:.1%}  bpc {result['val_bpc']:.3f}")
                plot_loss(metrics.read(), run_dir / "loss.png", title=run_dir.name)
            last.update(result)
        if tasks and at_eval:
            last.update(run_eval_tasks(model, tokenizer, tasks, run_dir, done, tokens_seen, metrics, bar))
        if info.is_main and t.sample_prompts and (final or (t.sample_every and done % t.sample_every == 0)):
            write_samples(model, tokenizer, t, done, run_dir / "samples.txt", bar, sample_fn)
        if final or (t.save_every and done % t.save_every == 0):
            if info.is_main:
                state = {"step": done, "tokens": tokens_seen, "max_steps": t.max_steps}
                if cfg.stage == "sft":
                    state["base"] = cfg.sft.base  # a LoRA adapter names the run it belongs on
                save_resume(run_dir, model, optimizer, scaler, state)
                publish_weights(run_dir)
            if info.enabled:
                torch.distributed.barrier()
    bar.close()
    if metrics:
        plot_loss(metrics.read(), run_dir / "loss.png", title=run_dir.name)
    return last


def run_eval_tasks(model, tokenizer, tasks, run_dir: Path, step: int, tokens: int,
                   metrics: MetricsLog, bar) -> dict:
    """Run `train.eval_tasks` (main process only: other ranks wait at their next collective);
    their numbers go to metrics.jsonl as `NAME/metric`, their tables to RUN/eval/."""
    numbers = {}
    for name, options in tasks:  # the scoring and generation primitives switch dropout off
        result = run_task(name, model, tokenizer, options)
        label = default_name(name, options.data)
        write_result(result, run_dir, label)
        numbers.update({f"{label}/{k}": v for k, v in result.metrics.items()
                        if isinstance(v, (int, float))})
    metrics.write({"step": step, "tokens": tokens, **numbers})
    bar.write(f"step {step}: " + "  ".join(f"{k} {v:.4g}" for k, v in numbers.items()))
    return numbers


def write_samples(model, tokenizer, t, step: int, path: Path, bar, sample_fn=None) -> None:
    lines = [f"## step {step}"]
    sample_fn = sample_fn or generate_text
    for i, prompt in enumerate(t.sample_prompts):
        cfg = GenerationConfig(max_new_tokens=t.sample_max_new_tokens, temperature=0.8, top_k=50,
                               repetition_penalty=1.1, seed=t.seed + i)
        text = sample_fn(model, tokenizer, prompt, cfg)
        lines.append(f"{prompt}|{text}")
    block = "\n".join(lines)
    bar.write(block.replace("\n", "\n  "))
    with open(path, "a", encoding="utf-8") as f:
        f.write(block + "\n\n")

