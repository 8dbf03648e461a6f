"""Released model families as our Llama: which checkpoints map onto it exactly, and how.

Every family here is a Llama-style decoder (pre-norm RMSNorm, rotary embeddings in transformers'
"rotate_half" layout, SwiGLU MLP) that differs from transformers' `LlamaForCausalLM` only in a
config field or in how its tensors are laid out, so the import is a translation and the logits
are the original model's (tests/test_families.py compares them with transformers' own classes):

    family         model_type  differs by                          at import
    Llama, Yi,     llama       -                                    -
      Chinese-LLaMA
    Mistral        mistral     sliding-window attention            context capped at the window
    Qwen2, 2.5     qwen2       biases on q, k, v                   ModelConfig.qkv_bias
    Baichuan-7B    baichuan    q, k, v fused as `W_pack`           split into q_proj, k_proj, v_proj
    Baichuan2-7B   baichuan    `W_pack`; LM head rows normalised   split; rows normalised once
                                 at every forward (NormHead)
    InternLM2      internlm2   q, k, v fused per KV group as       split and renamed
                                 `wqkv`; its own tensor names

Capping Mistral's context at its sliding window is exact: within the window, sliding-window
attention is plain causal attention. Folding Baichuan2's NormHead is exact for inference;
fine-tuning then trains a plain head (the rows are no longer renormalised at each step).
RoPE scalings that only change the frequencies are kept (`ModelConfig.rope_scaling`: "linear",
and "llama3" of Llama 3.1/3.2); "dynamic" (InternLM2) changes nothing up to
`max_position_embeddings`, which stays the context, so it is left out; yarn, longrope and the
others, which also rescale attention or depend on the length, are refused by name.

What cannot map exactly is refused in one line saying why (REFUSED): ALiBi instead of rotary
positions (Baichuan-13B, Baichuan2-13B), ChatGLM's rotary on half of each head and its own
block layout, MOSS's GPT-J/CodeGen block (parallel attention and MLP, LayerNorm, GELU), ...
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from babyllama.errors import UserError
from babyllama.model.llama import ROPE_SCALINGS, ModelConfig

# config.json fields that mean the same in every family here and in our ModelConfig.
SHARED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
               "rope_theta", "rms_norm_eps", "tie_word_embeddings", "initializer_range", "head_dim")

# model_type -> why it cannot be our Llama.
REFUSED = {
    "chatglm": "ChatGLM applies rotary embeddings to half of each head's dimensions (2D "
               "positions) and has its own block layout, which our Llama cannot express",
    "moss": "MOSS is a CodeGen/GPT-J block (attention and MLP in parallel, LayerNorm, GELU, "
            "partial rotary), not a Llama",
    "codegen": "CodeGen is a GPT-J block (attention and MLP in parallel, LayerNorm, GELU), not a Llama",
    "gptj": "GPT-J runs attention and MLP in parallel with LayerNorm and GELU, not a Llama",
    "qwen": "Qwen (v1) ships its own code (fused c_attn with biases, its own names); Qwen1.5 and "
            "later (model_type qwen2) import",
    "qwen3": "Qwen3 normalises each head's queries and keys (q_norm, k_norm), which our Llama has not",
    "gemma": "Gemma scales the embeddings by sqrt(hidden_size), adds 1 to its RMSNorm weights and "
             "uses GELU",
    "gemma2": "Gemma 2 soft-caps its logits and alternates local and global attention",
    "phi": "Phi uses LayerNorm, GELU, partial rotary and parallel blocks",
    "gpt2": "GPT-2 has learned positions, LayerNorm and GELU",
    "bloom": "BLOOM uses ALiBi positions and LayerNorm",
}

# Baichuan2's architecture name (its LM head is a NormHead); Baichuan-7B's is "BaiChuanForCausalLM".
BAICHUAN2_ARCHITECTURE = "BaichuanForCausalLM"


@dataclass(frozen=True)
class Family:
    """One family: its name for messages and `model_type`, and the notes of its import."""
    name: str
    model_type: str
    notes: tuple[str, ...] = ()


def identify(d: dict, source) -> Family:
    """The family of the transformers config.json dict `d` (read from `source`). Raises a
    one-line UserError naming the model type and why, for what cannot map exactly."""
    kind = d.get("model_type")
    if any(str(a).endswith("ForSequenceClassification") for a in d.get("architectures") or []):
        raise UserError(f"{source}: a sequence classification (reward) model, not a language model")
    if kind in REFUSED:
        raise UserError(f"{source}: cannot import model_type {kind!r}: {REFUSED[kind]}")
    if kind == "baichuan":
        # The 13B models use ALiBi; their configs have no max_position_embeddings (only
        # model_max_length), and they are the only Baichuan of width 5120.
        if "max_position_embeddings" not in d or d.get("hidden_size") == 5120:
            raise UserError(f"{source}: cannot import this Baichuan: it uses ALiBi position biases "
                            "(Baichuan-13B, Baichuan2-13B), not rotary embeddings; the 7B models import")
        architectures = d.get("architectures") or []
        if not {BAICHUAN2_ARCHITECTURE, "BaiChuanForCausalLM"} & set(architectures):
            raise UserError(f"{source}: a Baichuan config naming neither BaiChuanForCausalLM (Baichuan-7B) "
                            f"nor {BAICHUAN2_ARCHITECTURE} (Baichuan2, whose LM head is normalised) in "
                            "architectures: which head it has cannot be told")
        normhead = BAICHUAN2_ARCHITECTURE in architectures
        return Family("Baichuan2" if normhead else "Baichuan", kind,
                      ("LM head rows normalised once (Baichuan2's NormHead)",) if normhead else ())
    names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "internlm2": "InternLM2"}
    if kind not in names:
        raise UserError(f"{source}: cannot import model_type {kind!r} (these import: "
                        f"{', '.join(sorted([*names, 'baichuan']))})")
    return Family(names[kind], kind)


def model_config(d: dict, source) -> tuple[ModelConfig, Family]:
    """Our ModelConfig for the config.json dict `d`, and its family (with notes on what the
    import changed). Raises UserError naming each setting our model cannot represent."""
    fam = identify(d, source)
    problems, notes = [], list(fam.notes)
    if d.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {d['hidden_act']!r} (ours is silu)")
    if d.get("mlp_bias"):
        problems.append("mlp_bias true (our MLP has no biases)")
    qkv_bias = fam.model_type == "qwen2"  # Qwen2 always has them; its config has no switch
    if fam.model_type in ("llama", "mistral") and d.get("attention_bias"):
        # transformers' Llama puts the bias on o_proj as well, which ours has not.
        problems.append("attention_bias true (biases on q, k, v and o; ours can only have q, k, v)")
    if fam.model_type == "internlm2" and d.get("bias"):
        problems.append("bias true (InternLM2's wqkv and wo biases)")
    values = {k: d[k] for k in SHARED_KEYS if d.get(k) is not None}
    for key, value in values.items():
        if key == "tie_word_embeddings":
            ok, kind = isinstance(value, bool), "true or false"
        elif key in ("rope_theta", "rms_norm_eps", "initializer_range"):
            ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        else:
            ok, kind = isinstance(value, int) and not isinstance(value, bool), "a whole number"
        if not ok:
            raise UserError(f"{source}: {key} is {value!r}, not {kind}")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in values]
    if missing:
        raise UserError(f"{source}: no {', '.join(missing)} (a Llama-family config names them)")
    # transformers 5 writes `rope_parameters`, 4.x and the checkpoints' own code `rope_scaling`;
    # either may carry the scaling.
    ropes = [r for r in (d.get("rope_parameters"), d.get("rope_scaling")) if isinstance(r, dict)]
    for rope in ropes:
        if "rope_theta" not in values and "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
    rope_types = {r.get("rope_type") or r.get("type") or "default" for r in ropes} - {"default"}
    if rope_types == {"dynamic"}:
        notes.append("dynamic RoPE scaling left out: it changes nothing up to the context of "
                     f"{values.get('max_position_embeddings')} tokens, which is kept")
    elif len(rope_types) == 1 and (kind := next(iter(rope_types))) in ROPE_SCALINGS:
        rope = next(r for r in ropes if (r.get("rope_type") or r.get("type")) == kind)
        values["rope_scaling"] = {"rope_type": kind, **{k: rope.get(k) for k in ROPE_SCALINGS[kind]}}
    elif rope_types:
        problems.append(f"rope scaling {' and '.join(map(repr, sorted(rope_types)))} (ours: "
                        f"{', '.join(ROPE_SCALINGS)}, or dynamic within the context)")
    if any(r.get("partial_rotary_factor", 1.0) != 1.0 for r in [d, *ropes]):
        problems.append("partial_rotary_factor below 1 (ours rotates whole heads)")
    window = d.get("sliding_window")
    sliding = fam.model_type == "mistral" or (fam.model_type == "qwen2" and d.get("use_sliding_window")
                                              and _qwen2_slides(d))
    if sliding and window is not None and (not isinstance(window, int) or window <= 0):
        problems.append(f"sliding_window {window!r} (a positive number of tokens, or null)")
    elif sliding and window and window < values.get("max_position_embeddings", 0):
        notes.append(f"context capped at the sliding window, {window} tokens (within it, "
                     "sliding-window attention is full attention)")
        values["max_position_embeddings"] = window
    if problems:
        raise UserError(f"{source}: cannot import: " + "; ".join(problems))
    if values.get("head_dim") == values.get("hidden_size", 0) // max(1, values.get("num_attention_heads", 1)):
        del values["head_dim"]  # the default: keep config.yaml free of it
    config = ModelConfig(**values, qkv_bias=qkv_bias)
    if bad := config.problems():
        raise UserError(f"{source}: " + "; ".join(bad))
    return config, Family(fam.name, fam.model_type, tuple(notes))


def trim_vocabulary(state: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """Keep the first `n` rows of the embedding and the LM head: released models round their
    tables up past their tokenizer (Qwen2.5: 151,936 rows for 151,665 tokens), and a row no
    token has could be sampled but never decoded. Dropping them is what masking their logits
    would do: the real tokens' logits are unchanged and the padding gets no probability."""
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key in state and state[key].size(0) > n:
            state[key] = state[key][:n].contiguous()
    return state


