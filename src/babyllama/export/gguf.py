"""One .gguf file that llama.cpp loads as it is: architecture "llama", our weights under
llama.cpp's tensor names, and the tokenizer inside.

Choices, and why (llama.cpp's own convert_hf_to_gguf.py, class LlamaModel, is the reference):

- q_proj and k_proj rows are permuted. Our RoPE is transformers' "rotate_half" layout: dim i
  of a head rotates with dim i + head_dim/2. llama.cpp's llama architecture uses the original
  interleaved layout ("NORM" rope type): dim 2i rotates with dim 2i + 1. Reordering the output
  rows of q_proj and k_proj (k with its own, possibly fewer, heads) so that new row 2i is old
  row i and new row 2i + 1 is old row i + head_dim/2 gives the same attention scores; it is
  exactly the converter's `LlamaModel.permute`. v_proj and o_proj are untouched.
- q/k/v biases (a model imported from Qwen2) are written as llama.cpp's optional
  `attn_q.bias`, `attn_k.bias`, `attn_v.bias`, permuted as their rows; heads whose width is not
  hidden / heads get `attention.key_length` and `value_length`.
- RoPE scaling: "linear" as llama.cpp's linear scaling type and factor; Llama 3.1's "llama3"
  as the per-frequency divisors in `rope_freqs.weight`, as llama.cpp's converter writes them.
- 1-D tensors (the RMSNorm weights, biases) are always f32: llama.cpp's kernels expect them so and
  they are a negligible share of the file.
- q8_0 needs rows that are a whole number of 32-value blocks. A matrix whose rows are not
  (hidden size 48, say) is written as f16 instead, as the converter does, and reported.
- A tied LM head writes no `output.weight`: llama.cpp then reads the logits off token_embd.
- Tokenizers. "tokenizer.ggml.pre" names the pre-tokenizer (the regex that cuts text into
  words before BPE) that llama.cpp reimplements in C++; it must match the one the merges
  were learned with, or llama.cpp tokenizes text differently from us.
    * byte-level BPE (tokenizer.ggml.model "gpt2"): GPT-2's ByteLevel regex -> "gpt-2"
      (identical). Qwen2's split regex, then ByteLevel without its own regex -> "qwen2"; its
      NFC normalizer is left out with a warning (llama.cpp's converter does the same).
      Individual digits, then GPT-2's regex -> "starcoder", whose regexes are
      exactly `\\p{N}` then GPT-2's (HF's `Digits(individual_digits=True)` isolates
      `char::is_numeric`, i.e. \\p{N}). Han characters isolated one by one (our "cjk-chars"
      pretokenizers) exist in no llama.cpp pre type: they are written with the same type minus
      the Han split, plus a warning. The ids and weights stay exact, but llama.cpp's own
      tokenization differs next to Han characters: GPT-2's regex gives a run of spaces before
      a letter all but its last space, which joins the letter's word, so "x  中" is cut into
      "x", " ", " 中" by llama.cpp but "x", "  ", "中" by us (the Han split ends the piece
      before the regex sees the letter); a merge joining bytes across a Han character boundary
      (learnable from mixed-script text) would differ too. On zhwiki paragraphs, with 8k-token
      tokenizers, ordinary text tokenized identically. Anything else (a normalizer, another
      pre-tokenizer) is refused rather than exported with the wrong tokenization.
    * SentencePiece (tokenizer.ggml.model "llama", llama.cpp's SPM tokenizer): BPE models with
      byte fallback and no normalization beyond the space-to-"▁" escape, i.e. Llama's. Unigram
      models, whitespace collapsing or a normalization charsmap are refused: llama.cpp's SPM
      tokenizer does none of them. Our special tokens appended after the last piece are
      CONTROL tokens.
  Both: a model whose vocabulary is larger than the tokenizer's (rounded up for speed) gets
  "[PAD{i}]" tokens of type UNUSED for the extra ids, as the converter writes them.
- Prompts start with bos (add_bos_token true), never end with eos.

The file is written under a temporary name in the target folder and renamed into place, so a
reader never sees half a file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from babyllama.atomic import atomic_path
from babyllama.errors import UserError
from babyllama.model.llama import rope_inv_freq

GGUF_TYPES = ("f32", "f16", "q8_0")

_PAD_SCORE = -1000.0  # what convert_hf_to_gguf gives padding and added tokens


@dataclass
class GGUFExport:
    """What the CLI prints after an export."""
    path: Path
    dtype: str
    n_tensors: int
    size_bytes: int
    f16_fallback: list[str] = field(default_factory=list)  # q8_0 tensors written as f16
    warnings: list[str] = field(default_factory=list)      # one line each


@dataclass
class _Vocab:
    model: str                  # tokenizer.ggml.model
    pre: str                    # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]            # gguf.TokenType values
    merges: list[str] | None = None
    scores: list[float] | None = None
    add_space_prefix: bool | None = None
    warnings: list[str] = field(default_factory=list)


def write_gguf(model, tokenizer, path: str | Path, dtype: str = "f16", name: str = "babyllama",
               chat: bool | None = None) -> GGUFExport:
    """Write `model` (our Llama) and `tokenizer` to one .gguf file at `path`.

    `dtype`: one of GGUF_TYPES for the matrices (norms stay f32). `chat`: False leaves the
    tokenizer's chat template out (a base model should not advertise one); None or True write
    it when the tokenizer has one, and True warns when it has none.
    """
    import gguf

    if dtype not in GGUF_TYPES:
        raise UserError(f"GGUF type {dtype!r}: unknown, choose one of {', '.join(GGUF_TYPES)}")
    config = model.config
    vocab = _vocab(tokenizer, config.vocab_size)
    tensors = _tensors(model)
    warnings = list(vocab.warnings)
    path = Path(path)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        try:
            _add_model_metadata(writer, config, name, dtype)
            _add_vocab(writer, vocab, tokenizer)
            template = _chat_template(tokenizer, chat, warnings)
            if template:
                writer.add_chat_template(template)
            fallback = [n for n, t in tensors.items() if _add_tensor(writer, n, t, dtype)]
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    if fallback:
        rows = sorted({tensors[n].shape[-1] for n in fallback})
        warnings.append(f"q8_0 needs rows of a multiple of 32 values: {len(fallback)} of "
                        f"{sum(t.ndim > 1 for t in tensors.values())} matrices (rows of "
                        f"{', '.join(map(str, rows))}) were written as f16")
    return GGUFExport(path, dtype, len(tensors), path.stat().st_size, fallback, warnings)


# ----------------------------------------------------------------------------------------
# Weights


def permute_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q_proj/k_proj rows from transformers' rotate_half layout to llama.cpp's interleaved
    one (convert_hf_to_gguf's `LlamaModel.permute`): per head, row 2i <- i, 2i+1 <- i + d/2."""
    rows = weight.shape[0]
    return (weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def _tensors(model) -> dict[str, torch.Tensor]:
    """llama.cpp name -> fp32 tensor."""
    import gguf

    c = model.config
    names = gguf.TENSOR_NAMES
    T = gguf.MODEL_TENSOR
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = {f"{names[T.TOKEN_EMBD]}.weight": sd["model.embed_tokens.weight"]}
    per_layer = {
        T.ATTN_NORM: "input_layernorm", T.ATTN_Q: "self_attn.q_proj",
        T.ATTN_K: "self_attn.k_proj", T.ATTN_V: "self_attn.v_proj",
        T.ATTN_OUT: "self_attn.o_proj", T.FFN_NORM: "post_attention_layernorm",
        T.FFN_GATE: "mlp.gate_proj", T.FFN_UP: "mlp.up_proj", T.FFN_DOWN: "mlp.down_proj",
    }
    for i in range(c.num_hidden_layers):
        for kind, ours in per_layer.items():
            # q/k/v biases (Qwen2): llama.cpp's llama architecture adds them when present
            # (attn_q.bias, ...); a bias row moves with its weight row.
            for part in ("weight", "bias"):
                w = sd.get(f"model.layers.{i}.{ours}.{part}")
                if w is None:
                    continue
                if kind == T.ATTN_Q:
                    w = permute_rope(w, c.num_attention_heads)
                elif kind == T.ATTN_K:
                    w = permute_rope(w, c.kv_heads)
                out[f"{names[kind].format(bid=i)}.{part}"] = w
    if c.rope_scaling and c.rope_scaling["rope_type"] == "llama3":
        # llama.cpp divides each frequency by its factor from this tensor (convert_hf_to_gguf
        # writes Llama 3.1's this way): ours over the scaled frequencies, 1 where unchanged.
        plain = rope_inv_freq(c.head_size, c.rope_theta)
        out[f"{names[T.ROPE_FREQS]}.weight"] = plain / rope_inv_freq(c.head_size, c.rope_theta, c.rope_scaling)
    out[f"{names[T.OUTPUT_NORM]}.weight"] = sd["model.norm.weight"]
    if not c.tie_word_embeddings:
        out[f"{names[T.OUTPUT]}.weight"] = sd["lm_head.weight"]
    return out


def _add_tensor(writer, name: str, tensor: torch.Tensor, dtype: str) -> bool:
    """Add one tensor in its file type; True when a q8_0 matrix fell back to f16."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    data = tensor.contiguous().numpy()
    if data.ndim == 1 or dtype == "f32":
        writer.add_tensor(name, data.astype(np.float32))
        return False
    if dtype == "q8_0" and data.shape[-1] % 32 == 0:
        writer.add_tensor(name, quants.quantize(data, Q.Q8_0), raw_dtype=Q.Q8_0)
        return False
    writer.add_tensor(name, data.astype(np.float16))
    return dtype == "q8_0"


def _add_model_metadata(writer, config, name: str, dtype: str) -> None:
    import gguf

    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_name(name)
    writer.add_file_type(file_types[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.kv_heads)
    writer.add_rope_dimension_count(config.head_size)
    if config.head_dim is not None:  # heads not hidden_size / num_attention_heads wide
        writer.add_key_length(config.head_size)
        writer.add_value_length(config.head_size)
    writer.add_rope_freq_base(float(config.rope_theta))
    if config.rope_scaling and config.rope_scaling["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(config.rope_scaling["factor"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))


# ----------------------------------------------------------------------------------------
# Tokenizer


def _vocab(tokenizer, model_vocab: int) -> _Vocab:
    if model_vocab < tokenizer.vocab_size:
        raise UserError(f"the model has {model_vocab} token embeddings but its tokenizer "
                        f"{tokenizer.vocab_size} tokens")
    vocab = _bpe_vocab(tokenizer) if tokenizer.kind == "hf-bpe" else _sentencepiece_vocab(tokenizer)
    _pad(vocab, model_vocab)
    return vocab


def _pad(vocab: _Vocab, size: int) -> None:
    from gguf import TokenType

    for i in range(len(vocab.tokens), size):
        vocab.tokens.append(f"[PAD{i}]")
        vocab.types.append(TokenType.UNUSED)
        if vocab.scores is not None:
            vocab.scores.append(_PAD_SCORE)


def _add_vocab(writer, vocab: _Vocab, tokenizer) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    if tokenizer.unk_id is not None:
        writer.add_unk_token_id(tokenizer.unk_id)
    # ChatML's end of turn is where our chat engine stops answering (stop_token_ids);
    # llama.cpp would guess it from the text "<|im_end|>", this says it.
    im_end = tokenizer.token_to_id(tokenizer.special_tokens.get("im_end", "<|im_end|>"))
    if im_end is not None:
        writer.add_eot_token_id(im_end)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def _chat_template(tokenizer, chat: bool | None, warnings: list[str]) -> str | None:
    if chat is False:
        return None
    if chat and not tokenizer.chat_template:
        warnings.append("the tokenizer has no chat template: llama.cpp will format chats "
                        "with its own default")
    return tokenizer.chat_template or None


# -- byte-level BPE ----------------------------------------------------------------------

# Pre-tokenizer steps, in order and without the Han split (which no pre type has), -> the
# llama.cpp pre type with exactly those regexes.
_BPE_PRE = {
    ("bytelevel",): "gpt-2",
    ("digits", "bytelevel"): "starcoder",
    ("qwen2-regex", "bytelevel-raw"): "qwen2",
}
# Qwen2's own split (its tokenizer.json), which llama.cpp's "qwen2" pre type reimplements.
QWEN2_PRE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _bpe_vocab(tokenizer) -> _Vocab:
    from gguf import TokenType

    spec = json.loads(tokenizer.backend.to_str())
    normalizer_warnings = _check_bpe_model(spec)
    pre, warnings = _bpe_pre(spec.get("pre_tokenizer"))
    warnings += normalizer_warnings
    added = tokenizer.backend.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(tokenizer.vocab_size):
        token = tokenizer.id_to_token(i)
        if token is None:  # a hole in the ids
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        tokens.append(token)
        if i in added:
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return _Vocab("gpt2", pre, tokens, types, merges=merges, warnings=warnings)


def _check_bpe_model(spec: dict) -> list[str]:
    """Refuse what llama.cpp's byte-level BPE cannot do; the warnings for what it nearly does."""
    normalizer = spec.get("normalizer")
    warnings = []
    if normalizer is not None and normalizer.get("type") == "NFC":
        # Qwen2's tokenizer.json; llama.cpp's converter writes it without the normalizer too.
        warnings.append("the tokenizer normalises text to Unicode NFC, which llama.cpp does not: "
                        "text already in NFC (almost all) tokenizes the same")
    elif normalizer is not None:
        raise UserError(f"tokenizer.json has a normalizer ({normalizer.get('type')}); "
                        "llama.cpp's byte-level BPE applies none, so GGUF export refuses it")
    m = spec.get("model", {})
    odd = [k for k in ("dropout", "continuing_subword_prefix", "end_of_word_suffix",
                       "ignore_merges", "byte_fallback") if m.get(k)]
    if m.get("type") != "BPE" or odd:
        what = f"options {', '.join(odd)}" if odd else f"model {m.get('type')}"
        raise UserError(f"tokenizer.json: {what} not supported by llama.cpp's byte-level "
                        "BPE (GGUF export needs a plain BPE model)")
    return warnings


def _bpe_pre(spec: dict | None) -> tuple[str, list[str]]:
    """llama.cpp pre type for a tokenizer.json pre_tokenizer, and the warnings it needs."""
    steps = _pre_steps(spec)
    han = "han" in steps
    core = tuple(s for s in steps if s != "han")
    if core not in _BPE_PRE or (steps and steps[-1] not in ("bytelevel", "bytelevel-raw")):
        raise UserError(f"tokenizer.json: pre-tokenizer {json.dumps(spec)} has no llama.cpp "
                        "equivalent (GGUF export supports GPT-2's byte-level regex, "
                        "optionally after individual digits, and Qwen2's)")
    pre = _BPE_PRE[core]
    warnings = []
    if han:
        warnings.append(f"the pretokenizer isolates each Han character, which no llama.cpp "
                        f"pre type does; written as {pre!r}, llama.cpp's own tokenization can "
                        "differ from ours next to Han characters (two spaces before one: one "
                        "token for us, two for llama.cpp); token ids and weights are exact")
    return pre, warnings


def _pre_steps(spec: dict | None) -> list[str]:
    """Our names for the steps of a pre-tokenizer; 'other' for one we cannot express."""
    if spec is None:
        return ["other"]
    items = spec.get("pretokenizers", []) if spec.get("type") == "Sequence" else [spec]
    return [_pre_step(s) for s in items]


def _pre_step(s: dict) -> str:
    kind = s.get("type")
    if kind == "ByteLevel" and not s.get("add_prefix_space"):
        return "bytelevel" if s.get("use_regex", True) else "bytelevel-raw"
    if (kind == "Split" and s.get("pattern") == {"Regex": QWEN2_PRE_REGEX}
            and s.get("behavior") == "Isolated" and not s.get("invert")):
        return "qwen2-regex"
    if kind == "Digits" and s.get("individual_digits"):
        return "digits"
    if (kind == "Split" and s.get("pattern") == {"Regex": r"\p{Han}"}
            and s.get("behavior") == "Isolated" and not s.get("invert")):
        return "han"
    return "other"


# -- SentencePiece ------------------------------------------------------------------------


def _sentencepiece_vocab(tokenizer) -> _Vocab:
    from gguf import TokenType

    proto = _sentencepiece_proto(tokenizer)
    pieces = proto.pieces
    tokens = [p.piece for p in pieces]
    scores = [float(p.score) for p in pieces]
    # SentencePiece's piece types use gguf's numbering (NORMAL=1 ... BYTE=6).
    types = [TokenType(p.type) for p in pieces]
    for special in (t["content"] for t in tokenizer.added_tokens()):
        tokens.append(special)
        scores.append(0.0)
        types.append(TokenType.CONTROL)
    warnings = []
    if any(t == TokenType.USER_DEFINED for t in types):
        warnings.append("the SentencePiece model has user-defined pieces: llama.cpp adds a "
                        "space prefix to the text after each, SentencePiece does not")
    return _Vocab("llama", "default", tokens, types, scores=scores,
                  add_space_prefix=bool(proto.normalizer_spec.add_dummy_prefix),
                  warnings=warnings)


def _sentencepiece_proto(tokenizer):
    """The model proto, refused unless llama.cpp's SPM tokenizer reproduces it."""
    from babyllama.tokenizer.tokenizer import sentencepiece_proto

    proto = sentencepiece_proto(tokenizer)
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    kinds = {1: "unigram", 2: "BPE", 3: "word", 4: "char"}
    problem = None
    if trainer.model_type != 2:
        problem = (f"a {kinds.get(trainer.model_type, 'unknown')} model; llama.cpp's Llama "
                   "tokenizer reproduces only SentencePiece BPE")
    elif norm.precompiled_charsmap or norm.remove_extra_whitespaces:
        problem = (f"its normalizer ({norm.name or 'custom'}"
                   f"{', remove_extra_whitespaces' if norm.remove_extra_whitespaces else ''}) "
                   "changes text, which llama.cpp's Llama tokenizer does not")
    elif trainer.treat_whitespace_as_suffix:
        problem = "it treats whitespace as a suffix, which llama.cpp's Llama tokenizer does not"
    elif not trainer.byte_fallback:
        problem = ("it has no byte fallback; llama.cpp's Llama tokenizer needs <0xXX> pieces "
                   "for characters outside the vocabulary")
    if problem:
        raise UserError(f"SentencePiece tokenizer: {problem}, so GGUF export refuses it")
    return proto
