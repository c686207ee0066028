"""Registry entries against the configs they stand for."""

import pytest

from mixpert_train.backbones import REGISTRY, get_backbone
from mixpert_train.families.llava_ov import backbone_from_llava_config
from mixpert_train.errors import MixpertError

# llava-hf/llava-onevision-qwen2-7b-ov-hf config.json (the fields that matter), as published
LLAVA_OV_7B = {
    "model_type": "llava_onevision", "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
    "projector_hidden_act": "gelu", "vision_aspect_ratio": "anyres_max_9",
    "text_config": {"model_type": "qwen2", "hidden_size": 3584},
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "image_size": 384,
                      "intermediate_size": 4304, "num_attention_heads": 16, "num_hidden_layers": 26,
                      "patch_size": 14, "vision_use_head": False},
    "image_grid_pinpoints": [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)],
}


def test_llava_ov_7b_entry_is_what_its_config_says():
    bb = get_backbone("llava-ov-7b")
    from_cfg = backbone_from_llava_config(LLAVA_OV_7B, name="llava-ov-7b", base=bb)
    assert from_cfg.to_dict() == bb.to_dict()
    assert (bb.layers_in_use, bb.tokens_per_crop, bb.hidden_size, bb.llm_hidden_size) == (26, 729, 1152, 3584)
    assert bb.max_crops == 10 and bb.expert_layers == 2


def test_entries_round_trip():
    for bb in REGISTRY.values():
        assert type(bb).from_dict(bb.to_dict()) == bb


def test_unknown_backbone_lists_the_choices():
    with pytest.raises(MixpertError, match="internvl2-8b, internvl3-8b, internvl3.5-8b, llava-ov-7b, qwen2-vl-7b, "
                                           "qwen2.5-vl-7b, qwen3-vl-8b, tiny"):
        get_backbone("qwen9-vl")


# Qwen/Qwen2-VL-7B-Instruct config.json (the fields that matter, in its original layout: the text sizes at the top
# level, in_chans), as the model card's config lists them (no hub here to re-read it)
QWEN2_VL_7B = {
    "model_type": "qwen2_vl", "hidden_size": 3584, "image_token_id": 151655,
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                      "temporal_patch_size": 2},
}


# Qwen/Qwen2.5-VL-7B-Instruct config.json (the fields that matter, its published layout: text sizes at the top level,
# in_chans; hidden_size is the tower's width, out_hidden_size the merger's), as the model card's config lists them
QWEN2_5_VL_7B = {
    "model_type": "qwen2_5_vl", "hidden_size": 3584, "image_token_id": 151655,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
}


