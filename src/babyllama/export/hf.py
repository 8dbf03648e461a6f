"""transformers format, both ways.

Export writes what `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`
open with no custom code: `config.json` (LlamaForCausalLM), `model.safetensors` (our state
dict already uses transformers' names and RoPE layout, so the weights are copied as they are),
`generation_config.json`, and the tokenizer as a fast `tokenizer.json` with a
`tokenizer_config.json` holding the special tokens and the chat template.

A SentencePiece tokenizer (Chinese-LLaMA, ChatGLM) is converted to a `tokenizers` BPE (or
Unigram) model here, reading the SentencePiece proto: merges are the pairs whose join is a
piece, ranked by that piece's score (how SentencePiece's BPE picks the next merge), byte
fallback kept, and the proto's normalizer settings turned into `tokenizers` normalizers. The
original `tokenizer.model` is copied too. tests/test_export_hf.py checks the fast tokenizer
gives SentencePiece's ids on real text.

Import reads any transformers Llama directory (safetensors, sharded or not, or
pytorch_model.bin; any dtype; GQA; tied or untied head) into a run directory.

An image-text run (a VisionLanguageModel) goes both ways as transformers' LLaVA: export/llava.py.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from babyllama.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from babyllama.config import RunConfig
from babyllama.errors import UserError
from babyllama.infer.config import decoding_defaults
from babyllama.model.families import convert_state, trim_vocabulary
from babyllama.model.llama import Llama, ModelConfig
from babyllama.model.vlm import VisionLanguageModel
from babyllama.model.weights import load_state, model_state
from babyllama.run import Run, hf_model_config
from babyllama.textfile import read_json_object
from babyllama.tokenizer import Tokenizer
from babyllama.tokenizer.chat_template import resolve_template, stop_token_ids
from babyllama.tokenizer.tokenizer import CONFIG_FILE, HF_FILE, SP_FILE, sentencepiece_proto

HF_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
_TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=2) + "\n")


# ----------------------------------------------------------------------------------------
# Model


def hf_config(config: ModelConfig, tokenizer: Tokenizer, dtype: torch.dtype = torch.float32) -> dict:
    """config.json for transformers' LlamaForCausalLM, or Qwen2ForCausalLM for a model with
    q/k/v biases (transformers' Llama would put one on o_proj too). `rope_theta` is written
    both at the top level (transformers 4.x) and in `rope_parameters` (5.x)."""
    d = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_size,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rms_norm_eps": config.rms_norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_word_embeddings,
        "initializer_range": config.initializer_range,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "torch_dtype": _TORCH_DTYPE_NAMES[dtype],
        "dtype": _TORCH_DTYPE_NAMES[dtype],
    }
    if config.rope_scaling:
        d["rope_parameters"] = {**config.rope_scaling, "rope_theta": config.rope_theta}
        d["rope_scaling"] = dict(config.rope_scaling)  # transformers 4.x reads this one
    if config.qkv_bias:
        del d["attention_bias"], d["mlp_bias"]
        d.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False,
                 sliding_window=None, max_window_layers=config.num_hidden_layers)
    return d


def generation_defaults(tokenizer: Tokenizer, chat: bool) -> dict:
    """generation_config.json: our own defaults, so `model.generate(**inputs)` samples as
    `babyllama generate` (or `chat`, for an SFT run) does."""
    cfg = decoding_defaults("chat" if chat else "plain")
    settings = {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                "top_k": cfg.top_k, "top_p": cfg.top_p, "repetition_penalty": cfg.repetition_penalty}
    # A base model stops at EOS and a released model's own end tokens; a chat model at <|im_end|> too.
    eos = list(stop_token_ids(tokenizer)) if chat else \
        list(dict.fromkeys([tokenizer.eos_id, *map(tokenizer.token_to_id, tokenizer.end_tokens)]))
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": tokenizer.pad_id, "do_sample": settings["temperature"] > 0, **settings}


def write_hf(model: Llama, tokenizer: Tokenizer, out: str | Path, dtype: str = "f32",
             chat: bool = False) -> list[str]:
    """The transformers directory `out` for `model` and `tokenizer` (weights in `dtype`); an
    image-text model is written as transformers' LLaVA (export/llava.py). Returns warnings
    worth a line each (see `write_tokenizer_files`)."""
    if isinstance(model, VisionLanguageModel):
        from babyllama.export.llava import write_llava

        return write_llava(model, tokenizer, out, dtype=dtype, chat=chat)

    if dtype not in HF_DTYPES:
        raise UserError(f"--dtype {dtype}: the transformers format takes {', '.join(HF_DTYPES)}")
    if model.config.vocab_size < tokenizer.vocab_size:
        raise UserError(f"the model has {model.config.vocab_size} token embeddings but the "
                        f"tokenizer {tokenizer.vocab_size} tokens")
    out = Path(out)
    torch_dtype = HF_DTYPES[dtype]
    write_safetensors(model, out, torch_dtype)
    return write_model_files(model, tokenizer, out, chat, torch_dtype)


def write_safetensors(model, out: Path, torch_dtype) -> None:
    """`out`/model.safetensors: the model's state dict (a tied head once) in `torch_dtype`."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch_dtype).contiguous() for k, v in model_state(model).items()}
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})


