"""The one training loop, shared by pretraining, SFT and preference tuning.

What differs between those stages is only the data (`train_data.get(step, micro, device)`
returns inputs, targets with -100 where a token must not count, and extra model arguments such
as a packed batch's attention mask), the objective (`train_data.loss`, when the stage's loss
is not next-token cross-entropy: DPO, reward model, GRPO), the evaluation set and how samples
are prompted; precision, accumulation, clipping, schedules, the non-finite guard, evaluation,
samples, logging, checkpoints, DDP and FSDP (train/fsdp.py) all live here.

`train`, at the end, sets up, then each iteration is one `optimizer_step` followed by the
end-of-step actions (`log_step`, `evaluate_and_log`, `run_eval_tasks`, `write_samples`,
`save_checkpoint`), each on its own schedule.
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

from babyllama.config import CHAT_STAGES, FINETUNE_STAGES, RunConfig, TrainConfig
from babyllama.errors import UserError
from babyllama.eval.report import default_name, write_result
from babyllama.eval.scoring import target_scores, wide_float
from babyllama.eval.tasks import run_task, task_options
from babyllama.infer.config import decoding_defaults
from babyllama.infer.generate import generate_text
from babyllama.run import Run
from babyllama.train.checkpoint import load_resume, load_sharded_resume, save_resume, save_sharded_resume
from babyllama.train.distributed import DistInfo, all_reduce_sum, broadcast_float
from babyllama.train.fsdp import check_launched, is_sharded, set_gradient_sync, shard_model, unsharded_copy
from babyllama.train.metrics import MetricsLog, plot_loss
from babyllama.train.schedule import lr_at


class TrainData(Protocol):
    """A stage's training batches: a pure function of (step, micro-step), so resume is exact.

    Optional members change the objective from next-token cross-entropy (`lm_loss`):
    `loss(model, batch) -> Loss` computes a micro-batch's loss from what `get` returned, and
    `units_per_micro` is the constant that loss sums are divided by in the backward (pairs per
    micro-batch for DPO; the default is batch_size * seq_len token positions); `step_stats()`
    returns numbers the stage measured during the step (GRPO's rewards), logged with it."""

    def get(self, step: int, micro: int, device):
        """Inputs (B, T) and targets (B, T), int64 on `device`, targets -100 where a token
        must not count; and extra keyword arguments for the model's forward (a packed
        batch's `attn_mask` and `position_ids`). A stage with its own `loss` returns whatever
        that loss takes."""
        ...


@dataclass
class Loss:
    """One micro-batch's objective: `total` is the SUM of the per-unit losses (tokens for
    language modelling and GRPO, pairs for DPO and the reward model) and `units` their count;
    `stats` are sums over the same units of what to log (e.g. {"rewards/accuracies": ...}).
    The trainer divides every sum by the step's total units, over micro-steps and ranks."""
    total: torch.Tensor
    units: torch.Tensor
    stats: dict[str, torch.Tensor]


def lm_loss(model, batch) -> Loss:
    """Next-token cross-entropy summed over the targets (pretraining, SFT)."""
    x, y, extra = batch
    _, loss_sum = model(x, y, loss_reduction="sum", **extra)
    return Loss(loss_sum, (y != -100).sum(), {})


def load_checkpoint(run: Run, model, optimizer, scaler, rank: int = 0) -> dict:
    """Restore weights, optimizer, loss scaler and RNG states from the run's resume state (a
    sharded model: its shards, on every rank); returns the trainer state ({"step", "tokens",
    ...}). Raises UserError when there is none, or it was saved with the other strategy."""
    resume_dir = run.resume_dir()
    if resume_dir is None:
        raise UserError(f"{run.path}: nothing to resume (no resume/ state); start without --resume")
    if is_sharded(model):
        return load_sharded_resume(resume_dir, model, optimizer, rank)
    return load_resume(resume_dir, model, optimizer, scaler)


def write_checkpoint(run: Run, model, optimizer, scaler, state: dict) -> None:
    """Replace the run's resume state, then make its weights the run's own."""
    save_resume(run.path, model, optimizer, scaler, state)
    run.publish_weights()


@dataclass
class EvalSet:
    """Fixed evaluation batches, with the characters and UTF-8 bytes their targets spell
    (for bits per character / byte, which compare models across tokenizers)."""
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    chars: int
    bytes: int

    @classmethod
    def from_windows(cls, windows, batch_size: int, tokenizer) -> "EvalSet":
        """Batches of (inputs, targets), each (batch_size, T), from token windows (N, T + 1)."""
        w = torch.as_tensor(windows, dtype=torch.long)
        batches = [(w[i:i + batch_size, :-1], w[i:i + batch_size, 1:]) for i in range(0, len(w), batch_size)]
        # Decoding window by window can split a character at the edges; that miscounts at most
        # one character per window, which is noise next to thousands of characters.
        texts = [tokenizer.decode(row.tolist()) for row in w[:, 1:]]
        return cls(batches, sum(len(t) for t in texts), sum(len(t.encode("utf-8")) for t in texts))


def resolve_precision(precision: str, device: torch.device) -> str:
    """`train.precision` with "auto" made concrete: bf16-mixed on a CUDA GPU that has bf16,
    else fp16-mixed there; fp32 elsewhere. Prints a note for a low precision on CPU."""
    if precision != "auto":
        if precision != "fp32" and device.type == "cpu":
            # Allowed (it works), but warn: this CPU has no fast bf16 matmul.
            print(f"note: {precision} on CPU is much slower than fp32 on CPUs without AMX/AVX-512-BF16")
        return precision
    if device.type == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "fp16-mixed"
    return "fp32"


def autocast_context(precision: str, device: torch.device):
    """torch.autocast for the mixed precisions; a no-op for fp32 and bf16-true (whose weights
    are already bf16)."""
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16-mixed":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, lr_scale=None):
    """AdamW (decoupled weight decay, Loshchilov & Hutter 2019) over the trainable parameters,
    bitsandbytes' 8-bit AdamW, or Muon for the hidden layers' weight matrices with AdamW for
    the rest (`MuonAdamW`). `lr_scale(name) -> float`: a parameter's learning rate as a
    multiple of the schedule's (an image-text model's parts train at different rates); each
    group keeps its multiple as "lr_scale". Raises UserError if adamw8bit is asked for without
    bitsandbytes installed."""
    # Decay matrices (projections, embeddings); never norms' gains: shrinking them toward 0
    # only fights the normalisation (the split nanoGPT's configure_optimizers makes).
    # Two groups (decay, no decay) per learning-rate multiple, even when one is empty: the
    # optimizer state of a resumed run must find the same groups.
    by_scale: dict[float, tuple[list, list]] = {}
    muon_params: dict[float, list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = lr_scale(name) if lr_scale else 1.0
        decay, no_decay = by_scale.setdefault(scale, ([], []))
        if cfg.optimizer == "muon" and is_hidden_matrix(name, p):
            muon_params.setdefault(scale, []).append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    by_scale = by_scale or {1.0: ([], [])}
    groups = [{"params": params, "weight_decay": wd, "lr_scale": scale}
              for scale, (decay, no_decay) in sorted(by_scale.items())
              for params, wd in ((decay, cfg.weight_decay), (no_decay, 0.0))]
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb  # optional dependency (the bnb extra): imported only here
        except ImportError:
            raise UserError("train.optimizer=adamw8bit needs bitsandbytes: pip install 'babyllama[bnb]'") from None
        return bnb.optim.AdamW8bit(groups, **kwargs)
    on_cuda = next(model.parameters()).device.type == "cuda"
    adamw = torch.optim.AdamW(groups, fused=on_cuda or None, **kwargs)
    if cfg.optimizer != "muon":
        return adamw
    # One group per learning-rate multiple, even when empty, for the same reason as above.
    muon_groups = [{"params": muon_params.get(scale, []), "weight_decay": cfg.weight_decay, "lr_scale": scale}
                   for scale in sorted(by_scale)]
    # match_rms_adamw (Liu et al. 2025, "Muon is Scalable for LLM Training") scales each
    # update to AdamW's RMS, so train.lr and weight_decay tuned for AdamW carry over.
    muon = torch.optim.Muon(muon_groups, lr=cfg.lr, weight_decay=cfg.weight_decay,
                            adjust_lr_fn="match_rms_adamw")
    return MuonAdamW(muon, adamw)


def is_hidden_matrix(name: str, p: torch.nn.Parameter) -> bool:
    """A 2-D weight inside the transformer layers: Muon's share. Embeddings and the output
    head stay with AdamW, as in Jordan et al.'s Muon (their gradients are sparse rows and
    a classifier, not hidden transforms). LoRA's factors stay with AdamW too: B starts at zero
    and an orthogonalised update has the same size whatever the gradient's, so Muon would
    move the adapter as far on its first step as on any other (LoRA trains with Adam, Hu et
    al. 2021)."""
    return p.dim() == 2 and not any(part in name for part in ("embed_tokens", "lm_head", "lora_"))


class MuonAdamW:
    """Muon (Jordan et al. 2024, torch.optim.Muon: momentum orthogonalised by Newton-Schulz)
    on the hidden weight matrices and AdamW on everything else, driven as one optimizer:
    `param_groups` lists both optimizers' groups (the loop sets their learning rates), and the
    state dict holds both (resume)."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        # Read each time: load_state_dict replaces an optimizer's group dicts with new ones.
        return self.muon.param_groups + self.adamw.param_groups

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"muon", "adamw"}:
            raise UserError("the resume state holds another optimizer's state than train.optimizer=muon")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


@torch.no_grad()
def evaluate(model, eval_set, device, precision: str, info: DistInfo) -> dict:
    """Loss (nats/token), perplexity, next-token accuracy and bits per character/byte on the
    eval set, by the scoring `babyllama eval --task lm` uses; {} when it has no target.
    Batches are split across ranks and the sums reduced, so DDP evaluates each window once.
    A sharded (FSDP) model's forward is a collective: a rank left without a batch in the last
    round scores a repeat of its first and discards it, so all ranks run the same forwards.
    An eval set of another stage (held-out pairs) brings its own `evaluate` with these
    arguments and returns its own `val_*` numbers.
    """
    if not isinstance(eval_set, EvalSet):
        return eval_set.evaluate(model, device, precision, info)
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=wide_float(device), device=device)  # nats, tokens, correct
    n_batches = len(eval_set.batches)
    if is_sharded(model):
        n_batches = math.ceil(n_batches / info.world_size) * info.world_size
    for i in range(info.rank, n_batches, info.world_size):
        x, y = eval_set.batches[i] if i < len(eval_set.batches) else eval_set.batches[0]
        x, y = x.to(device), y.to(device)
        with autocast_context(precision, device):
            nats, n, correct = target_scores(model, x, y)
        if i >= len(eval_set.batches):
            continue
        sums[0] += nats.sum()
        sums[1] += n.sum()
        sums[2] += correct.sum()
    all_reduce_sum(sums, info)
    model.train(was_training)
    return eval_metrics(*sums.tolist(), eval_set.chars, eval_set.bytes)


def eval_metrics(nats: float, n: float, correct: float, chars: int, n_bytes: int) -> dict:
    """The val_* numbers from summed target nats, target count and correct next-token guesses
    over text of `chars` characters and `n_bytes` UTF-8 bytes; {} without targets."""
    if n == 0:
        return {}
    loss = nats / n
    bits = nats / math.log(2)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_acc": correct / n,
            "val_bpc": bits / max(1, chars), "val_bpb": bits / max(1, n_bytes)}


# ----------------------------------------------------------------------------------------
# Setting up


def prepare_model(model: torch.nn.Module, precision: str, device: torch.device,
                  activation_checkpointing: bool) -> None:
    """Move `model` to `device` (and to bf16 for "bf16-true"), set activation checkpointing
    and switch it to training mode, in place."""
    if precision == "bf16-true":
        # Weights, and so the optimizer state, in bf16: half the memory of fp32 weights, but with
        # no fp32 master copy an update below bf16's resolution (2^-8 of the weight) rounds away.
        model.to(torch.bfloat16)
    model.to(device)
    # Set on our Llama itself: on a LoRA (peft) wrapper the attribute would land on the wrapper.
    base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    base_model.gradient_checkpointing = activation_checkpointing
    model.train()


def wrap_model(model: torch.nn.Module, device: torch.device, info: DistInfo,
               compile_model: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(forward_model, ddp_model): `model` in DDP under torchrun (else itself; a sharded model
    is its own wrapper), and that in torch.compile when `compile_model` is set. The
    micro-steps call `forward_model`; `ddp_model` is what `no_sync` is asked of."""
    forward_model = ddp_model = model
    if info.enabled and not is_sharded(model):
        forward_model = ddp_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile_model:
        forward_model = torch.compile(forward_model)
    return forward_model, ddp_model


@dataclass
class TrainSetup:
    """What the step and checkpoint functions share, built once by `train`."""
    cfg: RunConfig
    model: torch.nn.Module          # the trained module: its parameters, saving, eval, samples
    forward_model: torch.nn.Module  # what the micro-steps call (see `wrap_model`)
    ddp_model: torch.nn.Module      # `model` or its DDP wrapper: what `no_sync` is asked of
                                    # (`model` sharded by FSDP: no DDP; train/fsdp.py)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # fp16-mixed only
    precision: str
    device: torch.device
    info: DistInfo


# ----------------------------------------------------------------------------------------
# One optimizer step


@dataclass
class StepResult:
    """What one optimizer step measured (the same numbers on every rank)."""
    loss: float       # mean loss over the step's units (target tokens: nats) (nan: no unit)
    grad_norm: float  # global L2 norm of that mean's gradient, before clipping
    tokens: int       # units in the step (target tokens; pairs for DPO), all micro-steps and ranks
    stats: dict = None  # the objective's logged means over the step's units (Loss.stats)

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


def optimizer_step(s: TrainSetup, train_data: TrainData, step: int) -> StepResult:
    """Accumulate `train.grad_accum` micro-batches of `train_data`'s step `step`, then update
    the weights once, at the learning rate already set on the optimizer.

    The step's loss is the mean over ALL its target tokens, however they are split into
    micro-batches and ranks. A mean per micro-batch, averaged, would weight a micro-batch of 2
    answer tokens like one of 500 (the bug transformers, torchtune and nanochat fixed in
    2024). Each micro-step backpropagates its loss *sum* / (batch_size * seq_len); once the step's target
    count is known (all ranks), the gradients are rescaled to the mean and clipped to
    `train.grad_clip` (global L2 norm; 0 disables). A non-finite loss or gradient norm leaves
    the weights and optimizer state untouched (fp16: the GradScaler skips the update itself and
    lowers its scale). The gradients are cleared either way.
    """
    t = s.cfg.train
    # A constant, the same on every rank and micro-step, or the rescaling below would not be
    # exact; a micro-batch's positions keep the backward's magnitudes those of a mean loss,
    # which fp16 loss scaling relies on.
    norm = getattr(train_data, "units_per_micro", t.batch_size * t.seq_len)
    objective = getattr(train_data, "loss", lm_loss)
    # [loss sum, unit count, stats...]: one tensor, so DDP reduces (and the host reads) all at once.
    sums = torch.zeros(2, dtype=torch.float32, device=s.device)  # (no float64 on MPS)
    stats: dict[str, torch.Tensor] = {}
    for micro in range(t.grad_accum):
        batch = train_data.get(step, micro, s.device)
        # DDP all-reduces gradients on every backward; skip that on all but the last
        # micro-step of the accumulation.
        sync = micro == t.grad_accum - 1
        no_sync = contextlib.nullcontext()
        if is_sharded(s.model):
            set_gradient_sync(s.model, sync)
        elif s.info.enabled and not sync:
            no_sync = s.ddp_model.no_sync()
        with no_sync, autocast_context(s.precision, s.device):
            loss = objective(s.forward_model, batch)
        scaled = loss.total / norm
        (s.scaler.scale(scaled) if s.scaler is not None else scaled).backward()
        sums[0] += loss.total.detach().float()
        sums[1] += loss.units
        for name, value in loss.stats.items():
            stats[name] = stats.get(name, 0) + value.detach().float()
    if s.scaler is not None:
        s.scaler.unscale_(s.optimizer)
    names = sorted(stats)
    packed = torch.cat([sums, torch.stack([stats[n] for n in names])]) if names else sums
    reduced = all_reduce_sum(packed, s.info).tolist()
    loss_total, tokens = reduced[0], int(reduced[1])
    step_stats = {n: v / tokens for n, v in zip(names, reduced[2:])} if tokens else {}
    # DDP (and FSDP's reduce-scatter) averaged the gradients over ranks: x world_size gives
    # their sum, / tokens the mean.
    # No target at all (possible only with hand-made data) makes the step non-finite: skipped.
    grads = [p.grad for p in s.model.parameters() if p.grad is not None]
    torch._foreach_mul_(grads, norm * s.info.world_size / tokens if tokens else math.nan)
    clip = t.grad_clip if t.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(s.model.parameters(), clip)
    if hasattr(grad_norm, "full_tensor"):  # sharded gradients: the norm is a DTensor
        grad_norm = grad_norm.full_tensor()
    result = StepResult(loss_total / tokens if tokens else math.nan, float(grad_norm), tokens, step_stats)
    if s.scaler is not None:
        if tokens:
            s.scaler.step(s.optimizer)  # skips the update by itself on inf/nan gradients
        s.scaler.update()
    elif result.finite:
        s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    return result


# ----------------------------------------------------------------------------------------
# End-of-step actions


def every(done: int, interval: int) -> bool:
    """True on every `interval`-th step (1-based `done`); never when `interval` is 0."""
    return bool(interval) and done % interval == 0


class TokenRate:
    """Trained tokens per second over a window that `take` closes and restarts."""

    def __init__(self):
        self.t0, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def take(self) -> float:
        elapsed = time.perf_counter() - self.t0
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        self.t0, self.tokens = time.perf_counter(), 0
        return rate


def log_step(metrics: MetricsLog | None, bar, done: int, tokens_seen: int, result: StepResult,
             lr: float, tok_per_s: float, elapsed_s: float) -> dict:
    """Write the step's training record (main process) and show it on the progress bar;
    returns the record. `elapsed_s`: seconds of training so far (resumes included)."""
    record = {"step": done, "tokens": tokens_seen, "loss": result.loss, "lr": lr,
              "grad_norm": result.grad_norm, "tok_per_s": tok_per_s, "elapsed_s": round(elapsed_s, 2),
              **(result.stats or {})}
    if metrics:
        metrics.write(record)
    bar.set_postfix(loss=f"{result.loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_per_s:,.0f}", refresh=False)
    return record


def log_skipped_step(metrics: MetricsLog | None, bar, done: int, tokens_seen: int,
                     result: StepResult, bad_in_a_row: int, max_bad_steps: int) -> None:
    """Record a step whose update was skipped (main process). Raises UserError once
    `max_bad_steps` steps in a row were."""
    if metrics:
        metrics.write({"step": done, "tokens": tokens_seen, "skipped": "non-finite loss or gradient",
                       "loss_raw": str(result.loss), "grad_norm_raw": str(result.grad_norm)})
        bar.write(f"step {done}: non-finite loss/gradient, update skipped ({bad_in_a_row} in a row)")
    if bad_in_a_row >= max_bad_steps:
        raise UserError(f"{bad_in_a_row} non-finite steps in a row at step {done}: lower "
                        "train.lr, use fp32/bf16, or check the data")


def evaluate_and_log(s: TrainSetup, eval_set: EvalSet, run: Run, metrics: MetricsLog | None,
                     bar, done: int, tokens_seen: int, elapsed_s: float) -> dict:
    """`evaluate` on every rank; the main process logs the numbers (with the training seconds
    before the evaluation) and redraws the loss plot. Returns the numbers ({} when the eval
    set has no target)."""
    result = evaluate(s.model, eval_set, s.device, s.precision, s.info)
    if result and metrics:
        metrics.write({"step": done, "tokens": tokens_seen, "elapsed_s": round(elapsed_s, 2), **result})
        if "val_ppl" in result:
            line = (f"val loss {result['val_loss']:.3f}  ppl {result['val_ppl']:.1f}"
                    f"  acc {result['val_acc']:.1%}  bpc {result['val_bpc']:.3f}")
        else:  # another stage's held-out numbers (val_rewards/accuracies, ...)
            line = "  ".join(f"{k} {v:.4g}" for k, v in result.items())
        bar.write(f"step {done}: {line}")
        plot_loss(metrics.read(), run.loss_plot_file, title=run.path.name)
    return result


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


def write_samples(model, tokenizer, t: TrainConfig, step: int, path: Path, bar, sample_fn=None) -> None:
    """Complete each of `t.sample_prompts` (temperature 0.8, top-k 50, repetition penalty
    1.1, a fixed seed per prompt), print the block and append it to `path`."""
    lines = [f"## step {step}"]
    sample_fn = sample_fn or generate_text
    for i, prompt in enumerate(t.sample_prompts):
        cfg = decoding_defaults("samples", max_new_tokens=t.sample_max_new_tokens, seed=t.seed + i)
        text = sample_fn(model, tokenizer, prompt, cfg)
        lines.append(f"{prompt}|{text}")
    block = "\n".join(lines)
    bar.write(block.replace("\n", "\n  "))
    with open(path, "a", encoding="utf-8") as f:
        f.write(block + "\n\n")


def save_checkpoint(s: TrainSetup, run: Run, done: int, tokens_seen: int, elapsed_s: float) -> None:
    """Save the resume state and publish its weights (main process; a sharded model's shards
    on every rank); every rank then waits at a barrier, so none runs ahead of a checkpoint
    that is still being written."""
    state = {"step": done, "tokens": tokens_seen, "max_steps": s.cfg.train.max_steps,
             "elapsed_s": round(elapsed_s, 3), "world_size": s.info.world_size}
    if s.cfg.stage in FINETUNE_STAGES:
        state["base"] = s.cfg.sft.base  # a LoRA adapter names the run it belongs on
    if is_sharded(s.model):
        save_sharded_resume(run.path, s.model, s.optimizer, state, s.info.rank)
        if s.info.is_main:
            run.publish_weights()
    elif s.info.is_main:
        write_checkpoint(run, s.model, s.optimizer, s.scaler, state)
    if s.info.enabled:
        torch.distributed.barrier()


def check_task_data(data, source: str) -> None:
    """Raise UserError when an evaluation task's data path does not exist (checked when training
    starts, not at the first evaluation, hours later); builtin:NAME and `file#split` pass."""
    if not isinstance(data, str) or data.startswith("builtin:"):
        return
    if not Path(data).exists() and not ("#" in data and Path(data.rsplit("#", 1)[0]).exists()):
        raise UserError(f"{source}: {data}: no such file or folder")


def note_world_size_change(saved: int, info: DistInfo, t: TrainConfig) -> None:
    """Say so (main process) when a run resumes on another number of processes: the weights
    and optimizer state carry over (DCP reshards an FSDP run), but train.batch_size is per
    process, so the global batch changes with the count."""
    if saved != info.world_size and info.is_main:
        per_step = t.batch_size * t.grad_accum
        print(f"note: resuming on {info.world_size} process(es); the run was saved from {saved}: a step now "
              f"takes {per_step * info.world_size} sequences instead of {per_step * saved} "
              "(train.batch_size is per process)", file=sys.stderr)


class TrainClock:
    """Wall time of the training loop, across resumes (`elapsed_s` of the resume state), and
    the share of `train.max_minutes` it has spent. Under DDP every rank takes rank 0's clock:
    the stop and the learning rate must be the same on all ranks, or they hang or diverge."""

    def __init__(self, max_minutes: float, spent_s: float, info: DistInfo, device: torch.device):
        self.budget_s = max_minutes * 60
        self.spent_s, self.t0 = spent_s, time.perf_counter()
        self.info, self.device = info, device

    def elapsed(self) -> float:
        """Seconds spent so far (the same number on every rank)."""
        return broadcast_float(self.spent_s + time.perf_counter() - self.t0, self.info, self.device)

    def fraction(self, elapsed: float) -> float | None:
        """Share of the budget that `elapsed` seconds are; None without a budget."""
        return elapsed / self.budget_s if self.budget_s else None


def expected_total(done: int, fraction: float | None, max_steps: int) -> int:
    """The progress bar's total: max_steps, or under a time budget the steps the time will
    allow at the pace so far (a time budget's max_steps is only a cap)."""
    if not fraction:
        return max_steps
    return min(max_steps, max(done, round(done / min(1.0, fraction))))


# ----------------------------------------------------------------------------------------
# The loop


def train(cfg: RunConfig, model: torch.nn.Module, tokenizer, train_data: TrainData,
          eval_set: EvalSet | None, run_dir: Path, device: torch.device,
          info: DistInfo | None = None, resume: bool = False, sample_fn=None, lr_scale=None) -> dict:
    """Run (or continue) training up to `cfg.train.max_steps`, or until `train.max_minutes`
    of wall time are spent; returns the last metrics.

    `tokens` in the metrics counts trained targets (every position when pretraining, the
    assistant tokens in SFT). `sample_fn(model, tokenizer, prompt, sampling) -> str` writes the
    samples (default: plain continuation; SFT passes one that formats a chat turn).
    `lr_scale(name) -> float` sets per-parameter learning-rate multiples (`build_optimizer`).
    Raises UserError when there is nothing to resume, a train.eval_tasks entry is invalid, or
    `train.max_bad_steps` steps in a row are non-finite.
    """
    t = cfg.train
    info = info or DistInfo()  # a single process
    check_launched(t.strategy, info.launched)
    run = Run(run_dir)
    precision = resolve_precision(t.precision, device)
    prepare_model(model, precision, device, t.activation_checkpointing)
    if t.strategy == "fsdp":  # before the optimizer: it must hold the sharded parameters
        shard_model(model, precision)
    optimizer = build_optimizer(model, t, lr_scale)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16-mixed" else None
    start_step, tokens_seen, spent_s = 0, 0, 0.0
    if resume:  # before DDP wraps the model: DDP broadcasts rank 0's weights as it starts
        state = load_checkpoint(run, model, optimizer, scaler, info.rank)
        start_step, tokens_seen = state["step"], state["tokens"]
        note_world_size_change(state.get("world_size", info.world_size), info, t)
        spent_s = state.get("elapsed_s", 0.0)  # states saved before time budgets have none
    # Built before the first step, so a mistake in train.eval_tasks stops the run at once.
    tasks = [task_options(spec, f"train.eval_tasks[{i}]", chat=cfg.stage in CHAT_STAGES, progress=False)
             for i, spec in enumerate(t.eval_tasks)] if info.is_main else []
    for i, (name, options) in enumerate(tasks):
        check_task_data(options.data, f"train.eval_tasks[{i}]: {name}")
    forward_model, ddp_model = wrap_model(model, device, info, compile_model=t.compile)
    s = TrainSetup(cfg, model, forward_model, ddp_model, optimizer, scaler, precision, device, info)

    metrics = MetricsLog(run.metrics_file, resume_step=start_step if resume else None) \
        if info.is_main else None
    # Redraw often on a terminal; in a log file every redraw is a new line, so rarely.
    bar = tqdm(total=t.max_steps, initial=start_step, unit="step", dynamic_ncols=True,
               disable=not info.is_main, desc="train", mininterval=0.2 if sys.stderr.isatty() else 15)
    last: dict = {}
    bad_in_a_row = 0
    rate = TokenRate()
    clock = TrainClock(t.max_minutes, spent_s, info, device)
    elapsed = clock.elapsed()
    saved_tenths = math.floor(10 * (clock.fraction(elapsed) or 0))

    # The bar is closed however the loop ends, so an error is printed on a line of its own.
    try:
        for step in range(start_step, t.max_steps):
            fraction = clock.fraction(elapsed)
            if fraction is not None and fraction >= 1 and step > 0:
                # Resumed after the time ran out: the final actions were done then. (A new run
                # takes at least one step, so however small the budget it ends with a model.)
                if info.is_main:
                    print(f"note: {run.path}: its time budget (train.max_minutes={t.max_minutes:g}) is spent, "
                          "so there is nothing to resume; the budget cannot change on resume", file=sys.stderr)
                break
            lr = lr_at(step, t, fraction)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            result = optimizer_step(s, train_data, step)
            if hasattr(train_data, "step_stats"):  # what the stage measured itself (GRPO's rewards)
                result.stats = {**train_data.step_stats(), **(result.stats or {})}
            tokens_seen += result.tokens
            rate.add(result.tokens)
            done = step + 1
            elapsed = clock.elapsed()
            fraction = clock.fraction(elapsed)
            final = done == t.max_steps or (fraction is not None and fraction >= 1)
            if not result.finite:
                bad_in_a_row += 1
                log_skipped_step(metrics, bar, done, tokens_seen, result, bad_in_a_row, t.max_bad_steps)
            else:
                bad_in_a_row = 0
                if done % t.log_every == 0 or final or done == start_step + 1:
                    last = log_step(metrics, bar, done, tokens_seen, result, lr, rate.take(), elapsed)
            bar.total = expected_total(done, fraction, t.max_steps)
            bar.update(1)

            if final or every(done, t.eval_every):
                if eval_set is not None:
                    last.update(evaluate_and_log(s, eval_set, run, metrics, bar, done, tokens_seen, elapsed))
            run_tasks = bool(t.eval_tasks) and (final or every(done, t.eval_every))
            sample = bool(t.sample_prompts) and (final or every(done, t.sample_every))
            # What only the main process runs needs whole weights: a sharded model's are
            # gathered (by every rank) into a plain copy for it.
            whole = model
            if is_sharded(model) and (run_tasks or sample):
                whole = unsharded_copy(model, device)
            if run_tasks and info.is_main:
                last.update(run_eval_tasks(whole, tokenizer, tasks, run.path, done, tokens_seen, metrics, bar))
            if sample and info.is_main:
                write_samples(whole, tokenizer, t, done, run.samples_file, bar, sample_fn)
            del whole
            # Under a time budget also at each tenth of it: a budget of a few minutes may end
            # before save_every steps, and Ctrl-C must not cost the whole run.
            tenths = math.floor(10 * fraction) if fraction is not None else 0
            if final or every(done, t.save_every) or tenths > saved_tenths:
                save_checkpoint(s, run, done, tokens_seen, clock.elapsed())
                saved_tenths = tenths
            if final:
                break
    finally:
        bar.close()
    if metrics:
        plot_loss(metrics.read(), run.loss_plot_file, title=run.path.name)
    return last
