"""The Llama model, in one file, top to bottom.

RMSNorm -> rotary position embeddings (RoPE) -> grouped-query attention -> SwiGLU MLP, stacked
into decoder layers. Parameter names and the RoPE layout are exactly those of transformers'
`LlamaForCausalLM` (`model.embed_tokens.weight`, `model.layers.0.self_attn.q_proj.weight`, ...,
`lm_head.weight`), so a state dict copied between the two gives the same logits
(tests/test_model.py checks it). Export is then a config translation, and LoRA adapters use
the module names peft expects on a Llama.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelConfig:
    # Field names follow transformers' LlamaConfig so that export is a plain copy.
    vocab_size: int = 8000
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (no GQA)
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    dropout: float = 0.0
    initializer_range: float = 0.02
    # None: hidden_size / num_attention_heads. Set when a checkpoint's heads are narrower or
    # wider than that (Qwen2.5-0.5B's are not, Gemma's and some Mistral fine-tunes' are).
    head_dim: int | None = None
    # Biases on the q, k and v projections (Qwen2's `attention_bias`; o_proj has none there).
    qkv_bias: bool = False
    # None: plain RoPE. Else one of the scalings of transformers' rope parameters that only
    # change the frequencies (ROPE_SCALINGS): {"rope_type": "linear", "factor": 4.0}, or Llama
    # 3.1/3.2's {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}.
    rope_scaling: dict | None = None

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        """Each attention head's width: `head_dim`, or hidden_size / num_attention_heads."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def problems(self) -> list[str]:
        """Every impossible value, as readable sentences (empty when the config is valid)."""
        out = []
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                out.append(f"model.{name} must be positive, got {getattr(self, name)}")
        if out:
            return out
        if self.head_dim is not None:
            if self.head_dim <= 0 or self.head_dim % 2:
                out.append(f"model.head_dim must be positive and even for rotary embeddings, "
                           f"got {self.head_dim}")
        elif self.hidden_size % self.num_attention_heads:
            out.append(f"model.num_attention_heads ({self.num_attention_heads}) must divide "
                       f"model.hidden_size ({self.hidden_size})")
        elif self.head_size % 2:
            out.append(f"head dimension hidden_size/num_attention_heads = {self.head_size} must be "
                       "even for rotary embeddings")
        if self.kv_heads <= 0 or self.num_attention_heads % self.kv_heads:
            out.append(f"model.num_key_value_heads ({self.kv_heads}) must divide "
                       f"model.num_attention_heads ({self.num_attention_heads})")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.rope_theta <= 0:
            out.append(f"model.rope_theta must be positive, got {self.rope_theta}")
        if not self.rms_norm_eps > 0:
            out.append(f"model.rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if self.rope_scaling is not None:
            out += rope_scaling_problems(self.rope_scaling)
        return out

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 even under bf16/fp16 (as transformers does): the mean of squares
        # overflows fp16 and loses precision in bf16.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# rope_type -> the parameters it needs (transformers' modeling_rope_utils names).
ROPE_SCALINGS = {"linear": ("factor",),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def rope_scaling_problems(scaling) -> list[str]:
    """What is wrong with a `model.rope_scaling` value, as sentences."""
    kind = scaling.get("rope_type") if isinstance(scaling, dict) else None
    if kind not in ROPE_SCALINGS:
        return [f"model.rope_scaling must be null or have rope_type {' or '.join(ROPE_SCALINGS)}, got {scaling!r}"]
    bad = [k for k in ROPE_SCALINGS[kind] if not isinstance(scaling.get(k), (int, float)) or scaling[k] <= 0]
    if bad:
        return [f"model.rope_scaling ({kind}) needs positive {', '.join(bad)}"]
    if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        return ["model.rope_scaling (llama3) needs high_freq_factor > low_freq_factor"]
    return []


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """The (head_dim / 2,) rotation frequencies, fp32: theta^(-2i/d), then scaled. "linear"
    divides them all by the factor (positions interpolated, Chen et al. 2023); "llama3"
    divides only the low frequencies (wavelengths beyond original_max_position_embeddings /
    low_freq_factor) and interpolates between that and none up to / high_freq_factor, as
    transformers' `_compute_llama3_parameters` (Meta's Llama 3.1 code) does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    old = scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def rope_tables(head_dim: int, max_positions: int, theta: float,
                scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_positions, head_dim), in fp32, at the frequencies of
    `rope_inv_freq`.

    The layout is transformers' Llama one ("rotate_half"): the first half of each head's dims
    pairs with the second half, not interleaved pairs as in the original Meta code. Matching it
    means checkpoints move between the two without permuting q_proj/k_proj.

    The sin table's first half is negated: transformers' `rotate_half(x) * sin` is
    (-x2, x1) * (sin, sin), which is exactly (x2, x1) * (-sin, sin) = `x.roll(half) * signed_sin`,
    one op instead of four (chunk, neg, cat) on every decoding step.
    """
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    positions = torch.arange(max_positions, dtype=torch.int64).float()
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    signed_sin = emb.sin()
    signed_sin[:, :head_dim // 2] *= -1
    return emb.cos(), signed_sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    # Rotate in fp32 even under bf16/fp16: positions far into the context lose their angle
    # resolution in 8 bits of mantissa.
    dtype = x.dtype
    if dtype != torch.float32:
        x = x.float()
    x = x * cos + x.roll(x.size(-1) // 2, dims=-1) * signed_sin
    return x if dtype == torch.float32 else x.to(dtype)


class KVCache:
    """Pre-allocated keys and values for every layer: (layers, batch, kv_heads, positions, head_dim).

    Decoding writes one position per step into the same tensors instead of concatenating,
    so memory is allocated once per generation.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (config.num_hidden_layers, batch_size, config.kv_heads, max_len,
                 config.head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # positions filled so far (the same for every layer)
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # narrow + copy_: fewer ops than slice assignment, which counts on a CPU decoding step.
        T = k.size(2)
        keys, values = self.k[layer], self.v[layer]
        keys.narrow(2, self.pos, T).copy_(k)
        values.narrow(2, self.pos, T).copy_(v)
        return keys.narrow(2, 0, self.pos + T), values.narrow(2, 0, self.pos + T)

    def select(self, rows: torch.Tensor) -> None:
        """Keep, reorder or repeat batch rows (one prefill serving several samples, beam
        search following its best beams, finished rows leaving the batch)."""
        self.k = self.k.index_select(1, rows)
        self.v = self.v.index_select(1, rows)

    def drop_front(self, n: int) -> None:
        """Forget the first `n` positions of every row (columns no row uses any more: the left
        padding of a continuously batched cache). A view, not a copy: later positions move to
        the front and `pos` goes back by `n`."""
        self.k, self.v = self.k[:, :, :, n:], self.v[:, :, :, n:]
        self.pos -= n
        self.max_len -= n

    def join(self, other: "KVCache", max_len: int) -> tuple[int, int]:
        """Append `other`'s rows (after this cache's), right-aligned at the later of the two
        positions, in new tensors of `max_len` positions. Returns how many positions this
        cache's rows and `other`'s moved right (the left padding each gained). Raises
        ValueError when the filled positions do not fit `max_len`."""
        pos = max(self.pos, other.pos)
        if pos > max_len:
            raise ValueError(f"{pos} filled positions do not fit {max_len}")
        shape = list(self.k.shape)
        shape[1] += other.k.size(1)
        shape[3] = max_len
        k = self.k.new_zeros(shape)
        v = self.v.new_zeros(shape)
        rows = self.k.size(1)
        shifts = pos - self.pos, pos - other.pos
        for (start, end), cache, shift in zip(((0, rows), (rows, shape[1])), (self, other), shifts):
            k[:, start:end, :, shift:pos] = cache.k[:, :, :, :cache.pos]
            v[:, start:end, :, shift:pos] = cache.v[:, :, :, :cache.pos]
        self.k, self.v, self.pos, self.max_len = k, v, pos, max_len
        return shifts

    def grow(self, max_len: int) -> None:
        """Room for `max_len` positions in new tensors (the filled ones copied)."""
        if max_len <= self.max_len:
            return
        shape = list(self.k.shape)
        shape[3] = max_len
        k, v = self.k.new_zeros(shape), self.v.new_zeros(shape)
        k[:, :, :, :self.pos] = self.k[:, :, :, :self.pos]
        v[:, :, :, :self.pos] = self.v[:, :, :, :self.pos]
        self.k, self.v, self.max_len = k, v, max_len


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.kv_heads
        self.head_dim = config.head_size
        self.dropout = config.dropout
        d, bias = config.hidden_size, config.qkv_bias
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None, mask: torch.Tensor | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        # The fused SDPA kernels (flash, memory-efficient, CPU flash) accumulate the softmax in
        # fp32 whatever the input dtype, so bf16 attention needs no upcast of its own here.
        # A query block that starts at position 0 is plain causal; anything else (decoding
        # after a prefix, padded batches) passes an explicit mask.
        # Grouped-query attention: each key/value head serves n_heads/n_kv_heads query heads;
        # `enable_gqa` lets the kernel share them instead of copying (repeat_interleave), which
        # measured 10-30% faster for attention on CPU and saves the copies' memory on GPU.
        if isinstance(mask, BlockMask):  # packed rows on a GPU: see packed_block_mask
            if self.training and self.dropout > 0:
                raise ValueError("FlexAttention has no attention dropout: use boolean masks with model.dropout > 0")
            y = flex_attention_kernel(q)(q, k, v, block_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.dropout = config.dropout

    def forward(self, x, cos, sin, cache=None, mask=None):
        # Functional dropout: no module call per residual branch when it is off (inference).
        x = x + F.dropout(self.self_attn(self.input_layernorm(x), cos, sin, cache, mask),
                          self.dropout, self.training)
        return x + F.dropout(self.mlp(self.post_attention_layernorm(x)), self.dropout, self.training)


class LlamaBackbone(nn.Module):
    """Holds what transformers calls `model.*`: embeddings, layers and the final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def packed_block_mask(segments: torch.Tensor) -> BlockMask:
    """FlexAttention's block mask for packed rows: causal within each segment (conversation)
    and nothing across segments, for `segments` (B, T), each token's segment number.

    Why not the boolean (B, 1, T, T) mask: given an explicit mask, SDPA leaves the flash kernel
    for the memory-efficient or math one and computes every masked-out block. FlexAttention
    (Dong et al. 2024, torch.nn.attention.flex_attention) skips the blocks that are wholly
    masked and runs a fused kernel on the rest. Its backward exists on CUDA only; the CPU keeps
    the boolean mask (data/sft.py chooses)."""
    B, T = segments.shape

    def same_segment_causal(b, h, q_idx, kv_idx):
        return (segments[b, q_idx] == segments[b, kv_idx]) & (q_idx >= kv_idx)

    return create_block_mask(same_segment_causal, B, None, T, T, device=segments.device)


_compiled_flex_attention = None


def flex_attention_kernel(q: torch.Tensor):
    """flex_attention compiled on CUDA, where compiling generates the fused kernel (eager runs
    its unfused reference, as slow as the math path); eager elsewhere (CPU: tests, forward only)."""
    global _compiled_flex_attention
    if q.device.type != "cuda":
        return flex_attention
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex_attention


def causal_mask_after(start: int, T: int, device: torch.device | str) -> torch.Tensor:
    """(T, start + T) booleans, True where attention is allowed: a block of T new queries after
    `start` cached positions sees the whole prefix and itself causally (query i sees keys up
    to start + i). SDPA's `is_causal` would align the block with key 0 instead, which is only
    right when nothing is cached."""
    return torch.ones(T, start + T, dtype=torch.bool, device=device).tril(start)


class Llama(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        problems = config.problems()
        if problems:
            raise ValueError("; ".join(problems))
        self.config = config
        self.model = LlamaBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        cos, sin = rope_tables(config.head_size, config.max_position_embeddings, config.rope_theta,
                               config.rope_scaling)
        # Not persistent: the state dict keeps exactly transformers' keys.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch's output projection is shrunk by
        # 1/sqrt(2 * layers) so the residual stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0,
                                std=config.initializer_range / math.sqrt(2 * config.num_hidden_layers))

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` (bf16-true training, half-precision loading) would round
        # the RoPE tables too, and apply_rope rotates in fp32 precisely so that far positions
        # keep their angles: the tables are rebuilt in fp32 on the new device instead.
        super()._apply(fn, recurse)
        if self.rope_cos.dtype != torch.float32 and self.rope_cos.device.type != "meta":
            c = self.config
            cos, sin = rope_tables(c.head_size, c.max_position_embeddings, c.rope_theta, c.rope_scaling)
            self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)
        return self

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None, attn_mask: torch.Tensor | None = None,
                last_only: bool = False, position_ids: torch.Tensor | None = None,
                loss_reduction: str = "mean", inputs_embeds: torch.Tensor | None = None):
        """Logits (B, T, vocab) for every position (or (B, 1, vocab), only the last), and the
        cross-entropy over `targets` (B, T) if given: its mean over the target tokens, or with
        `loss_reduction="sum"` their sum in nats (0 when no token is a target, where the mean
        would be NaN). Targets equal to -100 are ignored; the other arguments are those of
        `hidden_states`."""
        x = self.hidden_states(input_ids, cache, attn_mask, position_ids, inputs_embeds)
        if last_only:
            x = x[:, -1:, :]
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            # Cross-entropy in fp32: a bf16 log-softmax over tens of thousands of classes is noisy.
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-100, reduction=loss_reduction)
        return logits, loss

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                      attn_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None,
                      inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """The final-normed hidden states (B, T, hidden), before the LM head. Scoring calls
        this directly so it can apply the head only where it needs logits: the full
        (B, T, vocab) tensor is ~2 GB for a 64k vocabulary at batch 16 x 512.

        `cache`: decode incrementally; positions continue from `cache.pos`, which advances by T.
        `attn_mask`: boolean (B or 1, 1, T, cache.pos + T), True where attention is allowed (or a
        FlexAttention BlockMask from `packed_block_mask`, for packed training rows); needed
        for padded batches.
        `position_ids`: (B, T) rotary positions per token, for packed rows where each
        conversation restarts at 0 (with a block-diagonal `attn_mask`); None means
        start, start+1, ... for every row.
        `inputs_embeds`: (B, T, hidden) input vectors used instead of looking `input_ids` up in
        the embedding (an image-text model puts projected image features at its image
        positions); `input_ids` still gives the shape.
        Raises ValueError when, without `position_ids`, the positions run past the context.
        """
        T = input_ids.size(1)
        cos, sin, attn_mask = self.attention_inputs(input_ids, cache, attn_mask, position_ids)
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        x = F.dropout(x, self.config.dropout, self.training)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training:
                # Recompute each layer's activations in the backward pass (Chen et al. 2016,
                # "Training Deep Nets with Sublinear Memory Cost"): memory per layer drops to
                # its input only, for about one more forward pass of compute.
                x = checkpoint(layer, x, cos, sin, None, attn_mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache, attn_mask)
        if cache is not None:
            cache.pos += T
        return self.model.norm(x)

    def attention_inputs(self, input_ids: torch.Tensor, cache: KVCache | None,
                         attn_mask: torch.Tensor | None, position_ids: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The rotary tables and attention mask every layer of `hidden_states` uses for the
        block `input_ids` (B, T) that follows the `cache.pos` positions already cached.

        Returns (cos, signed_sin, mask): the tables are (T, head_dim) for positions start,
        start+1, ... or (B, 1, T, head_dim) for explicit `position_ids`; the mask is
        `attn_mask` as given, or, when None, a shifted causal one for a block of several
        tokens after a cached prefix (`causal_mask_after`), or None for plain causal attention
        (SDPA's `is_causal`). Raises ValueError when, without `position_ids`, the block ends
        past `max_position_embeddings`.
        """
        _, T = input_ids.shape
        start = cache.pos if cache is not None else 0
        # With explicit positions (left-padded generation) the cache may hold pad slots beyond
        # the context; the positions themselves stay inside it.
        if position_ids is None and start + T > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {start + T} tokens is longer than the context "
                             f"({self.config.max_position_embeddings})")
        cos, sin = self.rope_at(start, T, position_ids)
        if attn_mask is None and start > 0 and T > 1:
            attn_mask = causal_mask_after(start, T, input_ids.device)
        return cos, sin, attn_mask

    def rope_at(self, start: int, T: int,
                position_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the cos and signed-sin tables (see `rope_tables`) for T tokens: positions
        start, ..., start + T - 1 as (T, head_dim), or `position_ids` (B, T) as
        (B, 1, T, head_dim)."""
        if position_ids is None:
            # (T, head_dim): broadcasts over batch and heads.
            return self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        # (B, 1, T, head_dim): one row of the table per token, broadcast over heads. Values are
        # not range-checked here (that would sync with the GPU every step): packing and the
        # generation engine keep them below the context.
        return self.rope_cos[position_ids].unsqueeze(1), self.rope_sin[position_ids].unsqueeze(1)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, max_len or self.config.max_position_embeddings,
                       device=p.device, dtype=p.dtype)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters by part; a tied LM head counts 0 since it shares the embedding."""
        embedding = self.model.embed_tokens.weight.numel()
        head = 0 if self.config.tie_word_embeddings else self.lm_head.weight.numel()
        layers = sum(p.numel() for p in self.model.layers.parameters())
        norm = self.model.norm.weight.numel()
        return {"embedding": embedding, "lm_head": head, "layers": layers, "final_norm": norm,
                "total": embedding + head + layers + norm}

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12*L*d*T."""
        n = self.parameter_counts()
        matmul_params = n["total"] - n["embedding"] + (n["embedding"] if self.config.tie_word_embeddings else 0)
        c = self.config
        return 6 * matmul_params + 12 * c.num_hidden_layers * c.hidden_size * seq_len
