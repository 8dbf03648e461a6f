"""Image-text training (align, instruct): examples, masks, freezing, LoRA, resume, bad input."""

import json

import pytest
import torch
from PIL import Image

from babyllama.data.llava import ImageConversation
from babyllama.errors import UserError
from babyllama.model.weights import read_weights
from babyllama.run import Run
from babyllama.train.vision import build_image_examples

from conftest import TINY_VISION, vision_stage


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (Run(run).metrics_file).read_text().splitlines()]


def picture(colour="red") -> Image.Image:
    return Image.new("RGB", (32, 32), colour)


def test_image_positions_and_the_prompt_are_never_targets(vision_run):
    run = Run(vision_run)
    tokenizer, c = run.load_tokenizer(), run.config().vlm
    conv = ImageConversation(picture(), [{"role": "user", "content": "<|image|>\n图中有几个图形？"},
                                         {"role": "assistant", "content": "3"}], "t:1")
    text_only = ImageConversation(None, [{"role": "user", "content": "你好"},
                                         {"role": "assistant", "content": "你好"}], "t:2")
    (ex, plain), stats = build_image_examples([conv, text_only], tokenizer, 200, image_token_id=c.image_token_id,
                                              image_tokens=c.image_tokens)
    at_image = ex.ids == c.image_token_id
    assert at_image.sum() == c.image_tokens == 16
    assert not ex.mask[at_image].any()
    first_target = int(ex.mask.argmax())
    assert first_target > int(at_image.nonzero()[0][-1])          # everything up to the answer is prompt
    assert tokenizer.decode(ex.ids[ex.mask].tolist()).startswith("3")
    assert not (plain.ids == c.image_token_id).any() and plain.image is None
    assert stats.examples == 2


def test_conversations_that_cannot_fit_their_image_are_dropped_and_counted(vision_run):
    run = Run(vision_run)
    tokenizer, c = run.load_tokenizer(), run.config().vlm
    two = ImageConversation(picture(), [{"role": "user", "content": "<|image|>\n一<|image|>"},
                                        {"role": "assistant", "content": "好"}], "t:1")
    long = ImageConversation(picture(), [{"role": "user", "content": "<|image|>\n" + "很长" * 40},
                                         {"role": "assistant", "content": "好"}], "t:2")
    ids = dict(image_token_id=c.image_token_id, image_tokens=c.image_tokens)
    examples, stats = build_image_examples([two], tokenizer, 200, **ids)
    assert examples == [] and "2 <|image|> tokens for 1 image(s)" in stats.summary()
    examples, stats = build_image_examples([long], tokenizer, 40, **ids)
    assert examples == [] and "longer than 40 tokens with its image" in stats.summary()


def test_both_stages_lower_the_held_out_loss(vision_run):
    align = Run(vision_run).base().path
    for run in (align, vision_run):
        val = [m["val_loss"] for m in metrics(run) if "val_loss" in m]
        assert val[-1] < val[0], (run, val)


def test_align_trains_only_the_projector(vision_base, vision_run):
    align = Run(vision_run).base()
    assert align.config().stage == "align"
    state = read_weights(align.weights_file)
    base = read_weights(Run(vision_base).weights_file)
    for k, v in base.items():  # the language model is the base's, bit for bit
        assert torch.equal(state[f"language_model.{k}"], v), k


def test_instruct_freezing_switches_leave_frozen_parts_bit_identical(vision_run, tmp_path):
    align = Run(vision_run).base().path
    out = vision_stage("instruct", align, tmp_path / "frozen", "train.max_steps=2", "vlm.freeze_vision=true",
                       "vlm.freeze_language=true")
    before, after = read_weights(Run(align).weights_file), read_weights(Run(out).weights_file)
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"multi_modal_projector"}


def test_every_part_frozen_is_refused(vision_run, tmp_path):
    with pytest.raises(UserError, match="every part is frozen"):
        vision_stage("instruct", Run(vision_run).base().path, tmp_path / "none", "vlm.freeze_vision=true",
                     "vlm.freeze_language=true", "vlm.freeze_projector=true")


def test_lora_instruct_adapts_the_language_model_only_and_merges(vision_run, tmp_path):
    align = Run(vision_run).base().path
    out = vision_stage("instruct", align, tmp_path / "lora", "train.max_steps=2", "lora.enabled=true",
                       "vlm.freeze_vision=true")
    run = Run(out)
    assert run.is_lora()
    adapter = read_weights(run.adapter_weights_file)
    lora_keys = [k for k in adapter if "lora_" in k]
    assert lora_keys and all(".language_model." in k for k in lora_keys)
    assert any("multi_modal_projector" in k for k in adapter)         # trained whole, saved with it
    assert not any("vision_tower" in k for k in adapter)
    merged = run.load_model()
    base = read_weights(Run(align).weights_file)
    state = merged.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items() if k.startswith("vision_tower."))
    assert not torch.equal(state["multi_modal_projector.linear_1.weight"], base["multi_modal_projector.linear_1.weight"])


