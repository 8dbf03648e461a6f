"""transformers' LLaVA format for image-text runs, both ways.

Export writes what `LlavaForConditionalGeneration.from_pretrained` and
`AutoProcessor.from_pretrained` open offline with no custom code:

    config.json               model_type llava: text_config (LlamaConfig, as the Llama export
                              writes it), vision_config (siglip_vision_model, no pooling head),
                              image_token_index, image_seq_length (K), vision_feature_layer,
                              vision_feature_select_strategy "full" (SigLIP has no CLS token)
    model.safetensors         our state dict as it is: its names are the on-disk layout of
                              transformers' LLaVA checkpoints (`language_model.model.*`,
                              `vision_tower.*`, `multi_modal_projector.*`); a tied LM head is
                              stored once, under the embedding, as transformers does
    generation_config.json    our chat decoding defaults
    tokenizer.json, tokenizer_config.json   the run's tokenizer and chat template; encoding
                              adds no BOS, because the model only ever read chat prompts,
                              which start without one: `processor(text=prompt, images=...)`
                              and `processor.apply_chat_template(...)` give our ids
    preprocessor_config.json  SigLIP's image processor with our image size, mean and std
                              (bicubic resize, 1/255 rescale, normalise: data/images.py)
    processor_config.json     LlavaProcessor: `<|image|>` expanded to K = (S / patch)² copies
    chat_template.jinja       the chat template again, where the processor reads it

What transformers' LLaVA cannot express is refused (pixel shuffle > 1). Import reads such a
directory (a SigLIP tower, "full" feature selection, a Llama language model; a checkpoint in
either transformers' old `language_model.model.*` or newer `model.language_model.*` layout)
into an `instruct` run. tests/test_llava_export.py runs both against transformers.

Sources: transformers' `LlavaConfig`, `LlavaProcessor`, `SiglipImageProcessor`; Liu et al.
2023 (LLaVA-1.5).
"""

from __future__ import annotations

from pathlib import Path

import torch

from babyllama.atomic import atomic_write_text
from babyllama.config import RunConfig, VisionSection
from babyllama.errors import UserError
from babyllama.export.hf import (HF_DTYPES, generation_defaults, hf_config, write_safetensors,
                                 read_hf_state, write_json, write_tokenizer_files)
from babyllama.infer.images import IMAGE_PLACEHOLDER
from babyllama.model import families
from babyllama.model.llama import ModelConfig
from babyllama.model.vision import VisionConfig
from babyllama.model.vlm import PROJECTOR_ACTIVATIONS, VisionLanguageModel, VLMConfig
from babyllama.model.weights import load_state
from babyllama.run import SIGLIP_CONFIG_KEYS, Run
from babyllama.textfile import read_json_object
from babyllama.tokenizer import Tokenizer
from babyllama.tokenizer.tokenizer import CHAT_TEMPLATE_FILE

PREPROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"
# The name transformers itself saves. transformers 4 opens it as its (PIL) SigLIP processor;
# transformers 5 picks the backend when loading: PIL (`SiglipImageProcessorPil`, the one
# data/images.py reproduces to 1e-6) without torchvision, or with `backend="pil"`; the
# torchvision one otherwise (its bicubic resize differs slightly from PIL's).
IMAGE_PROCESSOR_CLASS = "SiglipImageProcessor"
PIL_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, as transformers' configs store `resample`
VISION_MODEL_TYPE = "siglip_vision_model"


# ----------------------------------------------------------------------------------------
# Export


def check_llava_exportable(vlm: VLMConfig, where: str | Path) -> None:
    """Raise UserError (naming `where`) for an image side transformers' LLaVA cannot express."""
    if vlm.pixel_shuffle > 1:
        raise UserError(f"{where}: transformers' LLaVA has no pixel shuffle (vlm.pixel_shuffle="
                        f"{vlm.pixel_shuffle}); train with vlm.pixel_shuffle=1 to export")


def siglip_config(v: VisionConfig, dtype: torch.dtype = torch.float32) -> dict:
    """`SiglipVisionConfig` of the encoder; `vision_use_head` false (LLaVA reads patches)."""
    name = str(dtype).removeprefix("torch.")
    return {"model_type": VISION_MODEL_TYPE, **{k: getattr(v, k) for k in SIGLIP_CONFIG_KEYS},
            "vision_use_head": False, "dtype": name, "torch_dtype": name}


def llava_config(model: VisionLanguageModel, tokenizer: Tokenizer, dtype: torch.dtype = torch.float32) -> dict:
    """config.json for `LlavaForConditionalGeneration`."""
    c = model.vlm_config
    text = hf_config(model.config, tokenizer, dtype)
    del text["architectures"]
    layers = c.feature_layers[0] if len(c.feature_layers) == 1 else list(c.feature_layers)
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "text_config": text,
        "vision_config": siglip_config(c.vision, dtype),
        "image_token_index": c.image_token_id,
        "image_seq_length": c.image_tokens,
        "vision_feature_layer": layers,
        "vision_feature_select_strategy": "full",   # every patch: SigLIP has no CLS to drop
        "projector_hidden_act": c.projector_hidden_act,
        "multimodal_projector_bias": True,
        # Also at the top level: transformers' LLaVA ties the head by its own flag.
        "tie_word_embeddings": model.config.tie_word_embeddings,
        "dtype": text["dtype"],
        "torch_dtype": text["dtype"],
    }


