"""A reward model: our Llama with a scalar head instead of the LM head.

The layout is transformers' `LlamaForSequenceClassification` with `num_labels=1`: the backbone
under `model.*` and a bias-free `score` Linear(hidden, 1). The reward of a sequence is the score
of its last real token's final hidden state (transformers reads the last non-pad token the
same way), so an exported reward model gives the same numbers on the same token ids.
"""

from __future__ import annotations

import torch
from torch import nn

from babyllama.model.llama import Llama, ModelConfig


class RewardModel(Llama):
    """`Llama` minus `lm_head`, plus `score`; `forward` returns rewards, not logits."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        del self.lm_head
        self.score = nn.Linear(config.hidden_size, 1, bias=False)
        # transformers initialises the head like any Linear (normal, initializer_range).
        nn.init.normal_(self.score.weight, mean=0.0, std=config.initializer_range)

    def forward(self, input_ids: torch.Tensor, last: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Rewards (B,) fp32 of right-padded rows `input_ids` (B, T): the score at index
        `last[b]` of each row (B,) int64, the row's last real token; None reads position T-1."""
        hidden = self.hidden_states(input_ids, attn_mask=attn_mask, position_ids=position_ids)
        if last is None:
            picked = hidden[:, -1]
        else:
            picked = hidden[torch.arange(hidden.size(0), device=hidden.device), last]
        return self.score(picked).squeeze(-1).float()

    def new_cache(self, batch_size: int, max_len: int | None = None):
        raise TypeError("a reward model scores sequences; it does not generate")

    def parameter_counts(self) -> dict[str, int]:
        embedding = self.model.embed_tokens.weight.numel()
        layers = sum(p.numel() for p in self.model.layers.parameters())
        norm = self.model.norm.weight.numel()
        score = self.score.weight.numel()
        return {"embedding": embedding, "layers": layers, "final_norm": norm, "score": score,
                "total": embedding + layers + norm + score}


def reward_model_from(lm: Llama) -> RewardModel:
    """A reward model whose backbone is `lm`'s (copied weights) and whose head is fresh:
    where reward modelling starts (InstructGPT starts it from the SFT model)."""
    rm = RewardModel(lm.config)
    state = {k: v for k, v in lm.state_dict().items() if not k.startswith("lm_head.")}
    missing, unexpected = rm.load_state_dict(state, strict=False)
    assert list(missing) == ["score.weight"] and not unexpected, (missing, unexpected)
    return rm
