"""An image-text run exported as transformers' LLaVA, and imported back.

transformers is the reference: `LlavaForConditionalGeneration` must give our logits and our
greedy tokens on the same picture and prompt, and `AutoProcessor` our ids and pixel values.
"""

import dataclasses
import json
import re
import shutil

import pytest
import torch

from babyllama.cli import main
from babyllama.data.images import ImageProcessing, pixel_values
from babyllama.data.shapes import shape_scenes
from babyllama.errors import UserError
from babyllama.export import export_run
from babyllama.export.hf import import_hf, write_hf
from babyllama.infer.config import GenerationConfig
from babyllama.infer.chat import chat_text
from babyllama.infer.generate import complete
from babyllama.infer.images import IMAGE_PLACEHOLDER, image_prompt
from babyllama.model.llama import ModelConfig
from babyllama.model.vision import VisionConfig
from babyllama.model.vlm import VisionLanguageModel, VLMConfig
from babyllama.run import Run
from babyllama.tokenizer.chat_template import encode_chat, render, stop_token_ids

transformers = pytest.importorskip("transformers")

MESSAGES = [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n图中有什么颜色的图形？"}]


@pytest.fixture(scope="module")
def exported(vision_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("llava") / "hf"
    assert main(["export", str(vision_run), "--format", "hf", "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def ours(vision_run):
    run = Run(vision_run)
    return run.load_model().eval(), run.load_tokenizer()


@pytest.fixture(scope="module")
def theirs(exported):
    return transformers.LlavaForConditionalGeneration.from_pretrained(exported).eval()


def picture():
    return shape_scenes("test", n=1, size=32)[0].image


def our_inputs(model, tok):
    """(expanded prompt ids, pixel values (1, 3, S, S)) as `babyllama chat` builds them."""
    v = model.vlm_config.vision
    pixels = pixel_values(picture(), ImageProcessing(v.image_size, tuple(v.image_mean), tuple(v.image_std)))
    ids = encode_chat(tok, MESSAGES, add_generation_prompt=True).ids
    return image_prompt(model, ids, [pixels])


def test_llava_export_gives_our_logits(ours, theirs, exported):
    model, tok = ours
    config = json.loads((exported / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "llava" and config["vision_config"]["model_type"] == "siglip_vision_model"
    assert config["image_token_index"] == tok.token_to_id("<|image|>") == theirs.config.image_token_id
    assert config["image_seq_length"] == model.vlm_config.image_tokens == 16
    ids, pixels = our_inputs(model, tok)
    with torch.no_grad():
        expected, _ = model(torch.tensor([ids]), pixel_values=pixels)
        got = theirs(input_ids=torch.tensor([ids]), pixel_values=pixels).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    if model.config.tie_word_embeddings:
        assert theirs.lm_head.weight.data_ptr() == theirs.model.language_model.embed_tokens.weight.data_ptr()


def test_autoprocessor_gives_our_ids_and_pixels(ours, exported):
    model, tok = ours
    # backend="pil": the image processor data/images.py reproduces (transformers 5 would pick
    # torchvision's where it is installed).
    processor = transformers.AutoProcessor.from_pretrained(exported, backend="pil")
    assert type(processor).__name__ == "LlavaProcessor"
    ids, pixels = our_inputs(model, tok)
    text, _ = render(tok.chat_template, MESSAGES, add_generation_prompt=True, special_tokens=tok.special_tokens)
    assert processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == text
    inputs = processor(images=picture(), text=text, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == ids
    torch.testing.assert_close(inputs["pixel_values"], pixels, atol=1e-6, rtol=0)


def test_greedy_generation_matches(ours, theirs):
    model, tok = ours
    ids, pixels = our_inputs(model, tok)
    cfg = GenerationConfig(max_new_tokens=8, temperature=0.0)
    mine = complete(model, tok, [ids], cfg, stop_token_ids(tok), pixel_values=pixels)[0]
    with torch.no_grad():
        out = theirs.generate(input_ids=torch.tensor([ids]), pixel_values=pixels, max_new_tokens=8,
                              do_sample=False, repetition_penalty=1.0)
    new = out[0, len(ids):].tolist()
    stops = set(stop_token_ids(tok))
    if new and new[-1] in stops:  # transformers keeps the stop token; ours reports it apart
        new = new[:-1]
    assert new == mine.ids and mine.ids
    assert chat_text(model, tok, MESSAGES, cfg, images=[pixels[0]]) == tok.decode(new).strip()


def test_import_of_the_export_is_the_same_run(ours, exported, tmp_path):
    model, tok = ours
    assert main(["import", str(exported), "-o", str(tmp_path / "run")]) == 0
    run = Run(tmp_path / "run")
    assert run.is_vision() and run.config().stage == "instruct"
    again = run.load_model().eval()
    image_side = [f.name for f in dataclasses.fields(VLMConfig)]  # not the training settings
    assert [getattr(again.vlm_config, k) for k in image_side] == [getattr(model.vlm_config, k) for k in image_side]
    assert again.config == model.config
    mine, back = model.state_dict(), again.state_dict()
    assert mine.keys() == back.keys()
    assert all(torch.equal(mine[k], back[k]) for k in mine)
    tok2 = run.load_tokenizer()
    assert tok2.special_tokens == tok.special_tokens and tok2.chat_template == tok.chat_template
    ids, pixels = our_inputs(model, tok)
    with torch.no_grad():
        torch.testing.assert_close(again(torch.tensor([ids]), pixel_values=pixels)[0],
                                   model(torch.tensor([ids]), pixel_values=pixels)[0], atol=0, rtol=0)


def test_import_reads_what_transformers_saves(ours, theirs, exported, tmp_path):
    # transformers writes its own (newer) key layout: model.language_model.*, lm_head.*
    model, _ = ours
    theirs.save_pretrained(tmp_path / "saved")
    processor = transformers.AutoProcessor.from_pretrained(exported)
    processor.image_processor.image_mean = [0.25, 0.5, 0.75]  # read back from where transformers saves it
    processor.save_pretrained(tmp_path / "saved")
    again = Run(import_hf(tmp_path / "saved", tmp_path / "run")).load_model()
    mine, back = model.state_dict(), again.state_dict()
    assert mine.keys() == back.keys() and all(torch.equal(mine[k], back[k]) for k in mine)
    assert again.vlm_config.vision.image_mean == [0.25, 0.5, 0.75]


def test_lora_image_text_run_exports_merged(vision_run, tmp_path):
    from conftest import vision_stage

    lora = vision_stage("instruct", Run(vision_run).base().path, tmp_path / "lora", "lora.enabled=true",
                        "train.max_steps=1", "train.eval_every=0", "train.sample_every=0")
    assert Run(lora).is_lora()
    export_run(lora, "hf", tmp_path / "hf", merge=True)
    merged = Run(lora).load_model().eval()
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    ids, pixels = our_inputs(merged, Run(lora).load_tokenizer())
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=torch.tensor([ids]), pixel_values=pixels).logits,
                                   merged(torch.tensor([ids]), pixel_values=pixels)[0], atol=1e-4, rtol=1e-4)


# -- refusals ---------------------------------------------------------------------------------


def test_pixel_shuffle_is_refused(vision_run, tmp_path, capsys):
    copy = tmp_path / "shuffled"
    shutil.copytree(vision_run, copy, ignore=shutil.ignore_patterns("resume"))
    cfg = Run(copy).config()
    cfg.vlm.pixel_shuffle = 2
    Run(copy).write_config(cfg)
    assert main(["export", str(copy), "--format", "hf", "-o", str(tmp_path / "out")]) == 2
    assert "transformers' LLaVA has no pixel shuffle" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    model = VisionLanguageModel(
        ModelConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=4, max_position_embeddings=64),
        VLMConfig(vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, image_size=32, patch_size=8),
                  pixel_shuffle=2, image_token_id=9))
    with pytest.raises(UserError, match="train with vlm.pixel_shuffle=1 to export"):
        write_hf(model, Run(vision_run).load_tokenizer(), tmp_path / "direct")


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_gguf_and_onnx_of_an_image_text_run_are_refused(vision_run, tmp_path, capsys, fmt):
    assert main(["export", str(vision_run), "--format", fmt, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "gguf/onnx export of an image-text model is not supported: use --format hf (LLaVA)" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("change, message", [
    ({"vision_config": {"model_type": "clip_vision_model"}},
     "vision_config model_type clip_vision_model: only SigLIP encoders load"),
    ({"vision_config": None}, "vision_config model_type clip_vision_model"),  # LlavaConfig's default
    ({"vision_feature_select_strategy": "default"}, "vision_feature_select_strategy 'default'"),
    ({"text_config": {"model_type": "qwen2"}}, "text_config model_type 'qwen2'; only Llama"),
    ({"multimodal_projector_bias": False}, "multimodal_projector_bias false"),
    ({"image_token_index": 10}, "the image token (image_token_index 10, '<|reserved_0|>') is not <|image|>"),
])
def test_import_refuses_what_our_model_cannot_be(exported, tmp_path, change, message):
    src = tmp_path / "src"
    shutil.copytree(exported, src)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    for key, value in change.items():
        if value is None:
            del config[key]
        elif isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = value
    (src / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(UserError, match=re.escape(message)) as e:
        import_hf(src, tmp_path / "run")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()