def image_processor_config(v: VisionConfig) -> dict:
    """preprocessor_config.json: SigLIP's image processor as data/images.py applies it."""
    return {
        "image_processor_type": IMAGE_PROCESSOR_CLASS,
        "processor_class": "LlavaProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"height": v.image_size, "width": v.image_size},
        "resample": PIL_BICUBIC,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(v.image_mean),
        "image_std": list(v.image_std),
    }


def processor_config(model: VisionLanguageModel, tokenizer: Tokenizer) -> dict:
    """processor_config.json: `LlavaProcessor` expands each image token of a prompt into
    (S / patch)² copies, our K (no pixel shuffle, no extra tokens)."""
    return {
        "processor_class": "LlavaProcessor",
        "patch_size": model.vlm_config.vision.patch_size,
        "vision_feature_select_strategy": "full",
        "image_token": tokenizer.special_tokens["image"],
        "num_additional_image_tokens": 0,
    }


def write_llava(model: VisionLanguageModel, tokenizer: Tokenizer, out: str | Path, dtype: str = "f32",
                chat: bool = True) -> list[str]:
    """The transformers LLaVA directory `out` for the image-text `model` (module docstring).
    Returns the tokenizer's warnings. Raises UserError for what LLaVA cannot express."""

    if dtype not in HF_DTYPES:
        raise UserError(f"--dtype {dtype}: the transformers format takes {', '.join(HF_DTYPES)}")
    c = model.vlm_config
    check_llava_exportable(c, out)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise UserError(f"the model has {model.config.vocab_size} token embeddings but the "
                        f"tokenizer {tokenizer.vocab_size} tokens")
    image = tokenizer.special_tokens.get("image")
    if image is None or tokenizer.token_to_id(image) != c.image_token_id:
        raise UserError(f"the model's image token id {c.image_token_id} is not the tokenizer's "
                        f"image token ({image!r}: {tokenizer.token_to_id(image) if image else None})")
    out = Path(out)
    torch_dtype = HF_DTYPES[dtype]
    write_safetensors(model, out, torch_dtype)
    write_json(out / "config.json", llava_config(model, tokenizer, torch_dtype))
    write_json(out / "generation_config.json", generation_defaults(tokenizer, chat))
    warnings = write_tokenizer_files(tokenizer, out, model.config.max_position_embeddings, bos=False)
    write_json(out / PREPROCESSOR_FILE, image_processor_config(c.vision))
    write_json(out / PROCESSOR_FILE, processor_config(model, tokenizer))
    if tokenizer.chat_template:  # where transformers 5 reads a processor's template from
        atomic_write_text(out / CHAT_TEMPLATE_FILE, tokenizer.chat_template)
    return warnings


# ----------------------------------------------------------------------------------------
# Import

# transformers >= 4.52 saves LLaVA under its in-memory names; ours are the older on-disk ones.
_RENAMES = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
            ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."))


