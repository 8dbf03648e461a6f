"""Released model families import to the logits of transformers' own classes.

Each checkpoint is a tiny random one built locally with transformers' class for the family
(`LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`). Baichuan and InternLM2 ship
their modelling code with the checkpoint (not in transformers), so their layout is synthesised
from a transformers Llama: q/k/v fused into `W_pack` (Baichuan), grouped per KV head into
`wqkv` under InternLM2's names; the Llama's logits are the reference.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import SHARED_DATA, corpus_lines

transformers = pytest.importorskip("transformers")

from babyllama.errors import UserError  # noqa: E402
from babyllama.export.hf import import_hf, write_hf  # noqa: E402
from babyllama.infer.config import GenerationConfig  # noqa: E402
from babyllama.infer.generate import complete  # noqa: E402
from babyllama.llm import load  # noqa: E402
from babyllama.run import Run  # noqa: E402
from babyllama.tokenizer.chat_template import encode_chat  # noqa: E402

# Qwen2-Instruct's template as it ships in tokenizer_config.json: no {% generation %} block,
# a default system prompt.
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
MESSAGES = [{"role": "user", "content": "今天天气怎么样？"},
            {"role": "assistant", "content": "今天天气很好。"},
            {"role": "user", "content": "明天呢？"}, {"role": "assistant", "content": "明天下雨。"}]


@pytest.fixture(scope="module")
def qwen_tokenizer_files(tmp_path_factory):
    """tokenizer.json + tokenizer_config.json laid out as Qwen2's: byte-level BPE, the ChatML
    specials, bos_token null, eos <|im_end|>, the template above."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus_lines(200), trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out = tmp_path_factory.mktemp("qwen_tok")
    tk.save(str(out / "tokenizer.json"))
    added = {str(tk.token_to_id(t)): {"content": t, "special": True, "normalized": False, "lstrip": False,
                                      "rstrip": False, "single_word": False} for t in SPECIALS}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "added_tokens_decoder": added, "chat_template": QWEN2_TEMPLATE,
        "model_max_length": 64}))
    return out, tk.get_vocab_size()


def copy_tokenizer(files, dest):
    dest.mkdir(parents=True, exist_ok=True)
    for f in files.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())


