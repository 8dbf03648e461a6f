"""GGUF export: the file read back with gguf-py holds our weights (q/k permuted for llama.cpp's
RoPE), the architecture and the tokenizer; llama.cpp itself (slow test) tokenizes, scores and
generates like our engine."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from babyllama.errors import UserError
from babyllama.export.gguf import GGUF_TYPES, permute_rope, write_gguf
from babyllama.model.llama import Llama, ModelConfig, apply_rope, rope_tables
from babyllama.tokenizer import Tokenizer, train_tokenizer
from conftest import SHARED_DATA, corpus_lines

gguf = pytest.importorskip("gguf")

CHINESE_LLAMA2 = SHARED_DATA / "tokenizers" / "chinese-llama2"
needs_chinese_llama2 = pytest.mark.skipif(not (CHINESE_LLAMA2 / "tokenizer.model").exists(),
                                          reason="shared data (chinese-llama2 tokenizer) absent")


def tiny_model(vocab_size: int, seed: int = 0, **kw) -> Llama:
    base = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base.update(kw)
    torch.manual_seed(seed)
    model = Llama(ModelConfig(**base)).eval()
    with torch.no_grad():  # norms are ones at init: make them tell the tensors apart
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return model


class Metadata(dict):
    """Key -> value, decoded on access (decoding a 55k-token list takes seconds)."""

    def __getitem__(self, key):
        return super().__getitem__(key).contents()


def read(path):
    """(metadata key -> value, tensor name -> (type name, fp32 array in torch's layout))."""
    reader = gguf.GGUFReader(path)
    meta = Metadata(reader.fields)
    tensors = {t.name: (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type)
                        .reshape(tuple(int(n) for n in reversed(t.shape))))
               for t in reader.tensors}
    return meta, tensors


def expected_tensors(model) -> dict[str, torch.Tensor]:
    """Our weights under llama.cpp's names, q/k rows in the interleaved RoPE order."""
    c = model.config
    sd = model.state_dict()
    out = {"token_embd.weight": sd["model.embed_tokens.weight"],
           "output_norm.weight": sd["model.norm.weight"]}
    names = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for i in range(c.num_hidden_layers):
        for theirs, ours in names.items():
            out[f"blk.{i}.{theirs}.weight"] = sd[f"model.layers.{i}.{ours}.weight"]
        q, k = f"blk.{i}.attn_q.weight", f"blk.{i}.attn_k.weight"
        out[q] = permute_rope(out[q], c.num_attention_heads)
        out[k] = permute_rope(out[k], c.kv_heads)
    if not c.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    return {k: v.float() for k, v in out.items()}


# ----------------------------------------------------------------------------------------
# Weights


def test_permuted_q_k_under_interleaved_rope_give_our_attention_scores():
    """llama.cpp's llama RoPE rotates pairs (2i, 2i+1); ours (transformers') pairs (i, i+d/2).
    With the permuted rows, llama.cpp's rotation gives exactly our q.k scores."""
    torch.manual_seed(0)
    heads, kv_heads, d, hidden, T = 4, 2, 16, 64, 7
    wq, wk = torch.randn(heads * d, hidden), torch.randn(kv_heads * d, hidden)
    x = torch.randn(T, hidden)
    cos, sin = rope_tables(d, T, 10000.0)

    def ours(w, n):
        return apply_rope((x @ w.T).view(T, n, d).transpose(0, 1), cos, sin)

    def interleaved(w, n):  # ggml's rope_f32, mode 0
        y = (x @ w.T).view(T, n, d).transpose(0, 1)
        theta = torch.arange(T)[:, None] * 10000.0 ** (-torch.arange(0, d, 2) / d)
        a, b = y[..., 0::2], y[..., 1::2]
        out = torch.empty_like(y)
        out[..., 0::2] = a * theta.cos() - b * theta.sin()
        out[..., 1::2] = a * theta.sin() + b * theta.cos()
        return out

    def scores(q, k):
        return q @ k.repeat_interleave(heads // kv_heads, dim=0).transpose(1, 2)

    reference = scores(ours(wq, heads), ours(wk, kv_heads))
    permuted = scores(interleaved(permute_rope(wq, heads), heads),
                      interleaved(permute_rope(wk, kv_heads), kv_heads))
    torch.testing.assert_close(permuted, reference, rtol=1e-4, atol=1e-4)
    unpermuted = scores(interleaved(wq, heads), interleaved(wk, kv_heads))
    assert not torch.allclose(unpermuted, reference, atol=1e-2)


def test_f32_file_holds_every_weight_under_llama_cpp_names_with_gqa(tiny_tokenizer, tmp_path):
    model = tiny_model(tiny_tokenizer.vocab_size)  # 4 query heads, 2 key/value heads
    out = write_gguf(model, tiny_tokenizer, tmp_path / "model.gguf", dtype="f32")
    _, tensors = read(out.path)
    expected = expected_tensors(model)
    assert set(tensors) == set(expected) and out.n_tensors == len(expected)
    for name, want in expected.items():
        kind, got = tensors[name]
        assert kind == "F32", name
        np.testing.assert_array_equal(got, want.numpy(), err_msg=name)
    assert tensors["blk.0.attn_k.weight"][1].shape == (2 * 16, 64)
    # Written under a temporary name and moved into place: nothing else is left behind.
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
    assert out.size_bytes == out.path.stat().st_size and out.warnings == []


def test_f16_matrices_are_ours_cast_to_fp16_and_norms_stay_f32(tiny_tokenizer, tmp_path):
    model = tiny_model(tiny_tokenizer.vocab_size)
    _, tensors = read(write_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", dtype="f16").path)
    for name, want in expected_tensors(model).items():
        kind, got = tensors[name]
        if want.ndim == 1:
            assert kind == "F32", name
            np.testing.assert_array_equal(got, want.numpy(), err_msg=name)
        else:
            assert kind == "F16", name
            np.testing.assert_array_equal(got, want.half().float().numpy(), err_msg=name)


def test_q8_0_matrices_dequantize_within_the_block_error_bound(tiny_tokenizer, tmp_path):
    model = tiny_model(tiny_tokenizer.vocab_size)
    out = write_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", dtype="q8_0")
    _, tensors = read(out.path)
    assert out.f16_fallback == [] and out.warnings == []
    for name, want in expected_tensors(model).items():
        kind, got = tensors[name]
        want = want.numpy()
        if want.ndim == 1:
            assert kind == "F32", name
            np.testing.assert_array_equal(got, want, err_msg=name)
            continue
        assert kind == "Q8_0", name
        # Each block of 32 stores round(x / d) with d = max|x| / 127 (d itself in fp16):
        # half a step of rounding plus d's own fp16 error times the largest code, 127.
        blocks = want.reshape(-1, 32)
        step = np.abs(blocks).max(axis=1, keepdims=True) / 127
        bound = step * (0.5 + 127 * 2.0 ** -11) + 1e-12
        assert (np.abs(got.reshape(-1, 32) - blocks) <= bound).all(), name
        assert not np.array_equal(got, want)


def test_q8_0_falls_back_to_f16_for_rows_not_a_multiple_of_32_and_reports_it(
        tiny_tokenizer, tmp_path):
    # hidden 48: every matrix whose rows hold `hidden` values falls back; ffn_down's rows
    # hold intermediate_size = 64 values and quantize.
    model = tiny_model(tiny_tokenizer.vocab_size, hidden_size=48, intermediate_size=64)
    out = write_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", dtype="q8_0")
    _, tensors = read(out.path)
    for name, want in expected_tensors(model).items():
        kind, got = tensors[name]
        if want.ndim == 1:
            assert kind == "F32"
        elif "ffn_down" in name:
            assert kind == "Q8_0"
        else:
            assert kind == "F16", name
            assert name in out.f16_fallback
            np.testing.assert_array_equal(got, want.half().float().numpy())
    assert len(out.f16_fallback) == 1 + 2 * 6 + 1  # token_embd, 6 per layer, output
    assert len(out.warnings) == 1 and "f16" in out.warnings[0] and "32" in out.warnings[0]


def test_tied_embeddings_write_no_output_tensor(tiny_tokenizer, tmp_path):
    model = tiny_model(tiny_tokenizer.vocab_size, tie_word_embeddings=True,
                       num_key_value_heads=None)
    _, tensors = read(write_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", dtype="f32").path)
    assert "output.weight" not in tensors
    assert set(tensors) == set(expected_tensors(model))
    np.testing.assert_array_equal(tensors["token_embd.weight"][1],
                                  model.lm_head.weight.detach().numpy())


def test_unknown_dtype_is_a_user_error_naming_the_choices(tiny_tokenizer, tmp_path):
    model = tiny_model(tiny_tokenizer.vocab_size)
    with pytest.raises(UserError, match="q4_0.*" + ".*".join(GGUF_TYPES)):
        write_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", dtype="q4_0")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------
# Metadata and the byte-level tokenizer


def test_metadata_describes_the_llama_architecture_and_the_byte_level_tokenizer(
        tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(tiny_tokenizer, "chat_template", "{{ messages[0].content }}")
    tok = tiny_tokenizer
    model = tiny_model(tok.vocab_size, rope_theta=500000.0, rms_norm_eps=1e-6)
    meta, _ = read(write_gguf(model, tok, tmp_path / "m.gguf", dtype="f16", name="tiny").path)
    assert meta["general.architecture"] == "llama" and meta["general.name"] == "tiny"
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert {k: meta[f"llama.{k}"] for k in (
        "context_length", "embedding_length", "block_count", "feed_forward_length",
        "attention.head_count", "attention.head_count_kv", "rope.dimension_count",
        "vocab_size")} == {
        "context_length": 64, "embedding_length": 64, "block_count": 2,
        "feed_forward_length": 96, "attention.head_count": 4, "attention.head_count_kv": 2,
        "rope.dimension_count": 16, "vocab_size": tok.vocab_size}
    assert meta["llama.rope.freq_base"] == 500000.0
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)

    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.tokens"] == [tok.id_to_token(i) for i in range(tok.vocab_size)]
    merges = json.loads(tok.backend.to_str())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m)
                                             for m in merges]
    types = meta["tokenizer.ggml.token_type"]
    special = set(tok.special_token_ids.values())
    assert all(types[i] == gguf.TokenType.CONTROL for i in special)
    assert all(t == gguf.TokenType.NORMAL for i, t in enumerate(types) if i not in special)
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
            meta["tokenizer.ggml.padding_token_id"], meta["tokenizer.ggml.unknown_token_id"]) == (
            tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id)
    assert meta["tokenizer.ggml.eot_token_id"] == tok.token_to_id("<|im_end|>")
    assert meta["tokenizer.ggml.add_bos_token"] is True
    assert meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.chat_template"] == "{{ messages[0].content }}"

    base, _ = read(write_gguf(model, tok, tmp_path / "base.gguf", chat=False).path)
    assert "tokenizer.chat_template" not in base
    monkeypatch.setattr(tok, "chat_template", None)
    out = write_gguf(model, tok, tmp_path / "chat.gguf", chat=True)
    assert "tokenizer.chat_template" not in read(out.path)[0]
    assert [w for w in out.warnings if "chat template" in w]


def test_a_larger_model_vocabulary_is_padded_with_unused_tokens(tiny_tokenizer, tmp_path):
    n = tiny_tokenizer.vocab_size
    model = tiny_model(n + 3)
    meta, tensors = read(write_gguf(model, tiny_tokenizer, tmp_path / "m.gguf").path)
    assert meta["tokenizer.ggml.tokens"][n:] == [f"[PAD{i}]" for i in range(n, n + 3)]
    assert meta["tokenizer.ggml.token_type"][n:] == [gguf.TokenType.UNUSED] * 3
    assert tensors["token_embd.weight"][1].shape == (n + 3, 64)


def test_a_smaller_model_vocabulary_is_a_user_error(tiny_tokenizer, tmp_path):
    with pytest.raises(UserError, match="embeddings"):
        write_gguf(tiny_model(tiny_tokenizer.vocab_size - 1), tiny_tokenizer, tmp_path / "m.gguf")


@pytest.mark.parametrize("pretokenizer, pre, han_warning", [
    ("bytelevel", "gpt-2", False),
    ("bytelevel-digits", "starcoder", False),  # llama.cpp: \p{N} isolated, then GPT-2's regex
    ("cjk-chars", "gpt-2", True),              # no llama.cpp pre type isolates Han characters
    ("cjk-chars-digits", "starcoder", True),
])
def test_each_pretokenizer_gets_the_closest_llama_cpp_pre_type(pretokenizer, pre, han_warning,
                                                                tmp_path):
    tok = train_tokenizer(corpus_lines(200), 300, show_progress=False, pretokenizer=pretokenizer)
    out = write_gguf(tiny_model(tok.vocab_size), tok, tmp_path / "m.gguf", dtype="f32")
    meta, _ = read(out.path)
    assert meta["tokenizer.ggml.pre"] == pre
    assert any("Han" in w for w in out.warnings) == han_warning


def _edited_tokenizer(tok, tmp_path, **changes) -> Tokenizer:
    spec = json.loads(tok.backend.to_str())
    spec.update(changes)
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    return Tokenizer.load(tmp_path / "tokenizer.json")


@pytest.mark.parametrize("changes, message", [
    ({"normalizer": {"type": "NFKC"}}, "normalizer"),
    ({"pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always",
                        "split": True}}, "pre-tokenizer"),
    ({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                        "use_regex": True}}, "pre-tokenizer"),
])
def test_a_tokenizer_json_llama_cpp_cannot_reproduce_is_a_user_error(
        tiny_tokenizer, tmp_path, changes, message):
    tok = _edited_tokenizer(tiny_tokenizer, tmp_path, **changes)
    with pytest.raises(UserError, match=message):
        write_gguf(tiny_model(tok.vocab_size), tok, tmp_path / "m.gguf")


