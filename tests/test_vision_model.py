"""The image encoder and the image-text model against transformers' SigLIP and LLaVA."""

import pytest
import torch

from babyllama.model.llama import ModelConfig
from babyllama.model.vision import VisionConfig, VisionTransformer, load_siglip_state, pixel_shuffle
from babyllama.model.vlm import VisionLanguageModel, VLMConfig, expand_image_tokens, part_of

transformers = pytest.importorskip("transformers")

VISION = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                      image_size=32, patch_size=8)
TEXT = ModelConfig(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96)
IMAGE_ID = 12


def siglip_config(v: VisionConfig):
    return transformers.SiglipVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size,
        hidden_act=v.hidden_act, layer_norm_eps=v.layer_norm_eps, vision_use_head=False)


def randomized(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (LayerNorms and biases too), so a misplaced one shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


def test_vision_encoder_equals_transformers_siglip_on_copied_weights():
    ours = randomized(VisionTransformer(VISION)).eval()
    ref = transformers.SiglipVisionModel(siglip_config(VISION)).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = ref(pixels, output_hidden_states=True)
        torch.testing.assert_close(ours(pixels), out.last_hidden_state, atol=1e-5, rtol=1e-5)
        ours_states = ours.hidden_states(pixels)
        assert len(ours_states) == len(out.hidden_states) == VISION.num_hidden_layers + 1
        for a, b in zip(ours_states, out.hidden_states):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_siglip_checkpoints_of_both_layouts_load_into_the_encoder():
    ref = randomized(transformers.SiglipVisionModel(siglip_config(VISION)))
    v4_layout = {f"vision_model.{k}": v for k, v in ref.state_dict().items()}
    v4_layout["text_model.embeddings.token_embedding.weight"] = torch.zeros(3, 3)  # a whole SiglipModel
    v4_layout["logit_scale"] = torch.zeros(1)
    for state in (ref.state_dict(), v4_layout):
        ours = VisionTransformer(VISION)
        ours.load_state_dict(load_siglip_state(state), strict=True)
        torch.testing.assert_close(ours.embeddings.patch_embedding.weight, ref.embeddings.patch_embedding.weight)


def test_features_concatenate_the_chosen_layers_and_stop_early():
    model = VisionTransformer(VISION).eval()
    pixels = torch.randn(1, 3, 32, 32)
    states = model.hidden_states(pixels)
    torch.testing.assert_close(model.features(pixels, [1, -1]), torch.cat([states[1], states[-1]], -1))
    assert len(model.hidden_states(pixels, upto=1)) == 2


def test_pixel_shuffle_groups_neighbouring_patches():
    # A 4x4 grid whose feature is the patch's (row, col): block (0, 0) must hold (0,0), (0,1), (1,0), (1,1).
    grid = torch.tensor([[r, c] for r in range(4) for c in range(4)], dtype=torch.float).view(1, 16, 2)
    out = pixel_shuffle(grid, 2)
    assert out.shape == (1, 4, 8)
    assert out[0, 0].tolist() == [0, 0, 0, 1, 1, 0, 1, 1]
    assert out[0, 1].tolist() == [0, 2, 0, 3, 1, 2, 1, 3]
    with pytest.raises(ValueError, match="divisible"):
        pixel_shuffle(torch.zeros(1, 9, 2), 2)


def llava_reference(model: VisionLanguageModel):
    c = model.vlm_config
    config = transformers.LlavaConfig(
        vision_config=siglip_config(c.vision),
        text_config=transformers.LlamaConfig(
            vocab_size=TEXT.vocab_size, hidden_size=TEXT.hidden_size, intermediate_size=TEXT.intermediate_size,
            num_hidden_layers=TEXT.num_hidden_layers, num_attention_heads=TEXT.num_attention_heads,
            num_key_value_heads=TEXT.num_key_value_heads, max_position_embeddings=TEXT.max_position_embeddings,
            rms_norm_eps=TEXT.rms_norm_eps, rope_theta=TEXT.rope_theta, tie_word_embeddings=False),
        image_token_index=c.image_token_id, vision_feature_layer=c.feature_layers if len(c.feature_layers) > 1
        else c.feature_layers[0], vision_feature_select_strategy="full", image_seq_length=c.image_tokens,
        projector_hidden_act=c.projector_hidden_act, multimodal_projector_bias=True)
    ref = transformers.LlavaForConditionalGeneration(config).eval()
    # Our names are the on-disk layout of transformers' LLaVA checkpoints; in memory it nests
    # them under `model.` (the same mapping its from_pretrained applies).
    renames = {"language_model.model.": "model.language_model.", "language_model.lm_head.": "lm_head.",
               "vision_tower.": "model.vision_tower.", "multi_modal_projector.": "model.multi_modal_projector."}
    state = {}
    for k, v in model.state_dict().items():
        prefix = next(p for p in renames if k.startswith(p))
        state[renames[prefix] + k[len(prefix):]] = v
    ref.load_state_dict(state, strict=True)
    return ref


@pytest.mark.parametrize("layers", [[-1], [1, -1]])
def test_image_text_model_logits_equal_transformers_llava(layers):
    torch.manual_seed(0)
    model = randomized(VisionLanguageModel(TEXT, VLMConfig(vision=VISION, feature_layers=layers,
                                                           image_token_id=IMAGE_ID))).eval()
    ref = llava_reference(model)
    k = model.vlm_config.image_tokens
    rows = [expand_image_tokens([0, 40, IMAGE_ID, 41, 42, 43], IMAGE_ID, k),
            expand_image_tokens([0, IMAGE_ID, 50, 51, 52, 53], IMAGE_ID, k)]
    ids = torch.tensor(rows)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours, _ = model(ids, pixel_values=pixels)
        theirs = ref(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_image_positions_must_match_the_images_given():
    model = VisionLanguageModel(TEXT, VLMConfig(vision=VISION, image_token_id=IMAGE_ID))
    ids = torch.tensor([expand_image_tokens([0, IMAGE_ID, 5], IMAGE_ID, 3)])  # 3 positions, K is 16
    with pytest.raises(ValueError, match="3 image token positions for 1 image"):
        model(ids, pixel_values=torch.zeros(1, 3, 32, 32))


def test_text_without_images_is_the_language_model_alone():
    model = VisionLanguageModel(TEXT, VLMConfig(vision=VISION, image_token_id=IMAGE_ID)).eval()
    ids = torch.tensor([[0, 40, 41]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], model.language_model(ids)[0])


def test_parts_are_named_under_peft_prefixes_too():
    assert part_of("vision_tower.encoder.layers.0.mlp.fc1.weight") == "vision"
    assert part_of("base_model.model.multi_modal_projector.linear_1.weight") == "projector"
    assert part_of("base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_A.default.weight") \
        == "language"


def test_config_problems_name_the_setting():
    bad = VLMConfig(vision=VisionConfig(image_size=30, patch_size=8), feature_layers=[9], pixel_shuffle=3)
    assert any("patch_size (8) must divide vlm.vision.image_size (30)" in p for p in bad.problems())
    bad = VLMConfig(vision=VISION, feature_layers=[9], pixel_shuffle=3)
    text = " ".join(bad.problems())
    assert "vlm.feature_layers: 9 is not a layer" in text and "vlm.pixel_shuffle (3) must divide" in text