def write_hf_reward(model, tokenizer: Tokenizer, out: str | Path, dtype: str = "f32") -> list[str]:
    """The transformers directory `out` for a reward model (`RewardModel`): weights under
    transformers' names (`model.*`, `score.weight`) and a `LlamaForSequenceClassification`
    config with `num_labels=1`, which reads the last non-pad token's score as we do.
    Returns the tokenizer files' warnings."""
    from safetensors.torch import save_file

    if dtype not in HF_DTYPES:
        raise UserError(f"--dtype {dtype}: the transformers format takes {', '.join(HF_DTYPES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = HF_DTYPES[dtype]
    state = {k: v.detach().to("cpu", torch_dtype).contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    config = hf_config(model.config, tokenizer, torch_dtype)
    # No LM head to tie; one output, read as a reward (transformers' regression head).
    config.update(architectures=["LlamaForSequenceClassification"], tie_word_embeddings=False,
                  num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    write_json(out / "config.json", config)
    return write_tokenizer_files(tokenizer, out, model.config.max_position_embeddings)


def write_model_files(model: Llama, tokenizer: Tokenizer, out: Path, chat: bool,
                      dtype: torch.dtype = torch.float32) -> list[str]:
    """What goes beside the weights (transformers' or an ONNX graph): config.json,
    generation_config.json and the tokenizer files. Returns the tokenizer's warnings."""
    write_json(out / "config.json", hf_config(model.config, tokenizer, dtype))
    write_json(out / "generation_config.json", generation_defaults(tokenizer, chat))
    return write_tokenizer_files(tokenizer, out, model.config.max_position_embeddings)


# ----------------------------------------------------------------------------------------
# Tokenizer


def _bpe_merges(pieces: list[tuple[str, float]], skip: set[str]) -> list[tuple[str, str]]:
    """SentencePiece BPE keeps no merge list: at each step it joins the adjacent pair whose
    joined piece has the highest score. A `tokenizers` BPE joins the pair with the lowest
    merge rank, so every split of every piece into two pieces becomes a merge ranked by the
    joined piece's score (ties: the vocabulary's order, as transformers' converter does)."""
    vocab = {p: i for i, (p, _) in enumerate(pieces)}
    merges = []
    for piece, score in pieces:
        if piece in skip:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab and left not in skip and right not in skip:
                merges.append((-score, vocab[piece], vocab[left], vocab[right], left, right))
    merges.sort()
    return [(m[4], m[5]) for m in merges]


def sentencepiece_to_tokenizers(tokenizer: Tokenizer):
    """A `tokenizers.Tokenizer` giving the SentencePiece tokenizer's ids, specials included."""
    from tokenizers import AddedToken, Regex, decoders, normalizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE, Unigram

    proto = sentencepiece_proto(tokenizer)
    spec, trainer = proto.normalizer_spec, proto.trainer_spec
    pieces = [(p.piece, p.score) for p in proto.pieces]
    # Types 2-6 (unknown, control, user-defined, unused, byte) never come out of merging.
    skip = {p.piece for p in proto.pieces if p.type != 1}
    unk = trainer.unk_piece if 0 <= trainer.unk_id < len(pieces) else None
    if trainer.model_type == 2:
        tk = HFTokenizer(BPE({p: i for i, (p, _) in enumerate(pieces)}, _bpe_merges(pieces, skip),
                             unk_token=unk, fuse_unk=True, byte_fallback=trainer.byte_fallback))
    elif trainer.model_type == 1:
        tk = HFTokenizer(Unigram(pieces, unk_id=trainer.unk_id if unk else None,
                                 byte_fallback=trainer.byte_fallback))
    else:
        raise UserError(f"SentencePiece model type {trainer.model_type} (not BPE or unigram) "
                        "has no transformers fast tokenizer")
    # SentencePiece's own order: charsmap normalization, whitespace cleanup, the dummy "▁"
    # prefix, then spaces escaped to "▁". `tokenizers` applies the normalizer to each piece of
    # text between special tokens separately, as our SentencePiece backend encodes them.
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    tk.normalizer = normalizers.Sequence(steps)
    tk.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if spec.add_dummy_prefix else []))
    # User-defined pieces are matched whole before the model runs, as SentencePiece does.
    tk.add_tokens([AddedToken(p.piece, normalized=False, special=False)
                   for p in proto.pieces if p.type == 4])
    specials = sorted(((i, t) for t, i in tokenizer.control_tokens.items()))
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for _, t in specials])
    for i, t in specials:
        if tk.token_to_id(t) != i:  # appended specials must land on the same ids
            raise UserError(f"special token {t!r}: id {tk.token_to_id(t)} after conversion, "
                            f"{i} in the tokenizer")
    return tk


