"""ONNX export against our model: onnxruntime gives our logits for a prompt, for every decoding
step fed through past_key_values, for left-padded batches, and our engine's greedy tokens; the
graph carries the documented names and dynamic axes.

Two tiny models are exported once each (an export takes seconds): grouped-query attention with
an untied head, and multi-head attention with tied embeddings, the latter with its weights in a
separate data file so that path is run too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from babyllama.errors import UserError
from babyllama.export.onnx import OnnxLlama, input_names, output_names, write_onnx
from babyllama.infer.config import GenerationConfig
from babyllama.infer.generate import complete
from babyllama.model.llama import Llama, ModelConfig

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

VOCAB = 400  # the tiny tokenizer's, so the greedy test can run our engine through `complete`
CONTEXT = 64


def tiny_config(**kw) -> ModelConfig:
    # A random model at the usual init (0.02) has near-uniform logits, where the argmax of two
    # implementations can differ on a rounding-level tie; 0.2 spreads them, so greedy tokens
    # are a fair comparison.
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                initializer_range=0.2)
    base.update(kw)
    return ModelConfig(**base)


def exported(folder, seed: int, external_data: bool = False, **kw):
    torch.manual_seed(seed)
    model = Llama(tiny_config(**kw)).eval()
    path = write_onnx(model, folder / "model.onnx", external_data=external_data)
    return model, OnnxLlama(path, threads=1), path


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    # What an earlier, split export of a bigger model would have left: it must not survive
    # beside a graph that holds its own weights.
    (folder / "model.onnx.data").write_bytes(b"stale")
    return exported(folder, seed=0)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return exported(tmp_path_factory.mktemp("onnx"), seed=1, external_data=True,
                    num_key_value_heads=4, tie_word_embeddings=True)


def ours(model, ids: list[int]) -> np.ndarray:
    """Our model's logits for one unpadded sequence, (T, vocab)."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    return logits[0].numpy()


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pair", ["gqa", "tied"])
def test_onnxruntime_logits_equal_ours_on_a_prompt(pair, request):
    model, session, _ = request.getfixturevalue(pair)
    ids = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected, _ = model(ids)
    close(session.logits(ids.numpy()), expected.numpy())


def test_a_model_with_qkv_biases_and_its_own_head_width_exports_to_its_logits(tmp_path):
    """An imported Qwen2's shape: biases on q/k/v, heads 24 wide (not 64 / 4)."""
    torch.manual_seed(2)
    model = Llama(tiny_config(qkv_bias=True, head_dim=24)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):  # zero at init
                p.normal_(0, 0.5)
    session = OnnxLlama(write_onnx(model, tmp_path / "model.onnx"), threads=1)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected, _ = model(ids)
    close(session.logits(ids.numpy()), expected.numpy())


def test_only_the_graph_and_its_data_file_are_left_in_the_folder(gqa, tied):
    # No staging folder remains; a stale data file from an earlier export is removed.
    assert [p.name for p in gqa[2].parent.iterdir()] == ["model.onnx"]
    model, _, path = tied
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    # Tied embeddings are stored once: a second copy would not fit in half an embedding.
    weights = sum(p.numel() for p in model.parameters()) * 4
    embedding = model.model.embed_tokens.weight.numel() * 4
    assert path.with_name("model.onnx.data").stat().st_size < weights + embedding / 2


def test_decoding_with_past_key_values_gives_the_full_forward_logits(gqa):
    model, session, _ = gqa
    tokens = torch.randint(0, VOCAB, (16,), generator=torch.Generator().manual_seed(6)).tolist()
    expected = ours(model, tokens)
    past, done = session.empty_past(1), 0
    # A 6-token prompt, a 3-token block after it (causality shifted by the past), then single
    # tokens as in decoding.
    for step in [6, 3] + [1] * 7:
        block = tokens[done:done + step]
        logits, past = session.run([block], np.ones((1, done + step)),
                                   [list(range(done, done + step))], past)
        close(logits[0], expected[done:done + step])
        done += step
    assert past[0].shape == (1, 2, 16, 16)