def _qwen2_slides(d: dict) -> bool:
    """Whether any layer of a Qwen2 with use_sliding_window uses it: transformers' layer_types
    when given, else the layers from max_window_layers on (configuration_qwen2.py)."""
    if isinstance(d.get("layer_types"), list):
        return "sliding_attention" in d["layer_types"]
    return d.get("max_window_layers", 28) < d.get("num_hidden_layers", 0)


def convert_state(fam: Family, state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under our (transformers Llama) names, with fused q/k/v split
    and Baichuan2's head normalised. `state` is consumed (tensors moved, not copied)."""
    # Old checkpoints saved the RoPE frequencies as a buffer; ours recomputes them.
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if fam.model_type == "baichuan":
        for key in [k for k in state if k.endswith("self_attn.W_pack.weight")]:
            prefix = key[: -len("W_pack.weight")]
            # Rows [q; k; v] (each hidden_size wide in the released models, which have no GQA).
            d = config.head_size
            sizes = [config.num_attention_heads * d, config.kv_heads * d, config.kv_heads * d]
            if state[key].size(0) != sum(sizes):
                raise UserError(f"{key} has {state[key].size(0)} rows; the config needs {sum(sizes)} "
                                "(q, k and v heads)")
            q, k, v = state.pop(key).split(sizes, dim=0)
            state.update({prefix + "q_proj.weight": q, prefix + "k_proj.weight": k,
                          prefix + "v_proj.weight": v})
        if fam.name == "Baichuan2" and "lm_head.weight" in state:
            # NormHead: logits = x @ normalize(W).T, W's rows scaled to unit L2 norm each forward.
            state["lm_head.weight"] = torch.nn.functional.normalize(state["lm_head.weight"].float(), dim=-1)
    elif fam.model_type == "internlm2":
        state = _internlm2_state(state, config)
    return state


_INTERNLM2_NAMES = {
    "model.tok_embeddings.weight": "model.embed_tokens.weight",
    "output.weight": "lm_head.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


def _internlm2_state(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """InternLM2's names -> ours; `wqkv` split. Its rows are grouped per KV head: for each of
    the kv_heads groups, the group's n_heads/kv_heads query heads, then its key head, then its
    value head (modeling_internlm2.py: rearrange "(h gs d)" with gs = groups + 2)."""
    out = {}
    groups = config.num_attention_heads // config.kv_heads
    d = config.head_size
    for key, value in state.items():
        if key.endswith("attention.wqkv.weight"):
            prefix = key[: -len("attention.wqkv.weight")] + "self_attn."
            if value.size(0) != config.kv_heads * (groups + 2) * d:
                raise UserError(f"{key} has {value.size(0)} rows; the config needs "
                                f"{config.kv_heads * (groups + 2) * d} (q, k and v heads)")
            w = value.view(config.kv_heads, groups + 2, d, value.size(-1))
            out[prefix + "q_proj.weight"] = w[:, :groups].reshape(-1, value.size(-1))
            out[prefix + "k_proj.weight"] = w[:, -2].reshape(-1, value.size(-1))
            out[prefix + "v_proj.weight"] = w[:, -1].reshape(-1, value.size(-1))
            continue
        for theirs, ours in _INTERNLM2_NAMES.items():
            if key == theirs or key.endswith("." + theirs) and key.startswith("model.layers."):
                key = key[: len(key) - len(theirs)] + ours
                break
        out[key] = value
    return out