def test_a_loaded_plain_byte_level_tokenizer_is_gpt2(tiny_tokenizer, tmp_path):
    tok = _edited_tokenizer(tiny_tokenizer, tmp_path)
    assert tok.pretokenizer is None
    meta, _ = read(write_gguf(tiny_model(tok.vocab_size), tok, tmp_path / "m.gguf").path)
    assert meta["tokenizer.ggml.pre"] == "gpt-2"


# ----------------------------------------------------------------------------------------
# SentencePiece


@needs_chinese_llama2
def test_sentencepiece_pieces_scores_and_types_come_from_the_model(tmp_path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    tok = Tokenizer.load(CHINESE_LLAMA2)
    proto = pb.ModelProto()
    proto.ParseFromString(tok.backend.serialized_model_proto())
    base = len(proto.pieces)
    model = tiny_model(tok.vocab_size, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                       tie_word_embeddings=True)
    meta, _ = read(write_gguf(model, tok, tmp_path / "m.gguf", dtype="f16").path)
    assert meta["tokenizer.ggml.model"] == "llama"
    assert meta["tokenizer.ggml.add_space_prefix"] is True
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    scores = meta["tokenizer.ggml.scores"]
    assert len(tokens) == len(types) == len(scores) == tok.vocab_size > base
    assert tokens[:base] == [p.piece for p in proto.pieces]
    assert types[:base] == [p.type for p in proto.pieces]  # SentencePiece numbers types as gguf
    np.testing.assert_array_equal(np.float32(scores[:base]),
                                  np.float32([p.score for p in proto.pieces]))
    assert tokens[base:] == tok._backend.appended and "<|im_start|>" in tokens[base:]
    assert set(types[base:]) == {gguf.TokenType.CONTROL} and set(scores[base:]) == {0.0}
    assert types[tok.unk_id] == gguf.TokenType.UNKNOWN and types[3] == gguf.TokenType.BYTE
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
            meta["tokenizer.ggml.unknown_token_id"], meta["tokenizer.ggml.padding_token_id"]) == (
            tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id)


