"""Direct preference optimisation: a chat run + preference pairs in, a chat run out.

DPO (Rafailov et al. 2023) needs, for every pair, the reference model's log-probs of both
answers. They are computed once, before training, by the starting weights (for a LoRA or
QLoRA run: the model with its adapter disabled, as TRL does), and stored in the run directory
(`reference_logps.safetensors`), so no second model stays in memory and a resumed run reads
them back instead of recomputing. The rest is the one trainer loop, with the pair objective.
"""

from __future__ import annotations

import contextlib
import hashlib

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from babyllama.atomic import atomic_path
from babyllama.config import DPOConfig, RunConfig
from babyllama.infer.chat import chat_sample
from babyllama.run import Run
from babyllama.train.distributed import cleanup, init_distributed
from babyllama.train.logprobs import token_logps
from babyllama.train.pairs import HeldOutPairs, PairBatch, PairBatches, load_pair_data, pair_scores
from babyllama.train.sft import finetune_model, finetune_schedule, finetune_tokenizer, start_finetune
from babyllama.train.trainer import Loss, resolve_precision, train


def preference_losses(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
                      ref_chosen_logps: torch.Tensor | None, ref_rejected_logps: torch.Tensor | None,
                      chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, cfg: DPOConfig
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,) and the implicit rewards of the chosen and rejected answers (B,).

    `*_logps`: summed answer log-probs (B,) under the policy and the reference (None for
    SimPO); `*_lengths`: answer tokens (B,). The formulas are TRL's DPOTrainer (`sigmoid`,
    `ipo`) and CPOTrainer (`simpo` with cpo_alpha=0):
      sigmoid  -log σ(β Δ),  Δ = (π_c - ref_c) - (π_r - ref_r); rewards β(π - ref)
      ipo      (Δ/len - 1/(2β))², the log-ratios averaged per answer token; rewards β(π - ref)
      simpo    -log σ(β (π_c/len_c - π_r/len_r) - γ); rewards β π/len
    """
    beta = cfg.beta
    if cfg.loss == "simpo":
        chosen = chosen_logps / chosen_lengths.clamp(min=1)
        rejected = rejected_logps / rejected_lengths.clamp(min=1)
        losses = -F.logsigmoid(beta * (chosen - rejected) - cfg.simpo_gamma)
        return losses, beta * chosen.detach(), beta * rejected.detach()
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    if cfg.loss == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif cfg.loss == "ipo":
        delta = chosen_ratio / chosen_lengths.clamp(min=1) - rejected_ratio / rejected_lengths.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {cfg.loss!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def answer_logps(model, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed answer log-probs (2B,), answer tokens (2B,)) of a pair batch's rows."""
    per_token = token_logps(model, batch.input_ids, batch.targets)
    return per_token.sum(-1), (batch.targets != -100).sum(-1)


def dpo_objective(cfg: DPOConfig):
    """The trainer's loss for a DPO pair batch: summed per-pair losses, units = pairs, and
    TRL's logged statistics (rewards/chosen, rewards/rejected, rewards/accuracies,
    rewards/margins, logps/chosen, logps/rejected) summed over the pairs."""

    def objective(model, batch: PairBatch) -> Loss:
        logps, lengths = answer_logps(model, batch)
        B = batch.pairs
        ref = batch.reference
        losses, chosen_rewards, rejected_rewards = preference_losses(
            logps[:B], logps[B:], None if ref is None else ref[:B], None if ref is None else ref[B:],
            lengths[:B], lengths[B:], cfg)
        stats = {"rewards/chosen": chosen_rewards.sum(), "rewards/rejected": rejected_rewards.sum(),
                 "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
                 "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
                 "logps/chosen": logps[:B].detach().sum(), "logps/rejected": logps[B:].detach().sum()}
        return Loss(losses.sum(), torch.tensor(B, device=losses.device), stats)

    return objective