def randomise(model, seed=0):
    """Spread the weights (and give biases and norms values) so logits differ clearly."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.5)
            else:
                p.normal_(0, 0.2)
    return model.eval()


COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)


def llama(vocab, **kw):
    return randomise(transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=vocab, **{**COMMON, **kw})))


def save_family(family: str, path, tok_files):
    """Write a tiny checkpoint of `family` to `path`; return the transformers model whose
    logits it must import to."""
    # Not padded (released models often round the table up): a random model would pick the
    # padding ids, which have no text to decode.
    files, vocab = tok_files
    if family == "llama-head-dim":
        ref = llama(vocab, head_dim=24, rope_theta=500000.0)  # heads narrower than hidden/heads
        ref.save_pretrained(path)
    elif family == "llama3-rope":  # Llama 3.1/3.2's scaling, its context shrunk to reach every branch
        ref = llama(vocab, rope_parameters={**LLAMA3_ROPE, "rope_theta": 10000.0})
        ref.save_pretrained(path)
    elif family == "linear-rope":
        ref = llama(vocab, rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
        ref.save_pretrained(path)
    elif family == "mistral":
        cfg = transformers.MistralConfig(vocab_size=vocab, sliding_window=32, **COMMON)
        ref = randomise(transformers.MistralForCausalLM(cfg))
        ref.save_pretrained(path)
    elif family == "qwen2":
        # A longer context: the template's default English system prompt is ~40 tokens here.
        cfg = transformers.Qwen2Config(vocab_size=vocab, tie_word_embeddings=True, rope_theta=1e6,
                                       bos_token_id=0, **{**COMMON, "max_position_embeddings": 256})
        ref = randomise(transformers.Qwen2ForCausalLM(cfg))
        ref.save_pretrained(path)
    elif family in ("baichuan", "baichuan2"):
        ref = llama(vocab, num_key_value_heads=4)  # Baichuan-7B has no GQA
        state = {k: v.clone() for k, v in ref.state_dict().items()}
        for i in range(COMMON["num_hidden_layers"]):
            p = f"model.layers.{i}.self_attn."
            state[p + "W_pack.weight"] = torch.cat([state.pop(p + n + "_proj.weight") for n in "qkv"])
        config = {k: v for k, v in ref.config.to_dict().items() if k in (*COMMON, "vocab_size")}
        arch = "BaiChuanForCausalLM"
        if family == "baichuan2":
            # Baichuan2's NormHead normalises each row at every forward: the reference head is
            # the normalised one, the checkpoint stores rows scaled by anything positive.
            with torch.no_grad():
                ref.lm_head.weight.copy_(torch.nn.functional.normalize(ref.lm_head.weight, dim=-1))
            state["lm_head.weight"] = ref.lm_head.weight * torch.rand(vocab, 1).add(0.5)
            arch = "BaichuanForCausalLM"
        save_raw(path, state, {**config, "model_type": "baichuan", "architectures": [arch],
                               "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 0})
    elif family == "internlm2":
        ref = llama(vocab, rope_theta=1e6)
        state = internlm2_layout(ref)
        config = {k: v for k, v in ref.config.to_dict().items() if k in (*COMMON, "vocab_size", "rope_theta")}
        save_raw(path, state, {**config, "rope_theta": 1e6, "model_type": "internlm2",
                               "architectures": ["InternLM2ForCausalLM"],
                               "bias": False, "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 0,
                               "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    copy_tokenizer(files, path)
    return ref


def save_raw(path, state, config):
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))


def internlm2_layout(ref):
    """A Llama's tensors as InternLM2 stores them (modeling_internlm2.py): per KV head, its
    query heads, then its key head, then its value head, in one `wqkv`."""
    c = ref.config
    d, kv = c.hidden_size // c.num_attention_heads, c.num_key_value_heads
    groups = c.num_attention_heads // kv
    names = {"self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
             "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm",
             "post_attention_layernorm": "ffn_norm"}
    state = {"model.tok_embeddings.weight": ref.model.embed_tokens.weight, "output.weight": ref.lm_head.weight,
             "model.norm.weight": ref.model.norm.weight}
    for i, layer in enumerate(ref.model.layers):
        a = layer.self_attn
        q = a.q_proj.weight.view(kv, groups, d, -1)
        k, v = a.k_proj.weight.view(kv, 1, d, -1), a.v_proj.weight.view(kv, 1, d, -1)
        state[f"model.layers.{i}.attention.wqkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, c.hidden_size)
        for ours, theirs in names.items():
            state[f"model.layers.{i}.{theirs}.weight"] = layer.get_submodule(ours).weight
    return {k: v.detach().clone() for k, v in state.items()}


FAMILIES = ["llama-head-dim", "llama3-rope", "linear-rope", "mistral", "qwen2", "baichuan", "baichuan2", "internlm2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_imports_to_the_logits_and_greedy_text_of_the_reference(family, qwen_tokenizer_files, tmp_path):
    ref = save_family(family, tmp_path / "hf", qwen_tokenizer_files)
    run = import_hf(tmp_path / "hf", tmp_path / "run")
    llm = load(run, device="cpu")
    ids = torch.tensor([llm.tokenizer.encode("今天天气很好。", add_bos=True)])
    with torch.no_grad():
        ours = llm.model(ids)[0]
        torch.testing.assert_close(ours, ref(ids).logits, rtol=1e-5, atol=1e-5)
        steps = min(12, llm.model.config.max_position_embeddings - ids.shape[1])  # Mistral's: 32
        theirs = ref.generate(ids, max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=None,
                              attention_mask=torch.ones_like(ids))[0, ids.shape[1]:].tolist()
    done = complete(llm.model, llm.tokenizer, [ids[0].tolist()],
                    GenerationConfig(temperature=0, max_new_tokens=steps), stop_ids=())[0]
    assert done.ids == theirs and len(theirs) >= 8
    assert llm.tokenizer.chat_template == QWEN2_TEMPLATE  # kept as the run's template
    # Exported back (as Llama, or Qwen2 for the biases), transformers gives the same logits.
    write_hf(llm.model, llm.tokenizer, tmp_path / "export")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ours, rtol=1e-5, atol=1e-5)


def test_qwen2_bos_comes_from_the_model_config_when_the_tokenizer_names_none(qwen_tokenizer_files, tmp_path):
    save_family("qwen2", tmp_path / "hf", qwen_tokenizer_files)
    llm = load(import_hf(tmp_path / "hf", tmp_path / "run"), device="cpu")
    assert llm.tokenizer.special_tokens["bos"] == "<|endoftext|>" and llm.tokenizer.bos_id == 0
    assert llm.tokenizer.vocab_size == qwen_tokenizer_files[1]  # nothing appended


def test_mistral_context_is_capped_at_its_sliding_window(qwen_tokenizer_files, tmp_path):
    save_family("mistral", tmp_path / "hf", qwen_tokenizer_files)
    assert Run(import_hf(tmp_path / "hf", tmp_path / "run")).model_config().max_position_embeddings == 32


def test_imported_template_renders_and_tokenizes_as_apply_chat_template_and_masks_only_answers(
        qwen_tokenizer_files, tmp_path):
    save_family("qwen2", tmp_path / "hf", qwen_tokenizer_files)
    tok = load(import_hf(tmp_path / "hf", tmp_path / "run"), device="cpu").tokenizer
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    enc = encode_chat(tok, MESSAGES)
    assert enc.ids == hf_tok.apply_chat_template(MESSAGES, tokenize=True, return_dict=True)["input_ids"]
    prompt = encode_chat(tok, MESSAGES[:3], add_generation_prompt=True)
    assert prompt.ids == hf_tok.apply_chat_template(MESSAGES[:3], tokenize=True, add_generation_prompt=True,
                                                    return_dict=True)["input_ids"]
    trained = [tok.decode(enc.ids[a:b], skip_special_tokens=False) for a, b in enc.spans]
    assert trained == ["今天天气很好。<|im_end|>", "明天下雨。<|im_end|>"]
    assert sum(enc.mask) == sum(b - a for a, b in enc.spans)


def test_a_template_whose_answers_cannot_be_found_is_refused_naming_the_answer(qwen_tokenizer_files, tmp_path):
    save_family("qwen2", tmp_path / "hf", qwen_tokenizer_files)
    tok = load(import_hf(tmp_path / "hf", tmp_path / "run"), device="cpu").tokenizer
    no_stop = QWEN2_TEMPLATE.replace("message['content'] + '<|im_end|>'", "message['content'] + '\n'")
    with pytest.raises(UserError, match="answer 1: no <\\|im_end\\|> .*ends it"):
        encode_chat(tok, MESSAGES, template=no_stop)
    # Rewrites history (as templates that strip reasoning from earlier answers do).
    rewrites = QWEN2_TEMPLATE.replace("message['content']", "(message['content'][:2] if not loop.last "
                                      "and message['role'] == 'assistant' else message['content'])")
    with pytest.raises(UserError, match="answer 1: the template does not write the answer as given"):
        encode_chat(tok, MESSAGES, template=rewrites)
    # Renders what comes before an answer differently once the answer follows.
    with pytest.raises(UserError, match="answer 1: the conversation before it renders differently"):
        encode_chat(tok, MESSAGES, template="{{ messages | length }}" + QWEN2_TEMPLATE)


@pytest.mark.parametrize("config,match", [
    ({"model_type": "chatglm"}, "rotary embeddings to half"),
    ({"model_type": "moss"}, "CodeGen/GPT-J"),
    ({"model_type": "qwen3"}, "q_norm"),
    ({"model_type": "baichuan", "hidden_size": 5120, "model_max_length": 4096}, "ALiBi"),
    ({"model_type": "llama", "attention_bias": True}, "attention_bias true"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling 'yarn'"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "needs positive low_freq"),
    ({"model_type": "llama", "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"model_type": "falcon"}, "cannot import model_type 'falcon' \\(these import"),
])
def test_what_cannot_map_exactly_is_refused_in_one_line_saying_why(config, match, qwen_tokenizer_files, tmp_path):
    save_family("llama-head-dim", tmp_path / "hf", qwen_tokenizer_files)
    d = json.loads((tmp_path / "hf" / "config.json").read_text())
    if "max_position_embeddings" not in config and config["model_type"] == "baichuan":
        del d["max_position_embeddings"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**d, **config}))
    with pytest.raises(UserError, match=match) as e:
        import_hf(tmp_path / "hf", tmp_path / "run")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_a_fused_checkpoint_opened_without_import_says_to_import_it(qwen_tokenizer_files, tmp_path):
    save_family("baichuan", tmp_path / "hf", qwen_tokenizer_files)
    with pytest.raises(UserError, match="babyllama import"):
        load(tmp_path / "hf", device="cpu")


def test_a_qwen2_directory_opens_as_it_is(qwen_tokenizer_files, tmp_path):
    ref = save_family("qwen2", tmp_path / "hf", qwen_tokenizer_files)
    llm = load(tmp_path / "hf", device="cpu")
    ids = torch.tensor([[0, 5, 9, 30]])
    with torch.no_grad():
        torch.testing.assert_close(llm.model(ids)[0], ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_qwen2_lora_merged_and_exported_reloads_in_transformers_as_qwen2(qwen_tokenizer_files, tmp_path):
    """Biases survive LoRA, merging and export: the export is a Qwen2ForCausalLM (Llama's
    attention_bias would also add one to o_proj) with the merged model's logits."""
    pytest.importorskip("peft")
    from babyllama.lora import LoraConfig, apply_lora, merge_lora

    save_family("qwen2", tmp_path / "hf", qwen_tokenizer_files)
    llm = load(import_hf(tmp_path / "hf", tmp_path / "run"), device="cpu")
    model = apply_lora(llm.model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj"]))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    ids = torch.tensor([[0, 5, 9, 30, 41]])
    with torch.no_grad():
        adapted = model(ids)[0]
    merged = merge_lora(model).eval()
    write_hf(merged, llm.tokenizer, tmp_path / "export")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(merged(ids)[0], adapted, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hf(ids).logits, adapted, rtol=1e-5, atol=1e-5)


QUIET = ["train.eval_every=0", "train.sample_every=0", "train.sample_prompts=[]", "train.warmup_steps=0",
         "train.batch_size=2", "train.max_steps=2"]


def cli(capsys, *args) -> tuple[int, str, str]:
    from babyllama.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.slow
def test_an_imported_qwen2_fine_tunes_with_its_own_template_and_exports_back(qwen_tokenizer_files, tmp_path, capsys):
    """import -> LoRA SFT (the released template, answers found without generation markers)
    -> DPO on the SFT run -> export with the adapter merged -> transformers' Qwen2 gives the
    merged run's logits."""
    pytest.importorskip("peft")
    save_family("qwen2", tmp_path / "hf", qwen_tokenizer_files)
    rc, out, err = cli(capsys, "import", tmp_path / "hf", "-o", tmp_path / "run")
    assert rc == 0, err
    assert "imported Qwen2" in out and "with its chat template" in out
    convs = tmp_path / "convs.jsonl"
    convs.write_text("".join(json.dumps({"messages": MESSAGES}, ensure_ascii=False) + "\n" for _ in range(8)),
                     encoding="utf-8")
    rc, out, err = cli(capsys, "sft", "--base", tmp_path / "run", "--data", convs, "-o", tmp_path / "lora",
                       "--lora", "lora.r=4", *QUIET)
    assert rc == 0, err[-3000:]
    lora = Run(tmp_path / "lora")
    assert lora.config().sft.template == "base" and lora.load_tokenizer().chat_template == QWEN2_TEMPLATE
    pairs = tmp_path / "pairs.jsonl"
    pair = {"prompt": "明天呢？", "chosen": "明天下雨。", "rejected": "今天天气很好。"}
    pairs.write_text((json.dumps(pair, ensure_ascii=False) + "\n") * 8, encoding="utf-8")
    rc, out, err = cli(capsys, "merge-lora", tmp_path / "lora", "-o", tmp_path / "merged")
    assert rc == 0, err[-3000:]
    rc, out, err = cli(capsys, "dpo", "--base", tmp_path / "merged", "--data", pairs, "-o", tmp_path / "dpo",
                       "--lora", "lora.r=4", *QUIET)
    assert rc == 0, err[-3000:]
    rc, out, err = cli(capsys, "export", tmp_path / "dpo", "--format", "hf", "--merge", "-o", tmp_path / "export")
    assert rc == 0, err[-3000:]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    ids = torch.tensor([hf_tok.apply_chat_template(MESSAGES[:1], add_generation_prompt=True,
                                                   return_dict=True)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, load(tmp_path / "dpo", device="cpu").model(ids)[0],
                                   rtol=1e-5, atol=1e-5)


def test_a_released_model_without_chatml_tokens_fine_tunes_with_the_babyllama_template(
        qwen_tokenizer_files, tmp_path):
    """A base Llama with no chat template and no <|im_start|>: the vocabulary cannot grow, so
    SFT renders with the `babyllama` template (BOS/EOS and plain text) instead of ChatML."""
    from babyllama.train.sft import finetune_tokenizer, sft_config

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    vocab = qwen_tokenizer_files[1]
    save_family("llama-head-dim", tmp_path / "hf", qwen_tokenizer_files)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator(corpus_lines(200), trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.save(str(tmp_path / "hf" / "tokenizer.json"))
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    run = import_hf(tmp_path / "hf", tmp_path / "run")
    assert Run(run).load_tokenizer().fixed_vocab
    sft = sft_config(run, {"sft": {"sources": ["x.jsonl"]}, "out_dir": str(tmp_path / "sft")})
    tokenizer = finetune_tokenizer(sft, Run(run))
    assert sft.sft.template == "babyllama" and tokenizer.vocab_size <= vocab
    # Asking for ChatML by name: its markers would be spelled out in bytes, so it is refused.
    chatml = sft_config(run, ["sft.template=chatml", "sft.sources=[x.jsonl]", f"out_dir={tmp_path / 'sft2'}"])
    with pytest.raises(UserError, match="writes <\\|im_end\\|>, <\\|im_start\\|>, which .* has no token"):
        finetune_tokenizer(chatml, Run(run))


# Llama-2's chat layout: the answer follows its prompt's text, after a space.
LLAMA2_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}"
                   "{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}"
                   "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")


@pytest.mark.skipif(not (SHARED_DATA / "tokenizers" / "chinese-llama2" / "tokenizer.model").exists(),
                    reason="shared data (chinese-llama2 tokenizer) absent")
def test_a_sentencepiece_answer_that_follows_text_gets_no_dummy_prefix_of_its_own():
    """Cut between prompt and answer, the answer is encoded as it is inside the whole text
    (no "▁" of its own), so the ids are SentencePiece's for each stretch between control
    tokens, and a chat prompt is the prefix of the training ids."""
    from babyllama.tokenizer import Tokenizer

    tok = Tokenizer.load(SHARED_DATA / "tokenizers" / "chinese-llama2", fixed_vocab=True)
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好，我是助手。"},
                {"role": "user", "content": "北京在哪里？"},
                {"role": "assistant", "content": "北京在中国。"}]
    enc = encode_chat(tok, messages, template=LLAMA2_TEMPLATE)
    sp = tok.backend
    expected = [tok.bos_id, *sp.encode("[INST] 你好 [/INST] 你好，我是助手。 "), tok.eos_id,
                tok.bos_id, *sp.encode("[INST] 北京在哪里？ [/INST] 北京在中国。 "), tok.eos_id]
    assert enc.ids == expected
    assert [tok.decode(enc.ids[a:b], skip_special_tokens=False) for a, b in enc.spans] == \
        ["你好，我是助手。 </s>", "北京在中国。 </s>"]
    prompt = encode_chat(tok, messages[:3], template=LLAMA2_TEMPLATE, add_generation_prompt=True)
    assert prompt.ids == enc.ids[:len(prompt.ids)]