def _trained_sentencepiece(tmp_path, **options) -> Tokenizer:
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(corpus_lines(300)) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=800, hard_vocab_limit=False,
                                   minloglevel=2, **options)
    return Tokenizer.load(tmp_path / "sp.model")


@pytest.mark.parametrize("options, message", [
    ({"model_type": "unigram"}, "unigram"),
    ({"model_type": "bpe", "byte_fallback": True}, "normalizer"),  # default nmt_nfkc
    ({"model_type": "bpe", "normalization_rule_name": "identity",
      "remove_extra_whitespaces": False}, "byte fallback"),
])
def test_a_sentencepiece_model_llama_cpp_cannot_reproduce_is_a_user_error(
        tmp_path, options, message):
    tok = _trained_sentencepiece(tmp_path, **options)
    with pytest.raises(UserError, match=message):
        write_gguf(tiny_model(tok.vocab_size), tok, tmp_path / "m.gguf")


def test_a_llama_style_sentencepiece_model_is_accepted(tmp_path):
    tok = _trained_sentencepiece(tmp_path, model_type="bpe", byte_fallback=True,
                                 normalization_rule_name="identity",
                                 remove_extra_whitespaces=False)
    out = write_gguf(tiny_model(tok.vocab_size), tok, tmp_path / "m.gguf", dtype="q8_0")
    meta, _ = read(out.path)
    assert meta["tokenizer.ggml.model"] == "llama" and out.warnings == []


