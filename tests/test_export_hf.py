"""transformers export and import: the same logits, the same token ids, the same chat string."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import SHARED_DATA, corpus_lines

transformers = pytest.importorskip("transformers")

from babyllama.errors import UserError  # noqa: E402
from babyllama.export.hf import import_hf, write_hf, write_tokenizer_files  # noqa: E402
from babyllama.infer.config import GenerationConfig  # noqa: E402
from babyllama.infer.generate import complete  # noqa: E402
from babyllama.model.llama import Llama, ModelConfig  # noqa: E402
from babyllama.tokenizer import Tokenizer  # noqa: E402
from babyllama.tokenizer.chat_template import TEMPLATES, render  # noqa: E402

MESSAGES = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "今天天气怎么样？"},
            {"role": "assistant", "content": "今天天气很好。"}, {"role": "user", "content": "明天呢 123?"}]
TEXTS = corpus_lines(40) + ["  两个空格 and tabs\t\t后面", "emoji 😀 全角ＡＢＣ１２３", "a\n\nb\n", " ", "",
                            "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n", "<s>x</s><pad>"]


def tiny_model(vocab: int, kv_heads: int | None, tied: bool, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    # initializer_range 0.2: logits far apart enough that greedy argmax has no near-ties.
    return Llama(ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=kv_heads,
                             max_position_embeddings=64, tie_word_embeddings=tied,
                             initializer_range=0.2)).eval()


def hf_ids(hf_tok, text: str) -> list[int]:
    return hf_tok(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("kv_heads,tied", [(2, False), (None, True)], ids=["gqa-untied", "mha-tied"])
def test_transformers_logits_and_greedy_tokens_equal_ours(tiny_tokenizer, tmp_path, kv_heads, tied):
    model = tiny_model(tiny_tokenizer.vocab_size, kv_heads, tied)
    write_hf(model, tiny_tokenizer, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.num_key_value_heads == (kv_heads or 4)
    ids = torch.tensor([tiny_tokenizer.encode("今天天气很好，我们去公园", add_bos=True)])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids)[0], rtol=1e-5, atol=1e-5)
        hf_out = hf.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None,
                             attention_mask=torch.ones_like(ids))[0, ids.shape[1]:].tolist()
    ours = complete(model, tiny_tokenizer, [ids[0].tolist()],
                    GenerationConfig(temperature=0, max_new_tokens=20), stop_ids=())[0]
    assert hf_out == ours.ids


def test_exported_files_get_a_plain_files_mode_not_a_temp_files(tiny_tokenizer, tmp_path):
    import os

    write_hf(tiny_model(tiny_tokenizer.vocab_size, 2, False), tiny_tokenizer, tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_half_precision_export_holds_the_rounded_weights(tiny_tokenizer, tmp_path):
    model = tiny_model(tiny_tokenizer.vocab_size, 2, False)
    write_hf(model, tiny_tokenizer, tmp_path, dtype="bf16")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    w = hf.model.layers[1].mlp.down_proj.weight
    assert w.dtype == torch.bfloat16
    assert torch.equal(w, model.model.layers[1].mlp.down_proj.weight.to(torch.bfloat16))
    with pytest.raises(UserError, match="--dtype q8_0"):
        write_hf(model, tiny_tokenizer, tmp_path / "x", dtype="q8_0")


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_autotokenizer_gives_our_ids_and_apply_chat_template_our_string(tiny_tokenizer, tmp_path, template):
    tok = Tokenizer(tiny_tokenizer._backend, tiny_tokenizer.special_tokens, chat_template=TEMPLATES[template])
    write_tokenizer_files(tok, tmp_path, 64)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert hf_ids(hf_tok, text) == tok.encode(text, parse_special=True), text
        assert hf_tok(text).input_ids == tok.encode(text, add_bos=True, parse_special=True)  # BOS by default
        # transformers' switch for "special-token text is text" gives our plain encoding.
        assert hf_tok(text, add_special_tokens=False, split_special_tokens=True).input_ids == tok.encode(text)
        assert hf_tok.decode(tok.encode(text), skip_special_tokens=True) == tok.decode(tok.encode(text))
    for generation_prompt, messages in ((False, MESSAGES[:3]), (True, MESSAGES)):
        ours, _ = render(tok.chat_template, messages, add_generation_prompt=generation_prompt,
                         special_tokens=tok.special_tokens)
        theirs = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        assert theirs == ours
        ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert list(ids) == tok.encode(ours, parse_special=True)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    again = Tokenizer.load(tmp_path)  # babyllama reads its own export back with the same roles
    assert again.special_token_ids == tok.special_token_ids and again.chat_template == tok.chat_template


def real_texts(n: int = 400) -> list[str]:
    wiki = [json.loads(line)["text"] for line in
            (SHARED_DATA / "pretrain" / "zhwiki" / "paragraphs.jsonl").read_text(encoding="utf-8").splitlines()]
    alpaca = json.loads((SHARED_DATA / "sft" / "alpaca_zh" / "zh-data-part-00.json").read_text(encoding="utf-8"))
    return wiki[:n] + [a["instruction"] + "\n" + a["input"] + "\n" + a["output"] for a in alpaca[:n]] + TEXTS


@pytest.mark.skipif(not (SHARED_DATA / "tokenizers" / "chatglm2").exists(), reason="needs ../shared/data")
def test_sentencepiece_tokenizer_converts_to_a_fast_tokenizer_with_the_same_ids(tmp_path):
    """ChatGLM2's SentencePiece BPE (byte fallback, dummy prefix) plus our appended specials:
    the fast tokenizer.json that transformers loads gives SentencePiece's ids on real text."""
    tok = Tokenizer.load(SHARED_DATA / "tokenizers" / "chatglm2")
    assert write_tokenizer_files(tok, tmp_path, 512) == []
    assert (tmp_path / "tokenizer.model").exists()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert len(hf_tok) == tok.vocab_size
    texts = real_texts()
    assert [hf_ids(hf_tok, t) for t in texts] == [tok.encode(t, parse_special=True) for t in texts]
    # Decoding agrees on text; around special tokens SentencePiece strips each segment's dummy
    # "▁" while a fast decoder strips only the first (Llama's known legacy behaviour).
    for t in texts[:50] + [t for t in TEXTS if "<" not in t]:
        assert hf_tok.decode(tok.encode(t), skip_special_tokens=True) == tok.decode(tok.encode(t))