def fast_tokenizer(tokenizer: Tokenizer, bos: bool = True):
    """The `tokenizers.Tokenizer` to write as tokenizer.json. It puts BOS in front of every
    encoded text (as Llama's does): documents were trained as [bos] + text, and
    `apply_chat_template` tokenizes without adding it again. `bos=False`: nothing is added (a
    model that only ever reads chat prompts, which start without BOS)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import processors

    if tokenizer.kind == "sentencepiece":
        tk = sentencepiece_to_tokenizers(tokenizer)
    else:
        tk = HFTokenizer.from_str(tokenizer.backend.to_str())
    if not bos:
        tk.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1")
        return tk
    bos = tokenizer.special_tokens["bos"]
    tk.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
        special_tokens=[(bos, tokenizer.bos_id)])
    return tk


def tied_merge_scores(tokenizer: Tokenizer) -> int:
    """How many mergeable pieces of a SentencePiece BPE share their score with another.

    SentencePiece breaks a tie between two candidate merges by position (leftmost first); a
    fast BPE ranks every merge strictly, so with ties no merge order reproduces SentencePiece
    everywhere. Chinese-LLaMA-2 added ~25k pieces all scored 0: transformers' own conversion
    splits 80% of our zhwiki paragraphs differently from SentencePiece somewhere, ours ~50%.
    ChatGLM2 and Llama have distinct scores, and the conversion is exact."""
    if tokenizer.kind != "sentencepiece":
        return 0
    proto = sentencepiece_proto(tokenizer)
    if proto.trainer_spec.model_type != 2:
        return 0
    scores = Counter(p.score for p in proto.pieces if p.type == 1 and len(p.piece) > 1)
    return sum(n for n in scores.values() if n > 1)


def write_tokenizer_files(tokenizer: Tokenizer, out: Path, max_length: int, bos: bool = True) -> list[str]:
    """tokenizer.json + tokenizer_config.json (+ tokenizer.model for SentencePiece), loadable
    by `AutoTokenizer.from_pretrained(out)` and by `babyllama.load(out)`; `bos`: whether
    encoding a text puts BOS in front (`fast_tokenizer`). Returns a warning when the fast
    tokenizer cannot match SentencePiece exactly."""
    warnings = []
    if tied := tied_merge_scores(tokenizer):
        warnings.append(f"{tied} pieces of this SentencePiece model share a score with another; "
                        "transformers' fast tokenizer (tokenizer.json) may split some text "
                        "differently than SentencePiece (babyllama and llama.cpp follow "
                        "SentencePiece; tokenizer.model is included)")
    tk = fast_tokenizer(tokenizer, bos=bos)
    atomic_write_bytes(out / HF_FILE, tk.to_str(pretty=True).encode("utf-8"))
    if tokenizer.kind == "sentencepiece":
        atomic_write_bytes(out / SP_FILE, tokenizer.backend.serialized_model_proto())
    added = {str(i): {"content": t.content, "special": t.special, "normalized": t.normalized,
                      "lstrip": t.lstrip, "rstrip": t.rstrip, "single_word": t.single_word}
             for i, t in sorted(tk.get_added_tokens_decoder().items())}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{f"{r}_token": tokenizer.special_tokens.get(r) for r in ("bos", "eos", "pad", "unk")},
        "add_bos_token": bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "added_tokens_decoder": added,
        "chat_template": tokenizer.chat_template,
        # Read back by babyllama.load (transformers ignores keys it does not know): which role
        # each special token plays, and for SentencePiece that tokenizer.model (exact) is the
        # file to use, with its appended specials in id order.
        "special_tokens": dict(tokenizer.special_tokens),
        "kind": tokenizer.kind,
    }
    if tokenizer.kind == "sentencepiece":
        config["added_tokens"] = tokenizer.config()["added_tokens"]
    # What only babyllama reads back (transformers ignores them): the tokenizer's own keys.
    own = tokenizer.config()
    config.update({k: own[k] for k in ("end_tokens", "fixed_vocab") if k in own})
    if config["unk_token"] is None or tokenizer.unk_id is None:
        del config["unk_token"]
    if tokenizer.chat_template is None:
        del config["chat_template"]
    write_json(out / CONFIG_FILE, config)
    return warnings


# ----------------------------------------------------------------------------------------
# Import


def read_hf_state(src: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = src / "model.safetensors.index.json"
    try:
        if (src / "model.safetensors").exists():
            return load_file(str(src / "model.safetensors"))
        if index.exists():
            shards = sorted(set(read_json_object(index)["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(load_file(str(src / shard)))
            return state
        if (src / "pytorch_model.bin").exists():
            # weights_only: tensors and plain containers, never arbitrary pickled objects.
            state = torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise UserError(f"{src / 'pytorch_model.bin'}: not a state dict (names -> tensors)")
            return state
    except UserError:
        raise
    except Exception as e:  # safetensors and torch raise their own types for corrupt files
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "Weights only load failed" in first:  # torch suggests weights_only=False: never for a file
            first = "it is not a plain file of tensors; pickled objects are not loaded"
        raise UserError(f"{src}: cannot read the weights ({first})") from None
    raise UserError(f"{src}: no model.safetensors, model.safetensors.index.json or "
                    "pytorch_model.bin")


def import_hf(src: str | Path, out: str | Path) -> Path:
    """A run directory (config.yaml, model.safetensors in fp32, tokenizer/) from the
    transformers directory `src` of a family in model/families.py (Llama, Mistral, Qwen2,
    Baichuan-7B, Baichuan2-7B, InternLM2), or a LLaVA directory (an image-text run,
    export/llava.py); `babyllama sft`, `eval`, `chat` and `export` take it. What the import
    changed to map exactly is in the family's notes (`hf_model_config`). Raises UserError for
    what cannot map exactly."""
    src, run = Path(src), Run(out)
    if not (src / "config.json").is_file():
        raise UserError(f"{src}: not a transformers directory (no config.json)")
    if read_json_object(src / "config.json", "config.json").get("model_type") == "llava":
        from babyllama.export.llava import import_llava

        return import_llava(src, out)
    run.refuse_nonempty()
    config, family = hf_model_config(src / "config.json")
    tokenizer = Tokenizer.load(src, fixed_vocab=True)
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"{src}: the tokenizer has {tokenizer.vocab_size} tokens but the model "
                        f"only {config.vocab_size} embeddings")
    if tokenizer.chat_template:
        try:
            resolve_template(tokenizer.chat_template)
        except UserError as e:  # "chat template line 3: ..." -> name the file it came from
            raise UserError(f"{src}: its chat template (tokenizer_config.json or chat_template.jinja) "
                            f"does not compile: {e}") from None
    state = convert_state(family, {k: v.float() for k, v in read_hf_state(src).items()}, config)
    if tokenizer.vocab_size < config.vocab_size:  # rows no token has: see trim_vocabulary
        state = trim_vocabulary(state, tokenizer.vocab_size)
        config.vocab_size = tokenizer.vocab_size
    model = Llama(config)
    if bad := [k for k, v in state.items() if not torch.isfinite(v).all()]:
        raise UserError(f"{src}: {bad[0]} holds NaN or infinite values"
                        + (f" (as do {len(bad) - 1} more tensors)" if len(bad) > 1 else ""))
    load_state(model, state, src)
    run.write_plain_run(model, tokenizer, RunConfig(model=config, preset=f"imported from {src} ({family.name})"))
    return run.path