# ----------------------------------------------------------------------------------------
# llama.cpp itself

TEXTS = ["今天天气很好，我们去公园散步。", "The quick brown fox jumps over the lazy dog 123.",
         "第12345号 price: 3.14 元", "  two  spaces\nand a newline\t tab", "机器学习 and NLP!"]


def llama_cpp_model(path, n_ctx: int):
    llama_cpp = pytest.importorskip("llama_cpp")
    # f32 KV cache: the default f16 cache would add its own rounding to the comparison.
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False,
                           n_threads=1, type_k=0, type_v=0)


def llama_cpp_greedy(llm, prompt: list[int], steps: int) -> tuple[np.ndarray, list[int]]:
    """Logits for every prompt position, then `steps` argmax tokens: our own argmax over
    llm.scores, so no sampler setting (repeat penalty, top-k) can interfere."""
    llm.reset()
    llm.eval(prompt)
    logits = np.array(llm.scores[:len(prompt)])
    out = []
    for _ in range(steps):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return logits, out


def our_greedy(model, tok, prompt: list[int], steps: int) -> tuple[np.ndarray, list[int]]:
    from babyllama.infer.config import GenerationConfig
    from babyllama.infer.generate import complete

    with torch.no_grad():
        logits, _ = model(torch.tensor([prompt]))
    cfg = GenerationConfig(temperature=0, max_new_tokens=steps)
    # No stop tokens: a random model may well pick eos, and both sides should go on.
    (done,) = complete(model, tok, [prompt], cfg, stop_ids=())
    return logits[0].numpy(), done.ids