def edit_config(path, **changes):
    d = json.loads((path / "config.json").read_text())
    d.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del d[k]
    (path / "config.json").write_text(json.dumps(d))


@pytest.mark.parametrize("family,changes,match", [
    ("baichuan", {"architectures": None}, "naming neither BaiChuanForCausalLM"),
    ("mistral", {"sliding_window": 0}, "sliding_window 0"),
    ("llama-head-dim", {"tie_word_embeddings": True}, "ties the LM head .* different lm_head.weight"),
])
def test_an_ambiguous_checkpoint_is_refused_rather_than_guessed(family, changes, match, qwen_tokenizer_files,
                                                                tmp_path):
    save_family(family, tmp_path / "hf", qwen_tokenizer_files)
    edit_config(tmp_path / "hf", **changes)
    with pytest.raises(UserError, match=match):
        import_hf(tmp_path / "hf", tmp_path / "run")
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob(".run*"))


def test_a_qwen2_whose_layers_never_slide_keeps_its_context(qwen_tokenizer_files, tmp_path):
    save_family("qwen2", tmp_path / "hf", qwen_tokenizer_files)
    edit_config(tmp_path / "hf", use_sliding_window=True, sliding_window=16, max_window_layers=2,
                layer_types=None)
    assert Run(import_hf(tmp_path / "hf", tmp_path / "run")).model_config().max_position_embeddings == 256
    edit_config(tmp_path / "hf", max_window_layers=1)  # layer 1 slides: capped
    assert Run(import_hf(tmp_path / "hf", tmp_path / "run2")).model_config().max_position_embeddings == 16