def fingerprint(examples: list) -> str:
    """A hash of the pairs' token ids: the stored reference log-probs belong to exactly these."""
    h = hashlib.sha256()
    for e in examples:
        for side in (e.chosen, e.rejected):
            h.update(side.ids.tobytes())
            h.update(side.mask.tobytes())
    return h.hexdigest()


def reference_context(model):
    """The reference model: an adapter run's model with its adapter disabled (peft), else the
    model itself (called before any update)."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


def compute_reference(model, splits: dict[str, list], batch_size: int, pad_id: int, device,
                      precision: str, progress: bool) -> dict[str, torch.Tensor]:
    """{split: (N, 2) summed answer log-probs of (chosen, rejected)} under the reference."""
    was_training = model.training
    model.eval()
    out = {}
    with reference_context(model):
        for name, examples in splits.items():
            out[name] = pair_scores(lambda b: answer_logps(model, b)[0], examples, batch_size, pad_id,
                                    device, precision, progress) if examples else torch.zeros(0, 2)
    model.train(was_training)
    return out


def save_reference(run: Run, tables: dict[str, torch.Tensor], key: str) -> None:
    with atomic_path(run.reference_file) as tmp:
        save_file({k: v.contiguous() for k, v in tables.items()}, str(tmp), metadata={"fingerprint": key})


def load_reference(run: Run, key: str) -> dict[str, torch.Tensor] | None:
    """The stored reference log-probs of a resumed run, or None when there are none or they
    belong to other pairs (the data or the template changed: they are recomputed)."""
    path = run.reference_file
    if not path.exists():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        if (f.metadata() or {}).get("fingerprint") != key:
            return None
    return load_file(str(path))


def run_dpo(cfg: RunConfig, resume: bool = False):
    """DPO-tune `cfg.sft.base` (a chat run) on the pairs in `cfg.sft.sources` into
    `cfg.out_dir`. Raises UserError for a base without a chat template, unreadable pairs or
    none left after fitting them into the context."""
    run, base = start_finetune(cfg, resume)
    info, device = init_distributed(cfg.train.device)
    try:
        tokenizer = finetune_tokenizer(cfg, base)
        t = cfg.train
        data = load_pair_data(cfg, tokenizer, t.seq_len + 1)
        objective = dpo_objective(cfg.dpo)
        batches = PairBatches(data.train, batch_size=t.batch_size, grad_accum=t.grad_accum, seed=t.seed,
                              pad_id=tokenizer.pad_id, objective=objective, rank=info.rank,
                              world_size=info.world_size)
        if not resume:
            cfg = finetune_schedule(cfg, batches.steps_for_epochs(cfg.sft.epochs))
        if info.is_main:
            data.report(cfg, f"{batches.pairs_per_step} pairs per step")
            run.write_config(cfg)
            run.write_tokenizer(tokenizer)
        model = finetune_model(cfg, base, device, info)
        reference = None
        if cfg.dpo.loss != "simpo":
            key = fingerprint(data.train + data.val)
            # Only a resumed run reads the stored table: a new run in a directory an interrupted
            # one left behind may start from another base or adapter kind (same pairs, other
            # reference), which the fingerprint of the pairs cannot tell.
            reference = load_reference(run, key) if resume else None
            if reference is None:
                model.to(device)
                reference = compute_reference(model, {"train": data.train, "val": data.val}, t.batch_size,
                                              tokenizer.pad_id, device, resolve_precision(t.precision, device),
                                              progress=info.is_main)
                if info.is_main:
                    save_reference(run, reference, key)
                    print(f"reference log-probs of {len(data.train) + len(data.val):,} pairs -> "
                          f"{run.reference_file.name}")
        batches.reference = None if reference is None else reference["train"]
        eval_set = HeldOutPairs(data.val, t.batch_size, tokenizer.pad_id, objective,
                                None if reference is None else reference["val"]) if data.val else None
        train(cfg, model, tokenizer, batches, eval_set, run.path, device, info, resume=resume,
              sample_fn=chat_sample)
    finally:
        cleanup(info)
    return run.path