def model_with_clear_greedy_steps(tok, prompt: list[int], steps: int, tied: bool):
    """A random model, our logits for `prompt` and our greedy tokens, where every greedy step
    has a clear winner.

    Random weights give near-uniform logits: the greedy token is often ahead of the next by
    less than fp16 weights move the logits (~2.5e-3 of their largest value, measured), and a
    different token at one step changes every step after it. A 10x larger init than usual
    spreads the logits, and the first seed whose top-two gap stays above 8e-3 of the logit
    scale at all steps is used (seed 0 or 2 for the tokenizers below; the gap is checked here
    rather than assumed, so another torch version's random numbers cannot make it flaky).
    """
    for seed in range(50):
        model = tiny_model(tok.vocab_size, seed=seed, initializer_range=0.2,
                           max_position_embeddings=128, tie_word_embeddings=tied)
        logits, tokens = our_greedy(model, tok, prompt, steps)
        with torch.no_grad():
            path, _ = model(torch.tensor([prompt + tokens[:-1]]))
        top2 = path[0, len(prompt) - 1:].topk(2, dim=-1).values
        if (top2[:, 0] - top2[:, 1]).min() > 8e-3 * np.abs(logits).max():
            return model, logits, tokens
    raise AssertionError("no seed gives clear greedy steps")