def test_nan_weights_and_a_broken_template_are_refused_naming_the_checkpoint(qwen_tokenizer_files, tmp_path):
    from safetensors.torch import load_file, save_file

    save_family("llama-head-dim", tmp_path / "hf", qwen_tokenizer_files)
    weights = tmp_path / "hf" / "model.safetensors"
    good = weights.read_bytes()
    state = load_file(str(weights))
    state["model.norm.weight"][3] = float("nan")
    save_file(state, str(weights))
    with pytest.raises(UserError, match="model.norm.weight holds NaN"):
        import_hf(tmp_path / "hf", tmp_path / "run")
    weights.write_bytes(good)
    cfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": "{{ x }"}))
    with pytest.raises(UserError, match="hf: its chat template .* does not compile"):
        import_hf(tmp_path / "hf", tmp_path / "run")


def test_import_into_a_file_or_an_unwritable_place_is_one_line_and_leaves_nothing(qwen_tokenizer_files, tmp_path,
                                                                                 capsys):
    save_family("qwen2", tmp_path / "hf", qwen_tokenizer_files)
    (tmp_path / "afile").write_text("precious")
    rc, _, err = cli(capsys, "import", tmp_path / "hf", "-o", tmp_path / "afile")
    assert rc == 2 and "afile: exists and is not a directory" in err and "Traceback" not in err
    assert (tmp_path / "afile").read_text() == "precious"
    rc, _, err = cli(capsys, "import", tmp_path / "hf", "-o", tmp_path / "afile" / "run")
    assert rc == 2 and "cannot write the run" in err and len(err.strip().splitlines()) == 1
    import_hf(tmp_path / "hf", tmp_path / "run")
    rc, _, err = cli(capsys, "export", tmp_path / "run", "--format", "hf", "-o", tmp_path / "afile" / "sub")
    assert rc == 2 and err.strip().splitlines() == [f"error: {tmp_path / 'afile' / 'sub'}: Not a directory"]


def test_an_imported_run_with_a_template_chats_and_a_directory_with_too_few_embeddings_is_refused(
        qwen_tokenizer_files, tmp_path):
    save_family("qwen2", tmp_path / "hf", qwen_tokenizer_files)
    assert Run(import_hf(tmp_path / "hf", tmp_path / "run")).chats()
    edit_config(tmp_path / "hf", vocab_size=200)
    with pytest.raises(UserError, match="the tokenizer has 300 tokens but the model only 200 embeddings"):
        load(tmp_path / "hf", device="cpu")


def test_embedding_rows_past_the_tokenizer_are_dropped_so_sampling_cannot_pick_them(qwen_tokenizer_files, tmp_path):
    """Released tables are padded past the tokenizer (Qwen2.5: 151,936 rows, 151,665 tokens):
    import and direct open keep the tokenizer's rows, whose logits are the reference's."""
    files, vocab = qwen_tokenizer_files
    save_family("qwen2", tmp_path / "hf", qwen_tokenizer_files)
    d = json.loads((tmp_path / "hf" / "config.json").read_text())
    ref = randomise(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{**d, "vocab_size": vocab + 60})))
    ref.save_pretrained(tmp_path / "hf")
    ids = torch.tensor([[0, 5, 9, 30, 41]])
    with torch.no_grad():
        expected = ref(ids).logits[..., :vocab]
        for source in (import_hf(tmp_path / "hf", tmp_path / "run"), tmp_path / "hf"):
            llm = load(source, device="cpu")
            assert llm.model.config.vocab_size == vocab
            torch.testing.assert_close(llm.model(ids)[0], expected, rtol=1e-5, atol=1e-5)
            assert llm.generate("今天", max_new_tokens=20, temperature=1.5, seed=0) is not None