@pytest.mark.skipif(not (SHARED_DATA / "tokenizers" / "chinese-llama2").exists(), reason="needs ../shared/data")
def test_sentencepiece_with_tied_scores_is_exported_with_a_warning(tmp_path):
    """Chinese-LLaMA-2 scored ~15k added pieces 0: SentencePiece breaks ties by position, which no
    strict merge ranking reproduces everywhere, so the export says so (and ships tokenizer.model)."""
    tok = Tokenizer.load(SHARED_DATA / "tokenizers" / "chinese-llama2")
    warnings = write_tokenizer_files(tok, tmp_path, 512)
    assert len(warnings) == 1 and "share a score" in warnings[0]
    again = Tokenizer.load(tmp_path)  # babyllama itself keeps using SentencePiece
    assert again.kind == "sentencepiece" and again.special_token_ids == tok.special_token_ids
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts = real_texts(200)
    same = sum(hf_ids(hf_tok, t) == tok.encode(t, parse_special=True) for t in texts)
    assert same > len(texts) // 3  # most short texts still agree; the decoded text always does
    assert all(hf_tok.decode(hf_ids(hf_tok, t)) == tok.decode(tok.encode(t)) for t in texts[:100])


def test_unigram_sentencepiece_with_nfkc_and_whitespace_cleanup_converts_exactly(tmp_path):
    """The general path: a unigram model whose normalizer is NFKC (precompiled charsmap) and
    which strips and collapses spaces."""
    import sentencepiece as spm

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(corpus_lines(300)), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "uni"), vocab_size=400, hard_vocab_limit=False,
                                   model_type="unigram", character_coverage=1.0, byte_fallback=True,
                                   normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True,
                                   minloglevel=2)
    tok = Tokenizer.load(tmp_path / "uni.model")
    write_tokenizer_files(tok, tmp_path / "hf", 64)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in TEXTS + ["ｆｕｌｌ　ｗｉｄｔｈ　１２３", "  多个   空格  "]:
        assert hf_ids(hf_tok, text) == tok.encode(text, parse_special=True), text