@pytest.mark.slow
@pytest.mark.parametrize("which", [
    pytest.param("bytelevel", id="byte-level-bpe"),
    pytest.param("chinese-llama2", id="sentencepiece", marks=needs_chinese_llama2),
])
def test_llama_cpp_tokenizes_scores_and_generates_like_our_engine(which, tiny_tokenizer, tmp_path):
    pytest.importorskip("llama_cpp")
    if which == "bytelevel":
        tok, tied = tiny_tokenizer, False
    else:
        tok, tied = Tokenizer.load(CHINESE_LLAMA2), True
    steps = 20
    prompt = tok.encode(TEXTS[0], add_bos=True)
    model, ours_logits, ours_tokens = model_with_clear_greedy_steps(tok, prompt, steps, tied)

    f32 = write_gguf(model, tok, tmp_path / "m.f32.gguf", dtype="f32")
    llm = llama_cpp_model(f32.path, n_ctx=128)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text
    with_bos = llm.tokenize(TEXTS[1].encode(), add_bos=True, special=False)
    assert with_bos == tok.encode(TEXTS[1], add_bos=True)
    chat = "<|im_start|>user\n你好，世界<|im_end|>\n<|im_start|>assistant\n"
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == tok.encode(chat, parse_special=True)
    assert llm.tokenize(chat.encode(), add_bos=False, special=False) == tok.encode(chat)  # as text

    logits, tokens = llama_cpp_greedy(llm, prompt, steps)
    scale = np.abs(ours_logits).max()
    np.testing.assert_allclose(logits, ours_logits, atol=1e-4 * scale, rtol=0)  # ~1e-6 seen
    assert tokens == ours_tokens

    # f16 weights move the logits by ~2.5e-3 of their scale: the clear greedy winners stay.
    f16 = write_gguf(model, tok, tmp_path / "m.f16.gguf", dtype="f16")
    logits16, tokens16 = llama_cpp_greedy(llama_cpp_model(f16.path, n_ctx=128), prompt, steps)
    np.testing.assert_allclose(logits16, ours_logits, atol=1e-2 * scale, rtol=0)
    assert tokens16 == ours_tokens


@pytest.mark.slow
@pytest.mark.parametrize("pretokenizer", ["bytelevel", "bytelevel-digits", "cjk-chars",
                                          "cjk-chars-digits"])
def test_llama_cpp_tokenizes_like_us_with_each_pretokenizer(pretokenizer, tmp_path):
    """bytelevel and bytelevel-digits are exact ("gpt-2", "starcoder"). The cjk-chars ones
    carry a warning (they differ on runs of spaces before a Han character, see gguf.py) but
    agree on ordinary text like this."""
    llama_cpp = pytest.importorskip("llama_cpp")
    tok = train_tokenizer(corpus_lines(), 400, show_progress=False, pretokenizer=pretokenizer)
    out = write_gguf(tiny_model(tok.vocab_size), tok, tmp_path / "m.gguf", dtype="f32")
    llm = llama_cpp.Llama(model_path=str(out.path), vocab_only=True, verbose=False)
    for text in TEXTS + corpus_lines(20) + ["数字0123456789和汉字混排abc中文", "１２３ ½ ①②"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text


@pytest.mark.slow
@pytest.mark.parametrize("shape", [
    pytest.param({}, id="all-q8_0"),
    pytest.param({"hidden_size": 48, "intermediate_size": 64}, id="f16-fallback"),
])
def test_llama_cpp_runs_q8_0_files_close_to_our_logits(shape, tiny_tokenizer, tmp_path):
    pytest.importorskip("llama_cpp")
    model = tiny_model(tiny_tokenizer.vocab_size, initializer_range=0.2, **shape)
    prompt = tiny_tokenizer.encode(TEXTS[0], add_bos=True)
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0][0].numpy()
    out = write_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", dtype="q8_0")
    assert bool(out.f16_fallback) == bool(shape)
    logits, _ = llama_cpp_greedy(llama_cpp_model(out.path, n_ctx=64), prompt, 1)
    # llama.cpp also rounds the activations to 8 bits for q8_0 products: ~5% of the logit
    # scale was measured, against ~1e-6 for f32 files.
    scale = np.abs(ours).max()
    np.testing.assert_allclose(logits, ours, atol=0.15 * scale, rtol=0)
    assert np.abs(logits - ours).mean() < 0.02 * scale


