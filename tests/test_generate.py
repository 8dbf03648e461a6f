"""Generation: greedy equals transformers' `generate`; the logit processors equal its warpers;
seeded sampling is reproducible; streaming never splits a character."""

from __future__ import annotations

import pytest
import torch

from babyllama.infer.generate import SamplingConfig, generate_ids, process_logits
from babyllama.model.llama import Llama

from test_model import hf_twin, tiny_config

transformers = pytest.importorskip("transformers")
from transformers.generation import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,  # noqa: E402
                                     TopKLogitsWarper, TopPLogitsWarper)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(3)
    model = Llama(tiny_config(max_position_embeddings=128)).eval()
    return model, hf_twin(model)


def test_greedy_tokens_equal_transformers_generate(pair):
    model, hf = pair
    prompt = [5, 17, 42, 99, 7]
    ours = list(generate_ids(model, prompt, SamplingConfig(max_new_tokens=30, temperature=0)))
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, min_new_tokens=30,
                         pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    assert ours == theirs


def test_greedy_with_repetition_penalty_equals_transformers(pair):
    model, hf = pair
    prompt = [1, 2, 3, 2, 1]
    ours = list(generate_ids(model, prompt, SamplingConfig(max_new_tokens=25, temperature=0,
                                                           repetition_penalty=1.3)))
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=25, do_sample=False, repetition_penalty=1.3,
                         min_new_tokens=25, pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    assert ours == theirs


@pytest.mark.parametrize("temperature, top_k, top_p, penalty", [
    (0.7, 0, 1.0, 1.0), (1.0, 20, 1.0, 1.0), (1.0, 0, 0.9, 1.0), (0.8, 50, 0.95, 1.2), (1.3, 5, 0.5, 0.8)])
def test_processed_distributions_equal_transformers_warpers(temperature, top_k, top_p, penalty):
    torch.manual_seed(0)
    logits = torch.randn(3, 300) * 3
    seen = torch.randint(0, 300, (3, 12))
    ours = process_logits(logits, seen, SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p,
                                                       repetition_penalty=penalty))
    theirs = logits.clone()
    processors = [RepetitionPenaltyLogitsProcessor(penalty)] if penalty != 1.0 else []
    processors.append(TemperatureLogitsWarper(temperature))
    if top_k:
        processors.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    for p in processors:
        theirs = p(seen, theirs)
    torch.testing.assert_close(ours.softmax(-1), theirs.softmax(-1))
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))


def test_seeded_sampling_is_reproducible_and_leaves_the_global_rng_alone(pair):
    model, _ = pair
    cfg = SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=40, seed=7)
    state = torch.get_rng_state()
    a = list(generate_ids(model, [3, 4, 5], cfg))
    b = list(generate_ids(model, [3, 4, 5], cfg))
    assert a == b
    assert torch.equal(state, torch.get_rng_state())
    c = list(generate_ids(model, [3, 4, 5], SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=40, seed=8)))
    assert c != a


def test_generation_stops_at_eos_and_at_the_context_end(pair):
    model, _ = pair
    prompt = [5, 17, 42]
    greedy = list(generate_ids(model, prompt, SamplingConfig(max_new_tokens=10, temperature=0)))
    stopped = list(generate_ids(model, prompt, SamplingConfig(max_new_tokens=10, temperature=0),
                                stop_ids=(greedy[3],)))
    assert stopped == greedy[:greedy.index(greedy[3])]
    long_prompt = list(range(1, 120))
    assert len(list(generate_ids(model, long_prompt, SamplingConfig(max_new_tokens=50, temperature=0)))) == 9


def test_streamed_pieces_never_end_inside_a_character(tiny_tokenizer):
    from babyllama.infer.generate import stream_text

    text = "龘龘好😀"  # absent from the training text: spelled with single-byte tokens
    ids = tiny_tokenizer.encode(text)
    assert len(ids) >= 8
    pieces = list(stream_text(tiny_tokenizer, iter(ids)))
    assert "".join(pieces) == text
    assert all(p and "\ufffd" not in p for p in pieces)


def test_streamed_sentencepiece_pieces_keep_their_spaces():
    from pathlib import Path

    from babyllama.infer.generate import stream_text
    from babyllama.tokenizer import Tokenizer

    model = Path(__file__).resolve().parents[2] / "shared/data/tokenizers/chinese-llama2/tokenizer.model"
    if not model.exists():
        pytest.skip("../shared/data is absent")
    tok = Tokenizer.load(model)
    ids = tok.encode("今天 天气 hello world 很好 ok")
    assert "".join(stream_text(tok, iter(ids))) == tok.decode(ids)


def test_llm_api_generates_and_streams(tiny_data, tmp_path):
    import babyllama
    from babyllama.config import load_config
    from babyllama.train.pretrain import run_pretrain

    from conftest import TINY_MODEL, TINY_TRAIN

    cfg = load_config("demo-cpu", TINY_MODEL + TINY_TRAIN + ["train.max_steps=30"])
    cfg.data, cfg.out_dir = str(tiny_data), str(tmp_path / "run")
    run_pretrain(cfg)
    llm = babyllama.load(tmp_path / "run", device="cpu")
    pieces = list(llm.stream("今天", max_new_tokens=30, temperature=1.0, seed=1))
    assert "".join(pieces) == llm.generate("今天", max_new_tokens=30, temperature=1.0, seed=1)
    batch = llm.generate(["今天", "中国"], max_new_tokens=8, temperature=0)
    assert isinstance(batch, list) and len(batch) == 2


def test_load_opens_a_transformers_llama_directory(tiny_tokenizer, tmp_path):
    """`babyllama.load` accepts a directory saved by transformers' `save_pretrained`."""
    import babyllama

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tiny_tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    tiny_tokenizer.save(tmp_path / "hf")
    llm = babyllama.load(tmp_path / "hf", device="cpu")
    x = torch.tensor([[tiny_tokenizer.bos_id] + tiny_tokenizer.encode("今天天气很好")])
    with torch.no_grad():
        torch.testing.assert_close(llm.model(x)[0], hf(x).logits, rtol=1e-5, atol=1e-5)
