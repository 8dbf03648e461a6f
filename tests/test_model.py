"""The model: shapes, causality, KV-cache equivalence, and identity with transformers' Llama."""

from __future__ import annotations

import pytest
import torch

from babyllama.model.llama import Llama, ModelConfig
from conftest import hf_twin

transformers = pytest.importorskip("transformers")


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                rope_theta=10000.0)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("kw", [
    {},                                                   # grouped-query attention, untied
    {"num_key_value_heads": 4, "tie_word_embeddings": True},
    {"num_key_value_heads": 1, "rope_theta": 500000.0},   # multi-query, Llama-3's theta
])
def test_logits_equal_transformers_llama_on_copied_weights(kw):
    torch.manual_seed(0)
    model = Llama(tiny_config(**kw)).eval()
    hf = hf_twin(model)
    assert set(hf.state_dict()) == set(model.state_dict())
    x = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        ours, _ = model(x)
        theirs = hf(x).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_position_ids_give_the_logits_of_transformers_llama_at_those_positions():
    torch.manual_seed(2)
    model = Llama(tiny_config()).eval()
    hf = hf_twin(model)
    x = torch.randint(0, 300, (2, 20))
    # Uneven gaps, a different pattern per row: RoPE sees only position differences, so a
    # constant offset would leave the logits unchanged and test nothing.
    pos = torch.cumsum(torch.randint(1, 3, (2, 20)), dim=1)
    with torch.no_grad():
        ours, _ = model(x, position_ids=pos)
        # An explicit all-ones mask keeps transformers from reading the gaps as packed sequences.
        theirs = hf(x, position_ids=pos, attention_mask=torch.ones_like(x)).logits
        default, _ = model(x)
        explicit, _ = model(x, position_ids=torch.arange(20).expand(2, 20))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(explicit, default)
    assert not torch.allclose(ours, default, atol=1e-3)


def test_loss_equals_transformers_shifted_loss():
    torch.manual_seed(1)
    model = Llama(tiny_config()).eval()
    hf = hf_twin(model)
    x = torch.randint(0, 300, (2, 33))
    with torch.no_grad():
        _, ours = model(x[:, :-1], x[:, 1:])
        theirs = hf(x, labels=x).loss  # transformers shifts the labels itself
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_output_shapes_and_parameter_names():
    model = Llama(tiny_config())
    logits, loss = model(torch.randint(0, 300, (3, 10)))
    assert logits.shape == (3, 10, 300) and loss is None
    names = set(model.state_dict())
    assert {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
            "model.layers.2.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight"} <= names
    assert not any("rope" in n for n in names)


def test_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    model = Llama(tiny_config()).eval()
    x = torch.randint(0, 300, (1, 20))
    y = x.clone()
    y[0, 12:] = torch.randint(0, 300, (8,))
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(y)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_kv_cache_decoding_equals_full_recomputation():
    torch.manual_seed(0)
    model = Llama(tiny_config()).eval()
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        full, _ = model(x)
        cache = model.new_cache(2, 24)
        steps = [model(x[:, :10], cache=cache)[0]]           # prefill
        steps.append(model(x[:, 10:15], cache=cache)[0])     # a chunk after a prefix
        for t in range(15, 24):                               # one token at a time
            steps.append(model(x[:, t:t + 1], cache=cache)[0])
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = Llama(tiny_config())
    x = torch.randint(0, 300, (2, 17))
    _, loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing = True
    _, loss2 = model(x[:, :-1], x[:, 1:])
    loss2.backward()
    for g, p in zip(plain, model.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_bf16_autocast_keeps_rope_and_norm_in_fp32_and_stays_close():
    torch.manual_seed(0)
    model = Llama(tiny_config()).eval()
    x = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        ref, _ = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, _ = model(x)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rope_tables_stay_fp32_when_the_weights_move_to_half_precision(dtype):
    """bf16-true training and half-precision loading convert the whole model; the rotation
    tables must keep their fp32 values (apply_rope rotates in fp32 for far positions' angles)."""
    model = Llama(tiny_config())
    cos, sin = model.rope_cos.clone(), model.rope_sin.clone()
    model.to(dtype)
    assert model.lm_head.weight.dtype == dtype
    assert model.rope_cos.dtype == model.rope_sin.dtype == torch.float32
    assert torch.equal(model.rope_cos, cos) and torch.equal(model.rope_sin, sin)
    assert "rope_cos" not in model.state_dict()  # still a non-persistent buffer


def test_ignored_targets_do_not_count_in_the_loss():
    torch.manual_seed(0)
    model = Llama(tiny_config())
    x = torch.randint(0, 300, (1, 9))
    y = x[:, 1:].clone()
    masked = y.clone()
    masked[:, :4] = -100
    logits, full = model(x[:, :-1], y)
    _, part = model(x[:, :-1], masked)
    expected = torch.nn.functional.cross_entropy(logits[0, 4:], y[0, 4:])
    torch.testing.assert_close(part, expected)
    assert not torch.allclose(part, full)


@pytest.mark.parametrize("kw, message", [
    ({"hidden_size": 66, "num_attention_heads": 4}, "must divide model.hidden_size"),
    ({"num_key_value_heads": 3}, "must divide model.num_attention_heads"),
    ({"vocab_size": 0}, "vocab_size must be positive"),
])
def test_impossible_configs_are_refused_with_a_reason(kw, message):
    assert any(message in p for p in tiny_config(**kw).problems())
    with pytest.raises(ValueError, match=message.split()[0]):
        Llama(tiny_config(**kw))


def test_context_overflow_is_an_error():
    model = Llama(tiny_config())
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, 65, dtype=torch.long))