# Qwen/Qwen3-VL-8B-Instruct config.json (the fields that matter; text sizes in text_config), as its model card's config
# lists them
QWEN3_VL_8B = {
    "model_type": "qwen3_vl", "image_token_id": 151655, "text_config": {"model_type": "qwen3_vl_text", "hidden_size": 4096},
    "vision_config": {"model_type": "qwen3_vl", "depth": 27, "hidden_act": "gelu_pytorch_tanh", "hidden_size": 1152,
                      "intermediate_size": 4304, "in_channels": 3, "num_heads": 16, "num_position_embeddings": 2304,
                      "out_hidden_size": 4096, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                      "deepstack_visual_indexes": [8, 16, 24], "initializer_range": 0.02},
}
# its preprocessor_config.json (Qwen2VLImageProcessorFast with 16 px patches, mean / std 0.5)
QWEN3_VL_PROCESSOR = {"image_processor_type": "Qwen2VLImageProcessorFast", "patch_size": 16, "temporal_patch_size": 2,
                      "merge_size": 2, "size": {"shortest_edge": 65536, "longest_edge": 16777216},
                      "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


def test_qwen3_vl_8b_entry_is_what_its_config_and_processor_say():
    from mixpert_train.families import adapter_for_config

    bb = get_backbone("qwen3-vl-8b")
    ad = adapter_for_config(QWEN3_VL_8B, "config.json")
    for processor in (None, QWEN3_VL_PROCESSOR):
        got = ad.backbone_from_config(QWEN3_VL_8B, "qwen3-vl-8b", bb, "config.json", processor, "preprocessor_config.json")
        assert got.replace(processor=None).to_dict() == bb.to_dict()
    assert (bb.layers_in_use, bb.hidden_size, bb.llm_hidden_size, bb.max_crops) == (27, 1152, 4096, 65536)
    assert ad.taps(bb) == (8, 16, 24)
    bad = dict(QWEN3_VL_8B, vision_config=dict(QWEN3_VL_8B["vision_config"], deepstack_visual_indexes=[8, 27]))
    with pytest.raises(MixpertError, match=r"deepstack_visual_indexes \[27\] outside the 27 blocks") as e:
        ad.backbone_from_config(bad, "x", None, "config.json", None, None)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("entry, config", [("qwen2-vl-7b", QWEN2_VL_7B), ("qwen2.5-vl-7b", QWEN2_5_VL_7B)])
def test_qwen_vl_7b_entries_are_what_their_configs_say(entry, config):
    from mixpert_train.families import adapter_for_config

    bb = get_backbone(entry)
    from_cfg = adapter_for_config(config, "config.json").backbone_from_config(config, entry, bb, "config.json", None, None)
    assert from_cfg.to_dict() == bb.to_dict()
    assert (bb.layers_in_use, bb.hidden_size, bb.llm_hidden_size, bb.domains) == (32, 1280, 3584, ("chart", "doc", "general"))


def test_qwen2_5_vl_windows_must_be_whole_merge_units():
    from mixpert_train.families import adapter_for_config

    bad = dict(QWEN2_5_VL_7B, vision_config=dict(QWEN2_5_VL_7B["vision_config"], window_size=100))
    with pytest.raises(MixpertError, match="window_size 100 is not a whole number of merge units") as e:
        adapter_for_config(bad, "config.json").backbone_from_config(bad, "x", None, "config.json", None, None)
    assert "\n" not in str(e.value)


def test_other_tower_family_is_a_clear_error():
    cfg = dict(LLAVA_OV_7B, vision_config={"model_type": "intern_vit_6b"})
    with pytest.raises(MixpertError, match="no adapter"):
        backbone_from_llava_config(cfg, name="x")


# InternVL3-8B and InternVL3.5-8B (the fields that matter) in the two layouts a user may hold: the -hf config.json
# as transformers' convert_internvl_weights_to_hf.py writes it from the original (InternVLVisionConfig names; no
# vision_feature_layer / select strategy keys: transformers' defaults -1 / "default"; InternVL3's -hf configs still
# say image_token_index), and the original remote-code config.json (internvl_chat). Written from the published
# configs' values (no hub here to re-read them): InternViT-300M-448px-V2.5 for both, Qwen2.5-7B / Qwen3-8B.
_VIT_V25_HF = {"model_type": "internvl_vision", "attention_bias": True, "hidden_act": "gelu", "hidden_size": 1024,
               "image_size": [448, 448], "intermediate_size": 4096, "layer_norm_eps": 1e-06,
               "layer_scale_init_value": 0.1, "norm_type": "layer_norm", "num_attention_heads": 16,
               "num_hidden_layers": 24, "patch_size": [14, 14], "use_qk_norm": False,
               "use_absolute_position_embeddings": True}
_VIT_V25_ORIGINAL = {"model_type": "intern_vit_6b", "architectures": ["InternVisionModel"], "hidden_act": "gelu",
                     "hidden_size": 1024, "image_size": 448, "intermediate_size": 4096, "layer_norm_eps": 1e-06,
                     "norm_type": "layer_norm", "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14,
                     "qkv_bias": True, "qk_normalization": False, "initializer_factor": 0.1, "drop_path_rate": 0.0}
INTERNVL3 = {
    "internvl3-8b": ({"model_type": "internvl", "downsample_ratio": 0.5, "image_seq_length": 256,
                      "image_token_index": 151667, "projector_hidden_act": "gelu",
                      "text_config": {"model_type": "qwen2", "hidden_size": 3584}, "vision_config": _VIT_V25_HF},
                     {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584}),
    "internvl3.5-8b": ({"model_type": "internvl", "downsample_ratio": 0.5, "image_seq_length": 256,
                        "image_token_id": 151671, "projector_hidden_act": "gelu",
                        "text_config": {"model_type": "qwen3", "hidden_size": 4096, "head_dim": 128},
                        "vision_config": _VIT_V25_HF},
                       {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": 4096}),
}
# preprocessor_config.json of the -hf snapshots (GotOcr2, as the conversion's write_image_processor saves it)
INTERNVL3_PROCESSOR = {"image_processor_type": "GotOcr2ImageProcessorFast", "do_resize": True,
                       "size": {"height": 448, "width": 448}, "crop_to_patches": False, "min_patches": 1,
                       "max_patches": 12, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                       "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 3,
                       "do_convert_rgb": True}


@pytest.mark.parametrize("entry", sorted(INTERNVL3))
def test_internvl3_entries_are_what_their_configs_say(entry):
    """Both layouts of InternVL3-8B / InternVL3.5-8B give the registry entry (the -hf one with its own
    preprocessor_config.json), and the entry's vision side is InternVL2-8B's but for the projector's width."""
    from mixpert_train.families import adapter_for_config

    bb = get_backbone(entry)
    hf, llm = INTERNVL3[entry]
    original = {"model_type": "internvl_chat", "downsample_ratio": 0.5, "dynamic_image_size": True,
                "force_image_size": 448, "max_dynamic_patch": 12, "min_dynamic_patch": 1, "ps_version": "v2",
                "select_layer": -1, "template": "internvl2_5", "use_thumbnail": True, "llm_config": llm,
                "vision_config": _VIT_V25_ORIGINAL}
    for config, processor in ((hf, INTERNVL3_PROCESSOR), (hf, None), (original, None)):
        ad = adapter_for_config(config, "config.json")
        got = ad.backbone_from_config(config, entry, bb, "config.json", processor, "preprocessor_config.json")
        assert got.replace(processor=None).to_dict() == bb.to_dict(), (config["model_type"], processor is not None)
        if processor is not None or config is original:  # the snapshot's tiling: InternVLProcessor's call tiles
            assert got.processor["crop_to_patches"] and got.processor["max_patches"] == 12
    v2 = get_backbone("internvl2-8b")
    assert bb.vision == v2.vision and bb.llm_hidden_size == int(llm["hidden_size"])
    assert bb.replace(name=v2.name, llm_hidden_size=v2.llm_hidden_size) == v2
