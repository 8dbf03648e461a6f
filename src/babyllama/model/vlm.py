"""An image-text model in LLaVA's shape: image encoder -> projector -> our Llama.

    pixels (N, 3, S, S) --vision_tower--> patch features (N, P, D_v) from the chosen layers,
    concatenated (N, P, D_v * layers) --pixel shuffle--> (N, K, D_v * layers * s²)
    --multi_modal_projector (Linear, GELU, Linear)--> (N, K, D_text)

The text holds one reserved `<|image|>` token per image, expanded before the model sees it
into K copies (`expand_image_tokens`); the embeddings at those K positions are replaced by the
image's K projected features, in order (LLaVA-1.5, Liu et al. 2023; the projector is its
two-layer MLP). Image positions are never training targets: the loss is on the text.

Module names are those of transformers' `LlavaForConditionalGeneration` checkpoints
(`vision_tower.*`, `multi_modal_projector.linear_1.*`, `language_model.model.*`,
`language_model.lm_head.*`), so export writes our state dict as it is.

To the generation engine the model looks like a `Llama` (config, new_cache, forward with a KV
cache): images only enter the prefill, as `pixel_values`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from babyllama.model.llama import KVCache, Llama, ModelConfig
from babyllama.model.vision import VisionConfig, VisionTransformer, pixel_shuffle

PROJECTOR_ACTIVATIONS = {"gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
# The parts of the model, for freezing and per-part learning rates.
PARTS = ("vision", "projector", "language")


@dataclass
class VLMConfig:
    """The image side of an image-text model (the text side is the run's `model:` section)."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    # Hidden states fed to the projector, concatenated: indices into [embeddings, layer 1, ...,
    # layer L]; -1 is the last layer (LLaVA-1.5 uses -2 of CLIP; seed 0 concatenates several).
    feature_layers: list[int] = field(default_factory=lambda: [-1])
    pixel_shuffle: int = 1             # s: s x s neighbouring patches -> one image token
    projector_hidden_act: str = "gelu"  # LLaVA's default
    image_token_id: int = -1           # the tokenizer's <|image|> id (set when a run starts)

    @property
    def image_tokens(self) -> int:
        """K: the language-model positions one image takes."""
        return self.vision.num_patches // self.pixel_shuffle ** 2

    def problems(self) -> list[str]:
        out = self.vision.problems()
        if out:
            return out
        n = self.vision.num_hidden_layers
        if not self.feature_layers:
            out.append("vlm.feature_layers needs at least one layer")
        for i in self.feature_layers:
            if not -(n + 1) <= i <= n:
                out.append(f"vlm.feature_layers: {i} is not a layer of a {n}-layer encoder "
                           f"(0 = embeddings, 1..{n}, or -1..-{n + 1} from the end)")
        s = self.pixel_shuffle
        if s < 1:
            out.append(f"vlm.pixel_shuffle must be at least 1, got {s}")
        elif self.vision.grid % s:
            out.append(f"vlm.pixel_shuffle ({s}) must divide the {self.vision.grid}x{self.vision.grid} "
                       f"patch grid (vlm.vision.image_size / patch_size)")
        if self.projector_hidden_act not in PROJECTOR_ACTIVATIONS:
            out.append(f"vlm.projector_hidden_act must be one of {', '.join(PROJECTOR_ACTIVATIONS)}; "
                       f"got {self.projector_hidden_act!r}")
        return out

    def to_dict(self) -> dict:
        return asdict(self)


class Projector(nn.Module):
    """LLaVA-1.5's projector: Linear(in, d_text) -> GELU -> Linear(d_text, d_text), with biases
    (`LlavaMultiModalProjector`)."""

    def __init__(self, in_features: int, out_features: int, act: str):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features)
        self.linear_2 = nn.Linear(out_features, out_features)
        self.act = PROJECTOR_ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class VisionLanguageModel(nn.Module):
    def __init__(self, text: ModelConfig, config: VLMConfig):
        super().__init__()
        problems = config.problems()
        if problems:
            raise ValueError("; ".join(problems))
        self.vlm_config = config
        self.vision_tower = VisionTransformer(config.vision)
        width = config.vision.hidden_size * len(config.feature_layers) * config.pixel_shuffle ** 2
        self.multi_modal_projector = Projector(width, text.hidden_size, config.projector_hidden_act)
        # transformers' LLaVA initialises the projector like any Linear: N(0, initializer_range).
        for p in (self.multi_modal_projector.linear_1, self.multi_modal_projector.linear_2):
            nn.init.normal_(p.weight, std=text.initializer_range)
            nn.init.zeros_(p.bias)
        self.language_model = Llama(text)

    # -- what the engine, scoring and the trainer read from a Llama -------------------------
    @property
    def config(self) -> ModelConfig:
        return self.language_model.config

    @property
    def lm_head(self) -> nn.Linear:
        return self.language_model.lm_head

    @property
    def gradient_checkpointing(self) -> bool:
        return self.language_model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.language_model.gradient_checkpointing = value
        self.vision_tower.gradient_checkpointing = value

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        return self.language_model.new_cache(batch_size, max_len)

    # -- images ------------------------------------------------------------------------------
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image features (N, K, text hidden) of `pixel_values` (N, C, S, S), in the
        model's dtype."""
        c = self.vlm_config
        x = self.vision_tower.features(pixel_values, c.feature_layers)
        return self.multi_modal_projector(pixel_shuffle(x, c.pixel_shuffle))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Input vectors (B, T, hidden): token embeddings, with the image token positions
        replaced, in reading order, by the features of `pixel_values` (N, C, S, S) (row-major:
        all of row 0's images, then row 1's). Raises ValueError when the number of image token
        positions is not N * K."""
        embeds = self.language_model.model.embed_tokens(input_ids)
        if pixel_values is None or pixel_values.size(0) == 0:
            return embeds
        features = self.image_features(pixel_values)
        where = input_ids == self.vlm_config.image_token_id
        n = int(where.sum())
        if n != features.size(0) * features.size(1):
            raise ValueError(f"{n} image token positions for {features.size(0)} image(s) of "
                             f"{features.size(1)} tokens each")
        return embeds.masked_scatter(where.unsqueeze(-1), features.to(embeds.dtype))

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None, attn_mask: torch.Tensor | None = None,
                last_only: bool = False, position_ids: torch.Tensor | None = None,
                loss_reduction: str = "mean", pixel_values: torch.Tensor | None = None):
        """`Llama.forward` with images: `pixel_values` (N, C, S, S) for the N images whose
        expanded tokens `input_ids` (B, T) holds (see `embed`). Returns (logits, loss)."""
        embeds = None if pixel_values is None else self.embed(input_ids, pixel_values)
        return self.language_model(input_ids, targets, cache=cache, attn_mask=attn_mask,
                                   last_only=last_only, position_ids=position_ids,
                                   loss_reduction=loss_reduction, inputs_embeds=embeds)

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                      attn_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                      pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """`Llama.hidden_states` with images (see `forward`)."""
        embeds = None if pixel_values is None else self.embed(input_ids, pixel_values)
        return self.language_model.hidden_states(input_ids, cache, attn_mask, position_ids, embeds)

    # -- parts -----------------------------------------------------------------------------
    def part_modules(self) -> dict[str, nn.Module]:
        return {"vision": self.vision_tower, "projector": self.multi_modal_projector,
                "language": self.language_model}

    def set_trainable(self, **parts: bool) -> None:
        """Freeze (False) or unfreeze (True) whole parts: vision=, projector=, language=."""
        modules = self.part_modules()
        for name, trainable in parts.items():
            for p in modules[name].parameters():
                p.requires_grad_(trainable)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters by part ("vision", "projector", "language", "total") and the language
        model's own breakdown (`Llama.parameter_counts`, its "total" as "language")."""
        text = self.language_model.parameter_counts()
        vision = sum(p.numel() for p in self.vision_tower.parameters())
        projector = sum(p.numel() for p in self.multi_modal_projector.parameters())
        out = {k: v for k, v in text.items() if k != "total"}
        out.update(vision=vision, projector=projector, language=text["total"],
                   total=vision + projector + text["total"])
        return out


def part_of(name: str) -> str:
    """Which part ("vision", "projector", "language") a parameter name belongs to, also under
    a peft wrapper's prefixes (`base_model.model.vision_tower...`)."""
    for prefix, part in (("vision_tower.", "vision"), ("multi_modal_projector.", "projector")):
        if name.startswith(prefix) or f".{prefix}" in name:
            return part
    return "language"


def expand_image_tokens(ids: list[int], image_token_id: int, k: int) -> list[int]:
    """`ids` with each image token repeated `k` times (the positions the image's features fill)."""
    out: list[int] = []
    for t in ids:
        if t == image_token_id:
            out.extend([t] * k)
        else:
            out.append(t)
    return out