def test_generation_configs_end_tokens_stop_answers_and_survive_export(qwen_tokenizer_files, tmp_path):
    """Llama 3 Instruct ends turns with <|eot_id|>, listed beside EOS in generation_config.json."""
    from babyllama.tokenizer.chat_template import stop_token_ids

    save_family("llama-head-dim", tmp_path / "hf", qwen_tokenizer_files)
    cfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": "<|endoftext|>"}))
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    llm = load(import_hf(tmp_path / "hf", tmp_path / "run"), device="cpu")
    assert llm.tokenizer.end_tokens == ["<|im_end|>"] and 2 in stop_token_ids(llm.tokenizer)
    write_hf(llm.model, llm.tokenizer, tmp_path / "export")
    assert json.loads((tmp_path / "export" / "generation_config.json").read_text())["eos_token_id"] == [0, 2]


@pytest.mark.parametrize("change,match", [
    ({"hidden_size": "64"}, "hidden_size is '64', not a whole number"),
    ({"rms_norm_eps": -1.0}, "rms_norm_eps must be positive"),
    ({"hidden_size": None}, "no hidden_size"),
])
def test_config_values_of_the_wrong_kind_are_one_line_errors(change, match, qwen_tokenizer_files, tmp_path):
    save_family("llama-head-dim", tmp_path / "hf", qwen_tokenizer_files)
    edit_config(tmp_path / "hf", **change)
    with pytest.raises(UserError, match=match):
        import_hf(tmp_path / "hf", tmp_path / "run")


def test_a_pickle_of_other_things_or_a_non_string_template_is_refused(qwen_tokenizer_files, tmp_path):
    save_family("llama-head-dim", tmp_path / "hf", qwen_tokenizer_files)
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save({"x": [1, 2]}, tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(UserError, match="pytorch_model.bin: not a state dict"):
        import_hf(tmp_path / "hf", tmp_path / "run")
    cfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": 5}))
    with pytest.raises(UserError, match="chat_template is int"):
        import_hf(tmp_path / "hf", tmp_path / "run")


def test_chat_template_jinja_wins_over_the_tokenizer_configs_as_in_transformers(qwen_tokenizer_files, tmp_path):
    save_family("qwen2", tmp_path / "hf", qwen_tokenizer_files)
    other = QWEN2_TEMPLATE.replace("You are a helpful assistant.", "你是助手。")
    (tmp_path / "hf" / "chat_template.jinja").write_text(other, encoding="utf-8")
    tok = load(import_hf(tmp_path / "hf", tmp_path / "run"), device="cpu").tokenizer
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.chat_template == other
    assert encode_chat(tok, MESSAGES).ids == hf_tok.apply_chat_template(MESSAGES, tokenize=True,
                                                                      return_dict=True)["input_ids"]
