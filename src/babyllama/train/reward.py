"""Reward modelling: a chat run + preference pairs in, a reward model run out.

The SFT model's backbone gets a fresh scalar head (`RewardModel`, transformers'
`LlamaForSequenceClassification` layout) and learns the Bradley–Terry model of the pairs:
loss = -log σ(r_chosen - r_rejected - margin) (InstructGPT, Ouyang et al. 2022; the margin
is Llama 2's), plus TRL's optional centring term c·(r_chosen + r_rejected)². The run directory
holds the reward model's weights; `babyllama score` reads them, GRPO can use them as its
reward (`grpo.reward=rm:RUN`), and `babyllama export RM --format hf` writes a
`LlamaForSequenceClassification` that gives the same rewards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from babyllama.config import RewardConfig, RunConfig
from babyllama.model.llama import Llama
from babyllama.model.reward import reward_model_from
from babyllama.model.weights import load_weights
from babyllama.train.distributed import cleanup, init_distributed
from babyllama.train.pairs import HeldOutPairs, PairBatch, PairBatches, load_pair_data
from babyllama.train.sft import finetune_schedule, finetune_tokenizer, start_finetune
from babyllama.train.trainer import Loss, train


def bradley_terry_losses(chosen: torch.Tensor, rejected: torch.Tensor, cfg: RewardConfig) -> torch.Tensor:
    """Per-pair losses (B,) from the rewards (B,) of the chosen and rejected answers, as TRL's
    RewardTrainer computes them: -log σ(r_c - r_r - margin) + c·(r_c + r_r)²."""
    losses = -F.logsigmoid(chosen - rejected - cfg.margin)
    if cfg.center_rewards_coefficient:
        losses = losses + cfg.center_rewards_coefficient * (chosen + rejected) ** 2
    return losses


def reward_objective(cfg: RewardConfig):
    """The trainer's loss for a reward model on a pair batch (whole sequences as inputs):
    summed per-pair losses, units = pairs, with accuracy, margins and mean rewards logged."""

    def objective(model, batch: PairBatch) -> Loss:
        rewards = model(batch.input_ids, batch.last)
        B = batch.pairs
        chosen, rejected = rewards[:B], rewards[B:]
        losses = bradley_terry_losses(chosen, rejected, cfg)
        stats = {"accuracy": (chosen > rejected).float().sum(), "margin": (chosen - rejected).detach().sum(),
                 "rewards/chosen": chosen.detach().sum(), "rewards/rejected": rejected.detach().sum()}
        return Loss(losses.sum(), torch.tensor(B, device=losses.device), stats)

    return objective


def run_reward(cfg: RunConfig, resume: bool = False):
    """Train a reward model from `cfg.sft.base` on the pairs in `cfg.sft.sources` into
    `cfg.out_dir`. Raises UserError as `run_dpo` does."""
    run, base = start_finetune(cfg, resume)
    info, device = init_distributed(cfg.train.device)
    try:
        tokenizer = finetune_tokenizer(cfg, base)
        t = cfg.train
        # Whole sequences are the inputs here (no shift): up to seq_len tokens.
        data = load_pair_data(cfg, tokenizer, t.seq_len)
        objective = reward_objective(cfg.reward)
        batches = PairBatches(data.train, batch_size=t.batch_size, grad_accum=t.grad_accum, seed=t.seed,
                              pad_id=tokenizer.pad_id, objective=objective, rank=info.rank,
                              world_size=info.world_size, full=True)
        if not resume:
            cfg = finetune_schedule(cfg, batches.steps_for_epochs(cfg.sft.epochs))
        if info.is_main:
            data.report(cfg, f"{batches.pairs_per_step} pairs per step")
            run.write_config(cfg)
            run.write_tokenizer(tokenizer)
        torch.manual_seed(t.seed)  # the head's initialisation
        lm = Llama(cfg.model)
        load_weights(lm, base.weights_file)
        model = reward_model_from(lm)
        if info.is_main:
            print(f"reward model: {model.parameter_counts()['total'] / 1e6:.2f}M parameters "
                  f"(the backbone of {base.path}, a fresh scalar head) on {device}")
        eval_set = HeldOutPairs(data.val, t.batch_size, tokenizer.pad_id, objective, full=True) if data.val else None
        train(cfg, model, tokenizer, batches, eval_set, run.path, device, info, resume=resume)
    finally:
        cleanup(info)
    return run.path
