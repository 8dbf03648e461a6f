"""LoRA adapters on our Llama, through peft, in peft's own file layout.

Our module names equal transformers' `LlamaForCausalLM` ones, so peft wraps the same layers it
would wrap on a transformers Llama and the adapter's keys are exactly those `save_pretrained`
writes (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, ...). An adapter saved
here therefore opens with `peft.PeftModel.from_pretrained` on the transformers form of the base,
and one trained with transformers + peft opens here.

We wrap with task_type=None (a plain `PeftModel`), whose forward passes arguments straight to
our `Llama.forward`; `PeftModelForCausalLM` would rename them to transformers' keywords
(`input_ids`, `attention_mask`, ...). The task type written to `adapter_config.json` is still
CAUSAL_LM, which is what transformers users load it as.

QLoRA (`quantize_base`) swaps the base's linear layers for bitsandbytes 4-bit NF4 ones before
LoRA is applied; peft then puts full-precision adapters on top of the quantized layers.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from babyllama.atomic import atomic_path, atomic_write_text
from babyllama.errors import UserError
from babyllama.textfile import read_json_object

# bitsandbytes >= 0.49 logs a warning when it is imported (by peft, or for QLoRA / AdamW8bit) on
# a CPU with AVX512-BF16: the optional `kernels` package for its CPU inference kernel is missing.
# We never use that kernel (see quantize_base), so the line is noise on every command.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Every linear layer of attention and MLP: the QLoRA paper found adapting all of them needed to
# match full fine-tuning; adapting only q/v (the original LoRA paper) learns much less.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_adapter_model(model) -> bool:
    """A peft-wrapped model: its checkpoints hold the adapter only (the base never changes)."""
    return hasattr(model, "peft_config")


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    include_embeddings: bool = False   # adds "embed_tokens" (a LoRA on the embedding table)
    include_lm_head: bool = False      # adds "lm_head" (untied models only, as embed_tokens)
    use_rslora: bool = False           # scale by alpha/sqrt(r) instead of alpha/r (Kalajdzievski 2023)
    use_dora: bool = False             # weight-decomposed LoRA (Liu et al. 2024)

    def targets(self) -> list[str]:
        out = list(self.target_modules)
        if self.include_embeddings and "embed_tokens" not in out:
            out.append("embed_tokens")
        if self.include_lm_head and "lm_head" not in out:
            out.append("lm_head")
        return out

    def problems(self) -> list[str]:
        """Every impossible value, as readable sentences (empty when the config is valid)."""
        out = []
        if not isinstance(self.r, int) or self.r <= 0:
            out.append(f"lora.r must be a positive integer, got {self.r}")
        if self.alpha <= 0:
            out.append(f"lora.alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets():
            out.append("lora.target_modules is empty")
        return out

    def to_peft(self, within: str = "", modules_to_save: list[str] | None = None):
        """peft's LoraConfig. `within`: adapt only the target layers under this module (an
        image-text model's "language_model", not its encoder, whose attention layers share
        the names q_proj/k_proj/v_proj): the targets become one regex over full module names,
        peft's other form of target_modules. `modules_to_save`: whole modules trained and saved
        with the adapter (peft's modules_to_save; an image-text model's projector)."""
        import peft

        targets = self.targets()
        if within:
            targets = rf"{re.escape(within)}\.(.*\.)?({'|'.join(map(re.escape, targets))})"
        return peft.LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
            target_modules=targets, use_rslora=self.use_rslora, use_dora=self.use_dora,
            bias="none", modules_to_save=modules_to_save or None)


def _require_peft():
    try:
        import peft
    except ImportError:
        raise UserError("LoRA needs peft: pip install 'babyllama[lora]'") from None
    return peft


def adaptable_names(model: nn.Module) -> list[str]:
    """Short names of the layers LoRA can adapt (Linear and Embedding), in model order."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) or _is_4bit(module):
            short = name.rsplit(".", 1)[-1]
            if short not in names:
                names.append(short)
    return names


def _matches(name: str, target: str) -> bool:
    # peft's rule for a name in a target list: the module's full name equals it or ends with
    # "." + it (peft.tuners.tuners_utils.check_target_module_exists).
    return name == target or name.endswith("." + target)


def _check_targets(model: nn.Module, targets: list[str]) -> None:
    # peft only fails when *no* target matches; a typo next to valid names would silently adapt
    # fewer layers than asked, so each name must match something.
    full = [n for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Embedding)) or _is_4bit(m)]
    for t in targets:
        if not any(_matches(n, t) for n in full):
            raise UserError(f"lora target module {t!r} matches no layer of the model; "
                            f"its layers are {', '.join(adaptable_names(model))}")


