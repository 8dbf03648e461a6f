"""ONNX export: one `model.onnx` that onnxruntime runs for the prompt and for every decoding step.

    write_onnx(model, "out/model.onnx")        -> the path (and model.onnx.data beside it if > 1.5 GB)
    OnnxLlama("out/model.onnx").greedy(ids, 20) -> new token ids, decoded with onnxruntime

Why a separate cache path. Our `KVCache` is preallocated and written in place, which suits a
Python decoding loop but not a graph: an ONNX decoder takes the keys and values so far as
inputs and returns them grown by the new tokens. `KeyValueLlama` below reuses the model's own
modules and functions (embeddings, norms, projections, `apply_rope` on the model's RoPE tables,
the MLP, the head) and only does the cache differently: `cat(past, new)` along the sequence
axis. Attention is the same `scaled_dot_product_attention` call with `enable_gqa` as
`Attention.forward`, so onnxruntime's logits equal ours to fp32 rounding.

Names. Inputs and outputs are those of optimum's and onnxruntime-genai's Llama decoders, so their
users know what to feed:

    input_ids                  int64    (batch, sequence)
    attention_mask             int64    (batch, past_sequence + sequence)   1 = token, 0 = padding
    position_ids               int64    (batch, sequence)
    past_key_values.{i}.key    float32  (batch, kv_heads, past_sequence, head_dim)   (and .value)
    logits                     float32  (batch, sequence, vocab)
    present.{i}.key            float32  (batch, kv_heads, past_sequence + sequence, head_dim)

The prompt is a step with an empty past (past_sequence = 0); each decoding step feeds the
previous step's `present.*` back as `past_key_values.*`.

Padding. Batched prompts are left-padded: `attention_mask` is 0 on pad slots, which no other
query attends to, and `position_ids` count each row's real tokens from 0 (cumsum(mask) - 1, as
transformers does), so a padded row computes what it would alone. The graph itself adds
causality (query i sits at key position past_sequence + i). A pad query may attend to itself,
as in our engine: with every key masked its softmax would be 0/0, and a NaN in a pad slot's
output becomes that slot's keys/values in the next layer, where 0 * NaN reaches every query.
(torch's translation of attention happens to zero such rows; the graph does not rely on it.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from babyllama.errors import UserError
from babyllama.infer.generate import eval_mode
from babyllama.model.llama import Llama, apply_rope

# The exporter's operator library starts at opset 18; older requests would go through a
# version converter that cannot convert every op.
MIN_OPSET = 18


def input_names(layers: int) -> list[str]:
    return ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def output_names(layers: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


class KeyValueLlama(nn.Module):
    """`model`'s forward with past keys/values in and present ones out (the exported graph)."""

    def __init__(self, model: Llama):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, past_key_values: list[torch.Tensor]):
        m = self.model
        mask = attention_allowed(attention_mask, input_ids.size(1))
        cos, sin = m.rope_at(0, input_ids.size(1), position_ids)  # (B, 1, T, head_dim)
        x = m.model.embed_tokens(input_ids)
        presents = []
        for i, layer in enumerate(m.model.layers):
            past = past_key_values[2 * i], past_key_values[2 * i + 1]
            y, k, v = attend(layer.self_attn, layer.input_layernorm(x), cos, sin, past, mask)
            x = x + y
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            presents += [k, v]
        return (m.lm_head(m.model.norm(x)), *presents)


def attention_allowed(attention_mask: torch.Tensor, new: int) -> torch.Tensor:
    """(B, 1, new, total) booleans: causal, no pad keys, except a query's own slot."""
    total = attention_mask.size(1)
    keys = torch.arange(total, device=attention_mask.device)
    # arange + offset, not keys[total - new:]: torch.export cannot size a slice it computes.
    queries = torch.arange(new, device=attention_mask.device) + (total - new)
    causal = keys[None, :] <= queries[:, None]
    itself = keys[None, :] == queries[:, None]
    return (causal & (attention_mask.bool()[:, None, :] | itself))[:, None]


def attend(attn, x, cos, sin, past, mask):
    """`Attention.forward` with the cache as concatenation: (output, keys, values)."""
    B, T, _ = x.shape
    q = attn.q_proj(x).view(B, T, attn.n_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                       enable_gqa=attn.n_kv_heads != attn.n_heads)
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, attn.n_heads * attn.head_dim)), k, v