def test_resume_continues_exactly(vision_run, tmp_path):
    # A constant rate: the schedule then does not depend on max_steps, so 2 steps + 2 resumed
    # steps must equal 4 steps bit for bit (batches are a function of the step alone).
    align = Run(vision_run).base().path
    fixed = ("train.schedule=constant", "train.warmup_steps=0", "train.save_every=2")
    straight = vision_stage("instruct", align, tmp_path / "straight", "train.max_steps=4", *fixed)
    half = vision_stage("instruct", align, tmp_path / "half", "train.max_steps=2", *fixed)
    from babyllama.config import resume_config
    from babyllama.train.vision import run_vision_stage

    run_vision_stage(resume_config(Run(half).config(), ["train.max_steps=4"], str(half)), resume=True)
    a, b = read_weights(Run(straight).weights_file), read_weights(Run(half).weights_file)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_image_longer_than_the_context_is_one_line(vision_base, tmp_path):
    with pytest.raises(UserError, match=r"an image takes 256 positions and train.seq_len is 256"):
        vision_stage("align", vision_base, tmp_path / "big", "vlm.vision.patch_size=2")


def test_missing_and_corrupt_images_are_counted_skips(vision_base, tmp_path, capsys):
    images = tmp_path / "img"
    images.mkdir()
    picture("blue").save(images / "ok.png")
    (images / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows = [{"image": name, "conversations": [{"from": "human", "value": "<image>\n描述这张图。"},
                                              {"from": "gpt", "value": "一张蓝色的图。"}]}
            for name in ["ok.png"] * 6 + ["missing.png", "bad.jpg"]]
    data = tmp_path / "llava.json"
    data.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    from babyllama.config import parse_overrides
    from babyllama.train.sft import sft_config
    from babyllama.train.vision import run_vision_stage

    values = parse_overrides(["train.batch_size=2", "train.max_steps=2", "sft.val_fraction=0", *TINY_VISION])
    values["sft"]["sources"] = [str(data)]
    values["vlm"]["images"] = str(images)
    values["out_dir"] = str(tmp_path / "run")
    run_vision_stage(sft_config(vision_base, values, stage="align"))
    out = capsys.readouterr().out
    assert "6 conversations" in out
    assert "missing.png" in out and "bad.jpg" in out


def test_vision_init_loads_a_siglip_checkpoint_and_keeps_it_frozen(vision_base, tmp_path):
    transformers = pytest.importorskip("transformers")
    siglip = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8, vision_use_head=True))
    siglip.save_pretrained(tmp_path / "siglip")
    align = vision_stage("align", vision_base, tmp_path / "align", "train.max_steps=2",
                         f"vlm.vision_init={tmp_path / 'siglip'}", "vlm.vision.image_size=32")
    run = Run(align)
    assert run.config().vlm.vision.num_hidden_layers == 2 and run.config().vlm.freeze_vision is True
    state = read_weights(run.weights_file)
    for k, v in siglip.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(state[f"vision_tower.{k}"], v), k
    instruct = vision_stage("instruct", align, tmp_path / "instruct", "train.max_steps=2")
    assert Run(instruct).config().vlm.freeze_vision is True    # a pretrained encoder stays frozen
    with pytest.raises(UserError, match="disagrees with the SigLIP checkpoint"):
        vision_stage("align", vision_base, tmp_path / "clash", f"vlm.vision_init={tmp_path / 'siglip'}",
                     "vlm.vision.patch_size=4")


def test_text_stages_refuse_an_image_text_base(vision_run, tmp_path):
    from babyllama.config import parse_overrides
    from babyllama.train.sft import run_sft, sft_config

    values = parse_overrides(["train.max_steps=1"])
    values["sft"] = {"sources": ["builtin:chatterbot-zh"]}
    values["out_dir"] = str(tmp_path / "sft")
    with pytest.raises(UserError, match="is an image-text run; fine-tune it further with `babyllama instruct`"):
        run_sft(sft_config(vision_run, values))


def test_a_word_for_a_list_of_layers_is_one_line():
    from babyllama.config import parse_overrides, resolve_config, load_config

    with pytest.raises(UserError, match="vlm.feature_layers must be int, got 'abc'"):
        resolve_config("align", base=load_config("demo-cpu"), base_dir="/b",
                       overrides=parse_overrides(["vlm.feature_layers=abc"]))