def save_random_transformers_llama(path, tokenizer, dtype=torch.float32, **shard):
    torch.manual_seed(1)
    config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                      max_position_embeddings=64, rope_theta=500000.0, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(config).to(dtype).eval()
    hf.save_pretrained(path, **shard)
    write_tokenizer_files(tokenizer, path, 64)
    return hf


@pytest.mark.parametrize("dtype,shard", [(torch.float32, {}), (torch.bfloat16, {"max_shard_size": "20KB"})],
                         ids=["fp32", "bf16-sharded"])
def test_import_of_a_transformers_llama_gives_its_logits(tiny_tokenizer, tmp_path, dtype, shard):
    from babyllama.llm import load

    hf = save_random_transformers_llama(tmp_path / "hf", tiny_tokenizer, dtype, **shard)
    if shard:
        assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    run = import_hf(tmp_path / "hf", tmp_path / "run")
    assert (run / "config.yaml").exists() and (run / "tokenizer" / "tokenizer.json").exists()
    llm = load(run, device="cpu")
    assert llm.model.config.kv_heads == 1 and llm.model.config.rope_theta == 500000.0
    ids = torch.tensor([tiny_tokenizer.encode("中国的经济发展", add_bos=True)])
    with torch.no_grad():
        torch.testing.assert_close(llm.model(ids)[0], hf.float()(ids).logits, rtol=1e-5, atol=1e-5)
    assert llm.tokenizer.special_token_ids == tiny_tokenizer.special_token_ids


def test_import_refuses_what_our_llama_cannot_represent(tiny_tokenizer, tmp_path):
    save_random_transformers_llama(tmp_path / "hf", tiny_tokenizer)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    with pytest.raises(UserError, match="attention_bias"):
        import_hf(tmp_path / "hf", tmp_path / "run")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "model_type": "chatglm"}))
    with pytest.raises(UserError, match="cannot import model_type 'chatglm'"):
        import_hf(tmp_path / "hf", tmp_path / "run")
    with pytest.raises(UserError, match="no config.json"):
        import_hf(tmp_path, tmp_path / "run")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(UserError, match="mlp.down_proj.weight has shape"):
        import_hf(tmp_path / "hf", tmp_path / "run")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="cannot read the weights"):
        import_hf(tmp_path / "hf", tmp_path / "run")


def test_export_refuses_a_folder_of_other_files_and_rewrites_an_earlier_export(tmp_path, tiny_tokenizer):
    """An export writes into -o without deleting: into a folder of the user's files it would mix
    with them (and list them as exported), so it is refused; an earlier export is rewritten."""
    from babyllama.export import export_run
    from babyllama.run import Run
    from babyllama.config import load_config
    from babyllama.model.llama import Llama
    from conftest import TINY_MODEL

    cfg = load_config("demo-cpu", TINY_MODEL + [f"model.vocab_size={tiny_tokenizer.vocab_size}"])
    Run(tmp_path / "run").write_plain_run(Llama(cfg.model), tiny_tokenizer, cfg)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("keep", encoding="utf-8")
    with pytest.raises(UserError, match=r"victim: exists and holds other files \(e.g. notes.txt\)"):
        export_run(tmp_path / "run", "hf", victim)
    first = export_run(tmp_path / "run", "hf", tmp_path / "hf")
    again = export_run(tmp_path / "run", "hf", tmp_path / "hf")
    assert [f.name for f in again.files] == [f.name for f in first.files]