def export_program(model: Llama, opset: int | None = None) -> torch.onnx.ONNXProgram:
    """The `torch.onnx.ONNXProgram` of `model` with past key/values, every length dynamic.

    The torch.export-based exporter (dynamo=True, torch's default) rather than the TorchScript
    one: both give correct graphs with dynamic batch, sequence and past lengths here (checked
    on torch 2.13), but the TorchScript exporter is deprecated, cannot translate
    `enable_gqa` (it would need the kv heads repeated, unlike `Attention.forward`), and its
    dynamic axes are names pasted on a trace of fixed sizes, while torch.export traces with
    symbolic sizes and fails where the code would specialise on one. It is slower (seconds
    instead of a fraction of one), which an export can afford.
    """
    from torch.export import Dim

    if opset is not None and opset < MIN_OPSET:
        raise UserError(f"ONNX opset {opset} is too old: the exporter needs {MIN_OPSET} or newer")
    if model.lm_head.weight.dtype != torch.float32:
        raise ValueError("export an fp32 model (load_export_source gives one): the graph's "
                         "past_key_values inputs are float32")
    c = model.config
    layers = c.num_hidden_layers
    # Example sizes above 1 (torch.export specialises sizes 0 and 1) and all different (no two
    # dims look alike). The graph then serves any size, an empty past included.
    batch, new, past = 2, 3, 5
    example = (torch.zeros(batch, new, dtype=torch.long),
               torch.ones(batch, past + new, dtype=torch.long),
               torch.arange(past, past + new).repeat(batch, 1),
               [torch.zeros(batch, c.kv_heads, past, c.head_size) for _ in range(2 * layers)])
    b, s, p = Dim("batch"), Dim("sequence"), Dim("past_sequence")
    # torch.export cannot declare a dim as the sum of two others; the mask gets its own, which
    # is renamed after export to the expression the present outputs carry.
    dynamic = ({0: b, 1: s}, {0: b, 1: Dim("total_sequence")}, {0: b, 1: s},
               [{0: b, 2: p}] * (2 * layers))
    with torch.no_grad(), eval_mode(model), quiet_exporter():
        program = torch.onnx.export(
            KeyValueLlama(model).eval(), example, dynamo=True, dynamic_shapes=dynamic,
            input_names=input_names(layers), output_names=output_names(layers),
            opset_version=opset, verbose=False)
    program.rename_axes({"total_sequence": "past_sequence + sequence"})
    # Each node carries the exporter's debugging notes, stack traces with this machine's paths
    # among them: not for a file people publish (and most of a small model's graph size).
    for node in program.model.graph:
        node.metadata_props.clear()
    program.model.metadata_props["babyllama.config"] = json.dumps(c.to_dict())
    return program


@contextlib.contextmanager
def quiet_exporter():
    """Silence the exporter's messages that say nothing about this model: torchvision ops it
    skips, and one notice per input that shares a dim name with another (which is the point)."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"# The axis name")
            warnings.filterwarnings("ignore", message=r".*LeafSpec", category=FutureWarning)
            yield
    finally:
        registration.setLevel(level)


def write_onnx(model: Llama, path: str | Path, opset: int | None = None, *,
               external_data: bool = False) -> Path:
    """Export `model` to `path` (a `model.onnx`), checked by onnx's checker, written atomically.

    A protobuf cannot exceed 2 GB, so past 1.5 GB of weights the exporter puts them in
    `<path>.data` beside the graph (onnxruntime finds it by itself); `external_data=True` does
    so whatever the size.
    """
    import onnx

    path = Path(path)
    program = export_program(model, opset)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The graph names its data file, so both are written under their final names into a
    # private folder beside `path`, checked there, then moved. Two files cannot be replaced
    # at once; moving the data first means a new graph never appears without its weights.
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    data = path.with_name(path.name + ".data")
    try:
        program.save(staging / path.name, external_data=external_data)
        onnx.checker.check_model(str(staging / path.name))  # by path: fine beyond 2 GB
        for written in staging.iterdir():
            fsync(written)
        split = (staging / data.name).exists()
        if split:
            os.replace(staging / data.name, data)
        os.replace(staging / path.name, path)
        if not split:
            data.unlink(missing_ok=True)  # a bigger earlier export's weights
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


class OnnxLlama:
    """An onnxruntime session on an exported `model.onnx`, with the loop a user would write."""

    def __init__(self, path: str | Path, threads: int | None = None,
                 providers: list[str] | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options,
                                            providers=providers or ["CPUExecutionProvider"])
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        self.past_names = [name for name in inputs if name.startswith("past_key_values.")]
        _, self.kv_heads, _, self.head_dim = inputs[self.past_names[0]]
        config = self.session.get_modelmeta().custom_metadata_map.get("babyllama.config")
        self.context = json.loads(config)["max_position_embeddings"] if config else None

    def run(self, input_ids, attention_mask, position_ids, past: list[np.ndarray]
            ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One forward: logits (B, T, vocab) and the present keys/values to feed back."""
        feed = {"input_ids": np.asarray(input_ids, dtype=np.int64),
                "attention_mask": np.asarray(attention_mask, dtype=np.int64),
                "position_ids": np.asarray(position_ids, dtype=np.int64),
                **dict(zip(self.past_names, past))}
        logits, *present = self.session.run(None, feed)
        return logits, present

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return [np.zeros(shape, dtype=np.float32) for _ in self.past_names]

    def logits(self, input_ids, attention_mask=None) -> np.ndarray:
        """Logits of a whole (left-padded) batch, (B, T, vocab)."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if attention_mask is None:
            attention_mask = np.ones_like(input_ids)
        attention_mask = np.asarray(attention_mask, dtype=np.int64)
        position_ids = np.maximum(attention_mask.cumsum(-1) - 1, 0)
        logits, _ = self.run(input_ids, attention_mask, position_ids, self.empty_past(len(input_ids)))
        return logits

    def greedy(self, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None = None
               ) -> list[int]:
        """Up to `max_new_tokens` argmax tokens after the prompt (stopping before `eos_id`)."""
        if not prompt_ids:
            raise UserError("the prompt is empty: give at least one token (e.g. the BOS token)")
        if self.context is not None:
            if len(prompt_ids) >= self.context:
                raise UserError(f"the prompt has {len(prompt_ids)} tokens; the model's context "
                                f"is {self.context}")
            max_new_tokens = min(max_new_tokens, self.context - len(prompt_ids))
        ids, past, out = np.array([prompt_ids]), self.empty_past(1), []
        for _ in range(max_new_tokens):
            seen, new = past[0].shape[2], ids.shape[1]
            positions = np.arange(seen, seen + new)[None]
            logits, past = self.run(ids, np.ones((1, seen + new)), positions, past)
            token = int(logits[0, -1].argmax())
            if token == eos_id:
                break
            out.append(token)
            ids = np.array([[token]])
        return out