def _check_untied(model: nn.Module, targets: list[str], where: str) -> None:
    """Refuse an adapter on a layer whose weight is shared with another layer.

    A tied head and embedding are one tensor. While the adapter is separate only the adapted
    layer sees its delta, but merging writes the delta into the shared tensor, so the other
    layer changes too and the merged model no longer computes what was trained (peft#2018:
    merged logits off by ~15 on a tiny model). Every placement must merge exactly, so such a
    placement is refused before training, whatever option named the layer.
    """
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, (nn.Linear, nn.Embedding)) and isinstance(weight, torch.Tensor):
            owners.setdefault(id(weight), []).append(name)
    for names in owners.values():
        if len(names) < 2:
            continue
        for name in names:
            hit = next((t for t in targets if _matches(name, t)), None)
            if hit is not None:
                others = ", ".join(n for n in names if n != name)
                raise UserError(f"{where}: lora on {hit!r} needs untied embeddings: {name} shares "
                                f"its weight with {others} (model.tie_word_embeddings is true), "
                                "so merging the adapter would change both layers")


def apply_lora(model: nn.Module, cfg: LoraConfig, within: str = "", modules_to_save: list[str] | None = None):
    """Wrap `model` (our Llama, possibly quantized by `quantize_base`, or an image-text model)
    with fresh LoRA adapters; `within` and `modules_to_save` as `LoraConfig.to_peft`.

    Base weights are frozen; the adapters (and DoRA magnitudes, and copies of the modules to
    save) are the only trainable parameters. B starts at zero, so the wrapped model first
    computes exactly the base's logits.
    """
    peft = _require_peft()
    problems = cfg.problems()
    if problems:
        raise UserError("; ".join(problems))
    _check_targets(model, cfg.targets())
    _check_untied(model, cfg.targets(), "lora config")
    training = model.training
    # New dropout layers start in training mode; keep the mode the caller had set.
    return peft.get_peft_model(model, cfg.to_peft(within, modules_to_save)).train(training)