def test_left_padded_rows_get_the_logits_of_each_prompt_alone(gqa):
    model, session, _ = gqa
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (4, 9)]
    width = max(map(len, prompts))
    ids = np.array([[0] * (width - len(p)) + p for p in prompts])
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    logits, past = session.run(ids, mask, positions, session.empty_past(2))
    for row, p in enumerate(prompts):
        close(logits[row, -1], ours(model, p)[-1])
    assert all(np.isfinite(kv).all() for kv in past)
    # A decoding step after the padded prefill: the pad slots' cached keys/values stay masked.
    nxt = [[11], [12]]
    mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
    logits, _ = session.run(nxt, mask, [[len(p)] for p in prompts], past)
    for row, p in enumerate(prompts):
        close(logits[row, -1], ours(model, p + nxt[row])[-1])


def test_greedy_tokens_equal_our_engines_greedy_tokens(gqa, tiny_tokenizer):
    model, session, _ = gqa
    prompt = [tiny_tokenizer.bos_id] + tiny_tokenizer.encode("今天天气很好，我们")
    expected = complete(model, tiny_tokenizer, [prompt],
                        GenerationConfig(temperature=0, max_new_tokens=20))[0].ids
    assert session.greedy(prompt, 20, eos_id=tiny_tokenizer.eos_id) == expected
    assert len(expected) >= 10  # enough steps to mean something


def test_greedy_stops_at_the_context_like_our_engine(gqa, tiny_tokenizer):
    model, session, _ = gqa
    prompt = list(range(1, CONTEXT - 2))  # room for 3 new tokens
    expected = complete(model, tiny_tokenizer, [prompt],
                        GenerationConfig(temperature=0, max_new_tokens=20), stop_ids=())[0].ids
    assert session.greedy(prompt, 20) == expected
    assert len(expected) == 3
    with pytest.raises(UserError, match="context"):
        session.greedy(list(range(1, CONTEXT + 1)), 5)
    with pytest.raises(UserError, match="empty"):
        session.greedy([], 5)


def test_graph_has_the_documented_names_and_dynamic_axes(gqa):
    model, _, path = gqa
    c = model.config
    graph = onnx.load(str(path)).graph

    def shapes(values):
        return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in values}

    def types(values):
        return {v.name: onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
                for v in values}

    assert [v.name for v in graph.input] == input_names(c.num_hidden_layers)
    assert [v.name for v in graph.output] == output_names(c.num_hidden_layers)
    total = "past_sequence + sequence"
    kv = [c.kv_heads, c.head_size]
    expected_inputs = {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", total],
                       "position_ids": ["batch", "sequence"]}
    expected_outputs = {"logits": ["batch", "sequence", c.vocab_size]}
    for i in range(c.num_hidden_layers):
        for part in ("key", "value"):
            expected_inputs[f"past_key_values.{i}.{part}"] = ["batch", kv[0], "past_sequence", kv[1]]
            expected_outputs[f"present.{i}.{part}"] = ["batch", kv[0], total, kv[1]]
    assert shapes(graph.input) == expected_inputs
    assert shapes(graph.output) == expected_outputs
    assert set(types(graph.input).values()) - {np.dtype("float32")} == {np.dtype("int64")}
    assert all(types(graph.input)[n] == np.int64 for n in ("input_ids", "attention_mask",
                                                           "position_ids"))
    assert set(types(graph.output).values()) == {np.dtype("float32")}


def test_an_opset_older_than_the_exporters_is_refused(gqa, tmp_path):
    with pytest.raises(UserError, match="opset 13"):
        write_onnx(gqa[0], tmp_path / "model.onnx", opset=13)
    assert not any(tmp_path.iterdir())
