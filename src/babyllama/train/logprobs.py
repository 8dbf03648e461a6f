"""Per-token log-probabilities of given tokens under a model: what DPO, GRPO and their
reference models score answers with.

Taken from the full-vocabulary log-softmax in fp32 (a bf16 log-softmax over tens of thousands
of classes is noisy, and preference losses subtract log-probs that are nearly equal).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logps(model, input_ids: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                **extra) -> torch.Tensor:
    """log p(targets[b, t] | input_ids[b, :t + 1]) as (B, T) fp32; 0 where targets == -100.

    `input_ids`, `targets`: (B, T) int64, targets already shifted (targets[:, t] is the token
    after input_ids[:, t]). `temperature` divides the logits first, so the log-probs are those
    of the distribution the tokens were sampled from (TRL's GRPOTrainer does the same).
    `extra`: the model's keyword arguments (attn_mask, position_ids)."""
    logits, _ = model(input_ids, **extra)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    scored = targets != -100
    picked = torch.gather(F.log_softmax(logits, dim=-1), 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * scored


def sequence_logps(model, input_ids: torch.Tensor, targets: torch.Tensor, **extra
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the target tokens' log-probs (B,), number of target tokens (B,)) per row."""
    per_token = token_logps(model, input_ids, targets, **extra)
    return per_token.sum(-1), (targets != -100).sum(-1)
