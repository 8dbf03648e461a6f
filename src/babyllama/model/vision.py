"""The image encoder: a small Vision Transformer laid out exactly like transformers' SigLIP.

Patch embedding (a stride-`patch_size` convolution) + learned position embeddings -> pre-norm
encoder layers (LayerNorm -> bidirectional attention -> residual, LayerNorm -> GELU MLP ->
residual) -> a final `post_layernorm`. Parameter names are `SiglipVisionModel`'s
(`embeddings.patch_embedding.weight`, `encoder.layers.0.self_attn.q_proj.weight`,
`post_layernorm.bias`, ...), so a SigLIP checkpoint a user already has loads into it
(`load_siglip_state`) and a LLaVA export copies it as it is (tests/test_vision_model.py
compares the two on the same weights). SigLIP's attention-pooling `head` is not built: LLaVA
reads patch features, never the pooled vector (transformers' LLaVA configs set
`vision_use_head=False` for the same reason).

Sources: Dosovitskiy et al. 2021 (ViT), Zhai et al. 2023 (SigLIP); pixel shuffle as in
nanoVLM / Idefics3 (a space-to-depth rearrangement that trades tokens for width).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

# SigLIP checkpoints use the tanh approximation of GELU; a few (and CLIP-style configs) the
# exact one. transformers' names for them.
ACTIVATIONS = {"gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu}


@dataclass
class VisionConfig:
    """`SiglipVisionConfig`'s fields (same names, so export is a copy), plus the image
    normalisation its processor applies. Defaults: a 4-layer, width-192 ViT on 64x64 images in
    8x8 patches (64 patches), small enough to train from scratch on a CPU in minutes."""
    hidden_size: int = 192
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 3
    num_channels: int = 3
    image_size: int = 64
    patch_size: int = 8
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    # SiglipImageProcessor's defaults: pixels scaled to [0, 1], then (x - 0.5) / 0.5.
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    def problems(self, prefix: str = "vlm.vision.") -> list[str]:
        out = []
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_channels", "image_size", "patch_size"):
            if getattr(self, name) <= 0:
                out.append(f"{prefix}{name} must be positive, got {getattr(self, name)}")
        if out:
            return out
        if self.hidden_size % self.num_attention_heads:
            out.append(f"{prefix}num_attention_heads ({self.num_attention_heads}) must divide "
                       f"{prefix}hidden_size ({self.hidden_size})")
        if self.image_size % self.patch_size:
            out.append(f"{prefix}patch_size ({self.patch_size}) must divide {prefix}image_size "
                       f"({self.image_size})")
        if self.hidden_act not in ACTIVATIONS:
            out.append(f"{prefix}hidden_act must be one of {', '.join(ACTIVATIONS)}; got {self.hidden_act!r}")
        for name in ("image_mean", "image_std"):
            values = getattr(self, name)
            if len(values) != self.num_channels:
                out.append(f"{prefix}{name} needs {self.num_channels} values (one per channel), got {values}")
        if any(s <= 0 for s in self.image_std):
            out.append(f"{prefix}image_std values must be positive, got {self.image_std}")
        if not 0 <= self.attention_dropout < 1:
            out.append(f"{prefix}attention_dropout must be in [0, 1), got {self.attention_dropout}")
        return out

    def to_dict(self) -> dict:
        return asdict(self)


class VisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size,
                                         kernel_size=config.patch_size, stride=config.patch_size)
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, D, grid, grid) -> (B, grid*grid, D), patches in row-major order.
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        return x.flatten(2).transpose(1, 2) + self.position_embedding.weight


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        d = config.hidden_size
        self.n_heads = config.num_attention_heads
        self.dropout = config.attention_dropout
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = (p(x).view(B, N, self.n_heads, D // self.n_heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        # Every patch sees every patch (no mask); SDPA's default scale is SigLIP's head_dim^-0.5.
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(B, N, D))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.act = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.num_hidden_layers))


class VisionTransformer(nn.Module):
    """SigLIP's vision tower: `forward` gives the post-layernormed last hidden state (B, N, D),
    `hidden_states` the per-layer features LLaVA reads."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        problems = config.problems()
        if problems:
            raise ValueError("; ".join(problems))
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # transformers' SiglipPreTrainedModel._init_weights, minus the head: LeCun-normal patch
        # projection, N(0, 1/width) positions, Xavier-uniform projections with zero biases
        # (MLP biases ~N(0, 1e-6)), LayerNorms at identity.
        if isinstance(module, VisionEmbeddings):
            fan_in = module.patch_embedding.in_channels * module.patch_embedding.kernel_size[0] ** 2
            nn.init.trunc_normal_(module.patch_embedding.weight, std=math.sqrt(1 / fan_in))
            nn.init.zeros_(module.patch_embedding.bias)
            width = module.position_embedding.weight.size(1)
            nn.init.normal_(module.position_embedding.weight, std=1 / math.sqrt(width))
        elif isinstance(module, VisionAttention):
            for p in (module.q_proj, module.k_proj, module.v_proj, module.out_proj):
                nn.init.xavier_uniform_(p.weight)
                nn.init.zeros_(p.bias)
        elif isinstance(module, VisionMLP):
            for p in (module.fc1, module.fc2):
                nn.init.xavier_uniform_(p.weight)
                nn.init.normal_(p.bias, std=1e-6)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def hidden_states(self, pixel_values: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """[embeddings, after layer 1, ..., after layer `upto`] (default all layers), each
        (B, num_patches, hidden_size): transformers' `output_hidden_states` tuple (not
        post-layernormed), computed no further than needed. `pixel_values`: (B, C, H, W)."""
        upto = self.config.num_hidden_layers if upto is None else upto
        x = self.embeddings(pixel_values)
        out = [x]
        for layer in self.encoder.layers[:upto]:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
            out.append(x)
        return out

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`SiglipVisionModel(...).last_hidden_state`: (B, num_patches, hidden_size)."""
        return self.post_layernorm(self.hidden_states(pixel_values)[-1])

    def features(self, pixel_values: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """The hidden states of `layers` (indices into `hidden_states`' list, negative from the
        end: -1 is the last layer's output, as transformers' `vision_feature_layer`) concatenated
        along the width: (B, num_patches, hidden_size * len(layers)). Several layers carry
        both low-level (colour, edges) and high-level features (seed 0's multi-layer choice;
        LLaVA accepts a list for the same purpose)."""
        n = self.config.num_hidden_layers + 1
        index = [i % n for i in layers]
        states = self.hidden_states(pixel_values, upto=max(index))
        return torch.cat([states[i] for i in index], dim=-1)


def pixel_shuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Space-to-depth on a square grid of patch features: (B, N, D) -> (B, N / factor², D·factor²),
    each factor x factor block of neighbouring patches becoming one token (nanoVLM's
    `pixel_shuffle`, Idefics3's connector). Fewer image tokens for the language model at the
    cost of a wider projector input. Raises ValueError when the grid does not divide."""
    if factor == 1:
        return x
    B, N, D = x.shape
    side = math.isqrt(N)
    if side * side != N or side % factor:
        raise ValueError(f"pixel shuffle by {factor} needs a square grid divisible by it; got {N} patches")
    g = side // factor
    x = x.view(B, g, factor, g, factor, D).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, g * g, factor * factor * D)


def load_siglip_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The vision tower's tensors from a SigLIP checkpoint's state dict: `SiglipVisionModel`
    saved by transformers 5 (`embeddings.*`), by transformers 4 (`vision_model.embeddings.*`),
    or a whole `SiglipModel` (its `vision_model.*`; the text tower, the pooling head and the
    logit scale/bias are left out)."""
    out = {}
    for key, value in state.items():
        if key.startswith("vision_model."):
            key = key[len("vision_model."):]
        elif key.startswith(("text_model.", "logit_")):
            continue
        if key.startswith("head.") or key.endswith("position_ids"):
            continue
        out[key] = value
    return out