@pytest.mark.slow
def test_llama_cpp_gives_our_logits_for_qkv_biases_and_heads_of_their_own_width(tiny_tokenizer, tmp_path):
    """A model imported from Qwen2 (q/k/v biases) with heads 24 wide instead of 64 / 4: the
    biases go in as attn_q.bias etc. (permuted with their rows), the width as key_length."""
    pytest.importorskip("llama_cpp")
    model = tiny_model(tiny_tokenizer.vocab_size, initializer_range=0.2, qkv_bias=True, head_dim=24)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    prompt = tiny_tokenizer.encode(TEXTS[0], add_bos=True)
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0][0].numpy()
    out = write_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", dtype="f32")
    assert "blk.0.attn_q.bias" in read(out.path)[1]
    logits, _ = llama_cpp_greedy(llama_cpp_model(out.path, n_ctx=64), prompt, 1)
    np.testing.assert_allclose(logits, ours, atol=1e-4 * np.abs(ours).max(), rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
], ids=["linear", "llama3"])
def test_llama_cpp_gives_our_logits_under_rope_scaling(scaling, tiny_tokenizer, tmp_path):
    pytest.importorskip("llama_cpp")
    model = tiny_model(tiny_tokenizer.vocab_size, initializer_range=0.2, rope_scaling=scaling)
    prompt = tiny_tokenizer.encode("".join(corpus_lines(4)), add_bos=True)[:48]
    assert len(prompt) == 48  # positions well past llama3's (shrunk) original context of 16
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0][0].numpy()
    out = write_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", dtype="f32")
    logits, _ = llama_cpp_greedy(llama_cpp_model(out.path, n_ctx=64), prompt, 1)
    np.testing.assert_allclose(logits, ours, atol=1e-4 * np.abs(ours).max(), rtol=0)


@pytest.mark.slow
def test_a_qwen2_style_tokenizer_is_written_as_llama_cpps_qwen2_pre_type(tmp_path):
    """Qwen2's tokenizer.json: an NFC normalizer, its own split regex, ByteLevel without a
    regex. llama.cpp's "qwen2" pre type gives our ids on mixed text; NFC is a warning."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from babyllama.export.gguf import QWEN2_PRE_REGEX

    tk = HFTokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus_lines(300) + TEXTS, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>",
                                                                "eos_token": "<|im_end|>"}))
    tok = Tokenizer.load(tmp_path, fixed_vocab=True)
    out = write_gguf(tiny_model(tok.vocab_size, qkv_bias=True), tok, tmp_path / "m.gguf", dtype="f32")
    assert read(out.path)[0]["tokenizer.ggml.pre"] == "qwen2"
    assert any("NFC" in w for w in out.warnings)
    llm = llama_cpp.Llama(model_path=str(out.path), vocab_only=True, verbose=False)
    for text in TEXTS + corpus_lines(20) + ["It's 2024: 数字0123和汉字abc中文\n\n  x", "don't  stop\r\n"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text


def test_gguf_export_never_replaces_a_file_that_is_not_gguf(tmp_path):
    """`-o notes.gguf` over a user's file, or `-o file.txt` (a file where a folder is meant),
    is a one-line error before the model loads; an earlier .gguf may be rewritten."""
    from babyllama.export import gguf_path

    run = tmp_path / "run"
    notes = tmp_path / "notes.gguf"
    notes.write_bytes(b"precious")
    with pytest.raises(UserError, match="notes.gguf: exists and is not a GGUF file"):
        gguf_path(notes, run, "f16")
    doc = tmp_path / "mydoc.txt"
    doc.write_bytes(b"precious")
    for out in (doc, doc / "x.gguf"):
        with pytest.raises(UserError, match="mydoc.txt: exists and is not a directory"):
            gguf_path(out, run, "f16")
    earlier = tmp_path / "m.gguf"
    earlier.write_bytes(b"GGUF\x03\x00\x00\x00")
    assert gguf_path(earlier, run, "f16") == earlier
    assert gguf_path(tmp_path / "dir", run, "q8_0") == tmp_path / "dir" / "run-q8_0.gguf"
