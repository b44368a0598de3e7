"""The LLaVA-Med v1.5 converter on a tiny fake checkpoint with the original key names."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hscr.errors import HSCRError
from hscr.models import load_vlm
from hscr.models.convert_llava_med import convert_llava_med, map_key

ROOT = Path(__file__).resolve().parents[1]
CORPUS = "[INST] is there a lesion in the left lung ? yes no [/INST] which organ is shown ? chest brain liver"
IMAGE_SIZE, PATCH_SIZE = 56, 14     # 16 patches, plus CLS
VISION_HIDDEN, TEXT_HIDDEN = 32, 48
ROPE_THETA = 1_000_000.0            # LLaVA-Med v1.5's value, not Mistral's default of 10000


def write_source_tokenizer(folder: Path) -> int:
    """Write a Mistral-like SentencePiece ``tokenizer.model`` without <image> or <pad>, as in the release.

    Returns the vocabulary size. Like the official checkpoint, the folder has no ``tokenizer.json``.
    """
    import sentencepiece

    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join([CORPUS] * 20), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=90, hard_vocab_limit=False,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2,
    )
    corpus.unlink()
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False,
    }))
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(folder)))


def build_original_checkpoint(root: Path, vision_hidden: int = VISION_HIDDEN, vision_heads: int = 2,
                              bundle_tower: bool = False) -> dict:
    """Write a tiny CLIP tower and a tiny llava_mistral checkpoint in two safetensors shards.

    With ``bundle_tower`` the CLIP weights are also stored in the checkpoint under LLaVA's
    ``model.vision_tower.vision_tower.vision_model.*`` names, with the ``position_ids`` buffer that
    transformers 4.3x saved, and ``mm_vision_tower`` names a tower that does not exist here.
    """
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel, MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    clip_dir = root / "clip"
    clip = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_hidden_layers=3,
        num_attention_heads=vision_heads,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
    )).eval()
    clip.save_pretrained(clip_dir)
    CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                          crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(clip_dir)

    src = root / "llava-med-v1.5"
    src.mkdir()
    source_vocab = write_source_tokenizer(src)
    text_config = MistralConfig(
        vocab_size=source_vocab, hidden_size=TEXT_HIDDEN, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=None,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, rope_theta=ROPE_THETA,
    )
    mistral = MistralForCausalLM(text_config).eval()
    projector = {
        "model.mm_projector.0.weight": torch.randn(TEXT_HIDDEN, vision_hidden) * 0.2,
        "model.mm_projector.0.bias": torch.randn(TEXT_HIDDEN) * 0.1,
        "model.mm_projector.2.weight": torch.randn(TEXT_HIDDEN, TEXT_HIDDEN) * 0.2,
        "model.mm_projector.2.bias": torch.randn(TEXT_HIDDEN) * 0.1,
    }
    state = {k: v.contiguous() for k, v in mistral.state_dict().items()}
    state.update(projector)
    if bundle_tower:
        for key, tensor in clip.state_dict().items():
            state["model.vision_tower.vision_tower.vision_model." + key.removeprefix("vision_model.")] = tensor
        state["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"] = \
            torch.arange((IMAGE_SIZE // PATCH_SIZE) ** 2 + 1).unsqueeze(0)
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    weight_map = {}
    for name, shard_keys in shards.items():
        save_file({k: state[k] for k in shard_keys}, str(src / name))
        weight_map.update({k: name for k in shard_keys})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {
        "architectures": ["LlavaMistralForCausalLM"],
        "model_type": "llava_mistral",
        "hidden_size": TEXT_HIDDEN, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": source_vocab,
        "max_position_embeddings": 256, "rms_norm_eps": text_config.rms_norm_eps, "rope_theta": ROPE_THETA,
        "sliding_window": None, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu",
        "mm_vision_tower": "openai/not-cached-here" if bundle_tower else str(clip_dir),
        "mm_hidden_size": vision_hidden, "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
    }
    (src / "config.json").write_text(json.dumps(config, indent=2))
    return {"src": src, "clip_dir": clip_dir, "clip": clip, "mistral": mistral, "projector": projector,
            "state": state, "source_vocab": source_vocab}


def expand_to_square(image: Image.Image, mean: list[float]) -> Image.Image:
    """The original LLaVA preprocessing: centre the image on a square of the mean colour."""
    width, height = image.size
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), tuple(int(m * 255) for m in mean))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


@torch.no_grad()
def reference_logits(original: dict, input_ids: list[int], image_token_id: int, pixel_values: torch.Tensor) -> torch.Tensor:
    """CLIP -> second-to-last layer without CLS -> projector -> features in place of <image> -> Mistral."""
    hidden = original["clip"](pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]   # (1, N, Dv)
    p = original["projector"]
    features = F.linear(F.gelu(F.linear(hidden, p["model.mm_projector.0.weight"], p["model.mm_projector.0.bias"])),
                        p["model.mm_projector.2.weight"], p["model.mm_projector.2.bias"])[0]   # (N, D)
    mistral = original["mistral"]
    pieces, start = [], 0
    positions = [i for i, t in enumerate(input_ids) if t == image_token_id]
    assert len(positions) == features.shape[0]
    # The features occupy one contiguous run of placeholders.
    first, last = positions[0], positions[-1] + 1
    embed = mistral.get_input_embeddings()
    pieces = [embed(torch.tensor([input_ids[start:first]]))[0], features, embed(torch.tensor([input_ids[last:]]))[0]]
    inputs_embeds = torch.cat(pieces).unsqueeze(0)                                            # (1, T, D)
    return mistral(inputs_embeds=inputs_embeds).logits[0]                                     # (T, V0)


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    return build_original_checkpoint(tmp_path_factory.mktemp("original"))


@pytest.fixture(scope="module")
def converted(original, tmp_path_factory):
    dst = tmp_path_factory.mktemp("convert") / "llava-med-hf"
    report = convert_llava_med(original["src"], dst, pad_to_multiple=16)
    return original, dst, report


def copy_source(original: dict, folder: Path) -> Path:
    """A private copy of the fake source checkpoint that a test may damage."""
    return Path(shutil.copytree(original["src"], folder / "src"))


def test_map_key_rules():
    assert map_key("model.layers.3.self_attn.q_proj.weight") == "model.language_model.layers.3.self_attn.q_proj.weight"
    assert map_key("model.embed_tokens.weight") == "model.language_model.embed_tokens.weight"
    assert map_key("model.norm.weight") == "model.language_model.norm.weight"
    assert map_key("lm_head.weight") == "lm_head.weight"
    assert map_key("model.mm_projector.0.bias") == "model.multi_modal_projector.linear_1.bias"
    assert map_key("model.mm_projector.2.weight") == "model.multi_modal_projector.linear_2.weight"
    assert map_key("model.vision_tower.vision_tower.vision_model.post_layernorm.weight") == \
        "model.vision_tower.post_layernorm.weight"
    assert map_key("model.mm_projector.1.weight") is None


def test_every_key_mapped_with_its_shape(converted):
    original, dst, report = converted
    assert set(report.key_map) == set(original["state"])
    vlm = load_vlm(dst, device="cpu")
    state = vlm.model.state_dict()
    source_vocab = original["source_vocab"]
    for key, target in report.key_map.items():
        source = original["state"][key]
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            assert state[target].shape == (report.vocab_size, source.shape[1])
            assert torch.equal(state[target][:source_vocab], source)
        else:
            assert state[target].shape == source.shape, key
            assert torch.equal(state[target], source), key
    # The tower comes from --vision-tower (default: mm_vision_tower) since the source does not bundle it.
    for key, tensor in original["clip"].state_dict().items():
        assert torch.equal(state["model.vision_tower." + key.removeprefix("vision_model.")], tensor), key


def test_vocabulary_padded_with_new_tokens(converted):
    original, dst, report = converted
    vlm = load_vlm(dst, device="cpu")
    tokenizer = vlm.tokenizer
    source_vocab = original["source_vocab"]
    assert report.source_vocab_size == source_vocab
    assert report.vocab_size % 16 == 0
    assert report.vocab_size >= source_vocab + 2
    assert tokenizer.convert_tokens_to_ids("<image>") == source_vocab
    assert tokenizer.pad_token == "<pad>"
    assert tokenizer.pad_token_id == source_vocab + 1
    assert vlm.model.config.image_token_index == source_vocab
    assert vlm.model.config.text_config.vocab_size == report.vocab_size
    assert vlm.model.config.text_config.rope_parameters["rope_theta"] == ROPE_THETA
    # New rows start at the mean of the original embeddings.
    embed = vlm.model.get_input_embeddings().weight
    assert torch.allclose(embed[source_vocab], original["state"]["model.embed_tokens.weight"].mean(0), atol=1e-6)
    assert vlm.processor.chat_template is not None
    assert vlm.adapter.prompt("what is shown?").startswith("[INST] <image>")


def test_pad_to_square_preprocessing(converted):
    from transformers import CLIPImageProcessorPil

    original, dst, _ = converted
    vlm = load_vlm(dst, device="cpu")
    wide = Image.new("RGB", (90, 40), (200, 30, 30))
    clip_processor = CLIPImageProcessorPil.from_pretrained(original["clip_dir"])
    expected = clip_processor(images=expand_to_square(wide, clip_processor.image_mean),
                              return_tensors="pt")["pixel_values"]
    got = vlm.adapter.pixel_values([wide])["pixel_values"]
    assert got.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.allclose(got, expected, atol=1e-6)
    # A centre crop would have cut the red image to a full red square; padding keeps grey bands.
    cropped = clip_processor(images=wide, return_tensors="pt")["pixel_values"]
    assert not torch.allclose(got, cropped, atol=1e-2)


def test_converted_logits_equal_reference_forward(converted):
    original, dst, _ = converted
    vlm = load_vlm(dst, device="cpu")
    image = Image.new("RGB", (70, 50), (20, 140, 220))
    prompt = vlm.adapter.prompt("is there a lesion in the left lung ?")
    inputs = vlm.processor(images=[image], text=[prompt + " yes"], return_tensors="pt")
    with torch.no_grad():
        logits = vlm.model(**inputs).logits[0]                                             # (T, V)
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(vlm.model.config.image_token_index) == (IMAGE_SIZE // PATCH_SIZE) ** 2
    expected = reference_logits(original, ids, vlm.model.config.image_token_index, inputs["pixel_values"])
    source_vocab = original["source_vocab"]
    assert expected.shape == (len(ids), source_vocab)
    assert torch.allclose(logits[:, :source_vocab], expected, atol=1e-5)


def test_bundled_tower_used_without_download(tmp_path):
    # 64-dimensional heads, as in OpenAI CLIP, so the sizes can be read from the weights alone.
    original = build_original_checkpoint(tmp_path, vision_hidden=64, vision_heads=1, bundle_tower=True)
    report = convert_llava_med(original["src"], tmp_path / "out", pad_to_multiple=16)
    assert report.vision_tower_bundled
    assert report.ignored_keys == ["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"]
    assert set(report.key_map) | set(report.ignored_keys) == set(original["state"])

    vlm = load_vlm(tmp_path / "out", device="cpu")
    vision = vlm.model.config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (64, 3, 1)
    assert (vision.image_size, vision.patch_size) == (IMAGE_SIZE, PATCH_SIZE)
    image = Image.new("RGB", (50, 70), (120, 40, 90))
    prompt = vlm.adapter.prompt("which organ is shown ?")
    inputs = vlm.processor(images=[image], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        logits = vlm.model(**inputs).logits[0]
    expected = reference_logits(original, inputs["input_ids"][0].tolist(), vlm.model.config.image_token_index,
                                inputs["pixel_values"])
    assert torch.allclose(logits[:, : original["source_vocab"]], expected, atol=1e-5)


def test_unknown_key_rejected(original, tmp_path):
    from safetensors.torch import save_file

    src = copy_source(original, tmp_path)
    save_file({"model.mm_projector.5.weight": torch.zeros(2, 2)}, str(src / "model-extra.safetensors"))
    with pytest.raises(HSCRError, match="model.mm_projector.5.weight"):
        convert_llava_med(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "out.converting").exists()


def test_bin_source_cast_to_bf16(original, tmp_path):
    src = copy_source(original, tmp_path)
    for path in src.glob("*.safetensors*"):
        path.unlink()
    torch.save(original["state"], src / "pytorch_model.bin")

    report = convert_llava_med(src, tmp_path / "out", dtype="bf16", pad_to_multiple=16)

    from safetensors import safe_open

    for path in (tmp_path / "out").glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.bfloat16}
    vlm = load_vlm(tmp_path / "out", device="cpu", dtype="bf16")
    state = vlm.model.state_dict()
    assert set(report.key_map) == set(original["state"])
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.mm_projector.2.bias"):
        target = state[report.key_map[key]]
        assert target.dtype == torch.bfloat16
        assert torch.equal(target, original["state"][key].to(torch.bfloat16))


def test_existing_destination_kept(original, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "notes.txt").write_text("keep me")
    with pytest.raises(HSCRError, match="not empty"):
        convert_llava_med(original["src"], dst)
    assert (dst / "notes.txt").read_text() == "keep me"


def test_hf_checkpoint_rejected(tmp_path, tiny_model_dir):
    with pytest.raises(HSCRError, match="loaded directly"):
        convert_llava_med(tiny_model_dir, tmp_path / "out")


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "hscr", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


@pytest.mark.slow
def test_cli_converts_and_reports_missing_tower(original, tmp_path):
    missing = _run_cli("convert-llava-med", str(original["src"]), str(tmp_path / "a"),
                       "--vision-tower", str(tmp_path / "no-such-clip"))
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1].startswith("error: cannot load the CLIP vision tower")
    assert "Traceback" not in missing.stderr
    assert not (tmp_path / "a").exists()

    done = _run_cli("convert-llava-med", str(original["src"]), str(tmp_path / "b"))
    assert done.returncode == 0, done.stderr
    assert "converted" in done.stdout
    assert json.loads((tmp_path / "b" / "config.json").read_text())["architectures"] == ["LlavaForConditionalGeneration"]