def trainable_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; shared (tied) tensors count once, 4-bit weights as their
    number of original elements."""
    trainable = total = 0
    for p in model.parameters():  # parameters() already yields a shared tensor once
        n = p.numel()
        if hasattr(p, "quant_state") and p.quant_state is not None:
            n = p.quant_state.shape.numel()  # packed NF4 stores two weights per byte
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def adapter_state(model, adapter_name: str = "default", state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's saved names (no adapter name, no base weights), taken
    from `model` or from `state_dict` (the wrapped model's state, e.g. gathered from shards)."""
    from peft import get_peft_model_state_dict

    # save_embedding_layers=False: peft would otherwise store the whole embedding table next to
    # an embedding LoRA (for resized vocabularies); ours never resizes, so the base has it.
    state = get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=adapter_name,
                                      save_embedding_layers=False)
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_adapter(model, directory: str | Path, base_dir: str | Path | None = None,
                 state_dict: dict | None = None) -> None:
    """Write `adapter_config.json` and `adapter_model.safetensors` as peft's `save_pretrained`
    would, each atomically. `base_dir` (the base run) goes into base_model_name_or_path;
    `state_dict`: the wrapped model's state to take the adapter from (default: its own)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / ADAPTER_WEIGHTS) as tmp:
        save_file(adapter_state(model, state_dict=state_dict), str(tmp), metadata={"format": "pt"})
    config = model.peft_config["default"]
    d = config.to_dict()
    d["base_model_name_or_path"] = str(base_dir) if base_dir is not None else None
    d["task_type"] = "CAUSAL_LM"
    d["inference_mode"] = True  # what save_pretrained writes; loaders flip it for training
    # As PeftConfig.save_pretrained: sets become lists, keys sorted, indent 2.
    d = {k: sorted(v) if isinstance(v, set) else v for k, v in d.items()}
    atomic_write_text(directory / ADAPTER_CONFIG, json.dumps(d, indent=2, sort_keys=True))


def read_adapter_config(directory: str | Path) -> dict:
    path = Path(directory) / ADAPTER_CONFIG
    if not path.exists():
        raise UserError(f"{path}: no such file (not a LoRA adapter directory)")
    d = read_json_object(path)
    if d.get("peft_type") != "LORA":
        raise UserError(f"{path}: peft_type is {d.get('peft_type')!r}, only LORA adapters are supported")
    return d


def load_adapter(model: nn.Module, directory: str | Path, adapter_name: str = "default"):
    """Our base Llama + a saved adapter directory -> the wrapped model with the adapter's weights.

    Every tensor is checked against the base first: a missing key, a key naming no layer of the
    base, or a wrong shape is a one-line UserError naming the first bad key.
    """
    peft = _require_peft()
    from safetensors.torch import load_file

    directory = Path(directory)
    d = read_adapter_config(directory)
    cfg_path = directory / ADAPTER_CONFIG
    # What peft's LoraConfig.from_pretrained does, from the dict we read (its own json.load
    # would refuse a BOM): runtime-only settings dropped, then the class for peft_type.
    fields = {k: v for k, v in d.items() if k != "runtime_config"}
    try:
        peft_cfg = peft.LoraConfig.from_peft_type(**peft.LoraConfig.check_kwargs(**fields))
    except Exception as e:  # peft raises TypeError/ValueError for fields it does not know
        raise UserError(f"{cfg_path}: not a usable LoRA config ({e})") from None
    peft_cfg.task_type = None  # see the module docstring: our forward, not transformers'
    peft_cfg.inference_mode = False
    # The base is the model we were given; peft would otherwise warn that its (absent) name
    # differs from the path recorded at save time.
    peft_cfg.base_model_name_or_path = None
    targets = d.get("target_modules")
    if isinstance(targets, list):
        _check_targets(model, targets)
    saved = d.get("modules_to_save") if isinstance(d.get("modules_to_save"), list) else []
    if isinstance(targets, str):  # peft's other form: one regex, matched against full names
        targets = [n for n, _ in model.named_modules() if re.fullmatch(targets, n)]
    _check_untied(model, (targets if isinstance(targets, list) else []) + saved, str(cfg_path))
    weights = directory / ADAPTER_WEIGHTS
    try:
        state = load_file(str(weights))
    except FileNotFoundError:
        raise UserError(f"{weights}: no such file") from None
    except Exception as e:
        raise UserError(f"{weights}: not a readable safetensors file ({e})") from None
    training = model.training
    frozen = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        wrapped = peft.get_peft_model(model, peft_cfg, adapter_name=adapter_name).train(training)
    except ValueError as e:
        raise UserError(f"{cfg_path}: {str(e).splitlines()[0]}") from None
    try:
        _check_state(wrapped, state, weights, adapter_name)
    except UserError:
        # peft injected its layers into `model` in place: take them out again so the caller's
        # base is unchanged after a bad adapter.
        wrapped.unload()
        for n, p in model.named_parameters():
            p.requires_grad_(frozen[n])
        raise
    result = peft.set_peft_model_state_dict(wrapped, state, adapter_name=adapter_name)
    assert not result.unexpected_keys, result.unexpected_keys
    return wrapped


def _check_state(wrapped, state: dict, weights: Path, adapter_name: str = "default") -> None:
    expected = adapter_state(wrapped, adapter_name)
    for k in sorted(state):
        if k not in expected:
            raise UserError(f"{weights}: {k} names no adapter layer of the base model")
        if state[k].shape != expected[k].shape:
            raise UserError(f"{weights}: {k} has shape {tuple(state[k].shape)}, the base model "
                            f"needs {tuple(expected[k].shape)}")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UserError(f"{weights}: {missing[0]} is missing ({len(missing)} adapter tensors missing)")


def merge_lora(model) -> nn.Module:
    """Fold the adapter into the base weights and return the plain Llama (saveable with
    save_weights as a normal run). The wrapped model is consumed."""
    base = model.get_base_model()
    if any(_is_4bit(m) for m in base.modules()):
        # Merging into NF4 would requantize base + delta and lose the adapter's precision; the
        # caller loads the unquantized base, loads the adapter onto it, then merges.
        raise UserError("cannot merge into a 4-bit base: load the base in full precision, "
                        "load the adapter onto it, then merge")
    return model.merge_and_unload()


# --- QLoRA -----------------------------------------------------------------------------------

def _is_4bit(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit"


def quantize_base(model: nn.Module, compute_dtype: torch.dtype = torch.float32,
                  targets=DEFAULT_TARGETS) -> nn.Module:
    """Replace the base's linear layers named in `targets` by bitsandbytes 4-bit NF4 layers
    (with double quantization, as in the QLoRA paper), in place; returns the model.

    Embeddings, norms and the LM head stay in full precision. `compute_dtype` is the dtype the
    4-bit weights are dequantized to for each matmul, in training and inference alike, at any
    layer width.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError("QLoRA needs bitsandbytes: pip install 'babyllama[bnb]'") from None
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if not (isinstance(child, nn.Linear) and child_name in targets):
                continue
            device = child.weight.device
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, quant_type="nf4",
                                  compress_statistics=True, device="meta")
            # Params4bit quantizes when it is first moved to a device (CPU included).
            q.weight = bnb.nn.Params4bit(child.weight.data.float().cpu(), requires_grad=False,
                                         quant_type="nf4", compress_statistics=True,
                                         module=q).to(device)
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
            # bitsandbytes >= 0.48 switches a Linear4bit on a CPU with AVX512-BF16 to a repacked
            # bf16 kernel whenever it runs in eval mode without gradients (evaluation, samples,
            # chat during training). That kernel needs out_features divisible by 32 and
            # in_features by the 64-value block, so demo-cpu's 688-wide MLP and any width below
            # 64 fail ("N must be divisible by block_n", "shape '[32, 0]' is invalid"); where it
            # runs it computes in bf16, so evaluation would not see the model that trains. Every
            # layer keeps the dequantize-then-matmul path training uses, in compute_dtype.
            q.support_avx512bf16_for_cpu = False
            setattr(module, child_name, q)
    # The flag transformers sets on a 4-bit model: peft reads it to wrap these layers with its
    # bitsandbytes-aware LoRA layer (dequantizing for DoRA and merging) instead of a plain one.
    model.is_loaded_in_4bit = True
    return model