def llava_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LLaVA checkpoint's tensors under our names: either layout, a SigLIP tower saved as
    `vision_tower.vision_model.*` (transformers 4) or `vision_tower.*`, without the pooling head."""
    out = {}
    for key, value in state.items():
        for new, old in _RENAMES:
            if key.startswith(new):
                key = old + key[len(new):]
                break
        if key.startswith("vision_tower.vision_model."):
            key = "vision_tower." + key[len("vision_tower.vision_model."):]
        if key.startswith("vision_tower.head.") or key.endswith(("position_ids", "rotary_emb.inv_freq")):
            continue
        out[key] = value
    return out


def read_llava_config(path: Path, processor: dict) -> tuple[ModelConfig, VLMConfig]:
    """Our (text, image) configs from a LLaVA config.json at `path` (and the image mean/std of
    its preprocessor config `processor`). Raises UserError for what our model cannot be."""
    d = read_json_object(path, "config.json")
    text, vision = d.get("text_config") or {}, d.get("vision_config") or {}
    # LlavaConfig's defaults where a key is absent: a CLIP tower, the "default" strategy.
    kind = vision.get("model_type", "clip_vision_model")
    if kind != VISION_MODEL_TYPE:
        raise UserError(f"{path}: vision_config model_type {kind}: only SigLIP encoders load "
                        f"({VISION_MODEL_TYPE})")
    strategy = d.get("vision_feature_select_strategy", "default")
    if strategy != "full":
        raise UserError(f"{path}: vision_feature_select_strategy {strategy!r} drops the first patch "
                        "(a CLIP CLS token); only \"full\" loads")
    if text.get("model_type", "llama") != "llama":
        raise UserError(f"{path}: text_config model_type {text.get('model_type')!r}; only Llama "
                        "language models load")
    problems = []
    if not d.get("multimodal_projector_bias", True):
        problems.append("multimodal_projector_bias false (our projector has biases)")
    act = d.get("projector_hidden_act", "gelu")
    if act not in PROJECTOR_ACTIVATIONS:
        problems.append(f"projector_hidden_act {act!r} (ours: {', '.join(PROJECTOR_ACTIVATIONS)})")
    for key in ("image_size", "patch_size"):
        if isinstance(vision.get(key), (list, tuple)):
            problems.append(f"non-square vision_config {key} {vision[key]}")
    # Our pixels are always data/images.py's: RGB, bicubic resize to image_size, 1/255, normalise.
    if processor.get("resample", PIL_BICUBIC) != PIL_BICUBIC:
        problems.append(f"image processor resample {processor['resample']} (ours: bicubic, {PIL_BICUBIC})")
    for key in ("do_resize", "do_rescale", "do_normalize"):
        if processor.get(key) is False:
            problems.append(f"image processor {key} false")
    size = processor.get("size") or {}
    side = vision.get("image_size")
    if isinstance(size, dict) and side and any(size.get(k, side) != side for k in ("height", "width")):
        problems.append(f"image processor size {size} is not the encoder's image_size {side}")
    if problems:
        raise UserError(f"{path}: cannot import: " + "; ".join(problems))
    config, _ = families.model_config({"model_type": "llama", **text}, f"{path} (text_config)")
    # transformers ties the head when either the LLaVA or its text config says so.
    config.tie_word_embeddings = bool(d.get("tie_word_embeddings") or text.get("tie_word_embeddings"))
    v = VisionConfig(**{k: vision[k] for k in SIGLIP_CONFIG_KEYS if k in vision})
    v.image_mean = list(processor.get("image_mean", v.image_mean))
    v.image_std = list(processor.get("image_std", v.image_std))
    layers = d.get("vision_feature_layer", -2)
    vlm = VLMConfig(vision=v, feature_layers=list(layers) if isinstance(layers, (list, tuple)) else [layers],
                    projector_hidden_act=act, image_token_id=d.get("image_token_index", d.get("image_token_id", -1)))
    problems = config.problems() + vlm.problems()
    if problems:
        raise UserError(f"{path}: " + "; ".join(problems))
    return config, vlm


def image_tokenizer(src: Path, image_id: int) -> Tokenizer:
    """The tokenizer of `src`, whose `<|image|>` must be token `image_id`: every prompt
    babyllama builds (chat, serve, training data) marks a picture with that text, so a LLaVA
    whose image token is another (llava-hf's `<image>`) is refused rather than renamed."""
    tokenizer = Tokenizer.load(src)
    if tokenizer.token_to_id(IMAGE_PLACEHOLDER) != image_id:
        text = {i: t for t, i in tokenizer.control_tokens.items()}.get(image_id)
        raise UserError(f"{src}: the image token (image_token_index {image_id}, "
                        f"{repr(text) if text else 'not a special token'}) is not {IMAGE_PLACEHOLDER}; "
                        f"babyllama marks images with {IMAGE_PLACEHOLDER} and loads only such LLaVA checkpoints")
    return tokenizer


def image_processor_settings(src: Path) -> dict:
    """The image processor's settings in `src`: preprocessor_config.json, or the
    `image_processor` entry of processor_config.json (where transformers 5 saves them);
    {} without either."""
    if (src / PREPROCESSOR_FILE).is_file():
        return read_json_object(src / PREPROCESSOR_FILE, PREPROCESSOR_FILE)
    if (src / PROCESSOR_FILE).is_file():
        inner = read_json_object(src / PROCESSOR_FILE, PROCESSOR_FILE).get("image_processor")
        return inner if isinstance(inner, dict) else {}
    return {}


def import_llava(src: str | Path, out: str | Path) -> Path:
    """An image-text run (`stage: instruct`; config.yaml with its `vlm:` section,
    model.safetensors in fp32, tokenizer/) from the transformers LLaVA directory `src`."""
    src, run = Path(src), Run(out)
    if not (src / "config.json").is_file():
        raise UserError(f"{src}: not a transformers directory (no config.json)")
    run.refuse_nonempty()
    processor = image_processor_settings(src)
    config, vlm = read_llava_config(src / "config.json", processor)
    tokenizer = image_tokenizer(src, vlm.image_token_id)
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"{src}: the tokenizer has {tokenizer.vocab_size} tokens but the model "
                        f"only {config.vocab_size} embeddings")
    model = VisionLanguageModel(config, vlm)
    state = {k: v.float() for k, v in llava_state(read_hf_state(src)).items()}
    load_state(model, state, src)
    cfg = RunConfig(model=config, stage="instruct", preset=f"imported from {src}",
                    vlm=VisionSection(**vars(vlm)))
    run.write_plain_run(model, tokenizer, cfg)
    return run.path
