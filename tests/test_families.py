"""Family adapters beyond LLaVA 1.5: the HSCR passes equal each family's own forward.

For each family a tiny model is built from its config with the real transformers classes. With
dropout ratio 0 both contrast passes must give the logits of the model's normal forward on the
processor's inputs. With dropout the family's per-token tensors must be cut with the tokens.
Cached greedy decoding must give the tokens of ``model.generate``, and generate, train and
evaluate must run end to end (marked slow).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from family_support import (
    build_tiny_gemma3,
    build_tiny_llava_next,
    build_tiny_llava_qwen2,
    build_tiny_qwen2_5_vl,
    build_tiny_qwen2_vl,
)
from hscr.config import EvalConfig, GenerateConfig, TrainConfig
from hscr.contrast import apply_dropout, contrast, draw_dropped_positions
from hscr.decoding import greedy_generate_ids
from hscr.errors import ModelLoadError
from hscr.models import load_vlm, wrap_vlm
from hscr.models.loader import adapter_class
from hscr.packing import build_packed_batch, packed_logps, repeated_logps
from hscr.datasets.common import ImportOptions
from hscr.datasets.folder import import_path
from hscr.evaluate import run_evaluation
from hscr.generate import run_generation
from hscr.preferences import load_preferences
from hscr.sequences import build_batch, encode_images
from hscr.store import Store
from hscr.trainer import train

BUILDERS = {
    "gemma3": build_tiny_gemma3,
    "llava_next": build_tiny_llava_next,
    "llava_qwen2": build_tiny_llava_qwen2,
    "qwen2_vl": build_tiny_qwen2_vl,
    "qwen2_5_vl": build_tiny_qwen2_5_vl,
}

# The packed MLPO forward takes no per-token extras, so families with extras train with one
# sequence per answer.
SHARED_PREFIX = {"gemma3": False, "llava_next": True, "llava_qwen2": True, "qwen2_vl": False, "qwen2_5_vl": False}

SAMPLES = [
    ("is there a lesion in the left lung ?", "yes", (40, 30)),
    ("which organ is shown ?", "the chest", (24, 48)),
]


def family_image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    width, height = size
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request):
    model, processor = BUILDERS[request.param]()
    return request.param, wrap_vlm(model, processor, name=f"tiny-{request.param}")


def processor_inputs(vlm, image: Image.Image, prompt: str) -> dict[str, torch.Tensor]:
    """The family processor's own inputs for one image and prompt, as a user would build them."""
    tokenizer = vlm.tokenizer
    kwargs = {}
    if tokenizer.bos_token and prompt.startswith(tokenizer.bos_token):
        kwargs["add_special_tokens"] = False  # the chat template wrote <bos> already
    return dict(vlm.processor(images=[image], text=[prompt], return_tensors="pt", **kwargs))


def extend_inputs(inputs: dict[str, torch.Tensor], answer: list[int]) -> dict[str, torch.Tensor]:
    """Append answer tokens to a processor's text tensors (token types 0: text)."""
    extended = dict(inputs)
    tail = torch.tensor([answer])
    extended["input_ids"] = torch.cat([inputs["input_ids"], tail], dim=1)
    extended["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(tail)], dim=1)
    for key in ("token_type_ids", "mm_token_type_ids"):
        if key in inputs:
            extended[key] = torch.cat([inputs[key], torch.zeros_like(tail)], dim=1)
    return extended


def prepared(vlm):
    """Images, prompt ids, answer ids and image features of the two test samples."""
    adapter = vlm.adapter
    images = [family_image(i, size) for i, (_, _, size) in enumerate(SAMPLES)]
    features = encode_images(adapter, vlm.model, images)
    prompts = [adapter.prompt(question) for question, _, _ in SAMPLES]
    prompt_ids = adapter.prompt_ids(prompts, features.shape[1])
    answers = [adapter.answer_ids(answer) for _, answer, _ in SAMPLES]
    return images, prompts, prompt_ids, answers, features


def test_prompt_ids_match_processor(family):
    _, vlm = family
    images, prompts, prompt_ids, _, features = prepared(vlm)
    batch = build_batch(vlm.adapter, vlm.model, prompt_ids, [[] for _ in prompts], features, [0, 1])
    for row, (image, prompt) in enumerate(zip(images, prompts)):
        expected = processor_inputs(vlm, image, prompt)["input_ids"][0].tolist()
        length = int(batch.attention_mask[row].sum())
        ids_in_batch = batch.image_token_mask[row, :length].sum()
        assert length == len(expected)
        assert int(ids_in_batch) == expected.count(vlm.adapter.image_token_id)


@torch.no_grad()
def test_ratio_zero_equals_normal_forward(family):
    _, vlm = family
    adapter, model = vlm.adapter, vlm.model
    images, prompts, prompt_ids, answers, features = prepared(vlm)
    batch = build_batch(adapter, model, prompt_ids, answers, features, [0, 1])
    result = contrast(adapter, model, batch, seeds=[1, 2], ratio=0.0)

    for row, (image, prompt, answer) in enumerate(zip(images, prompts, answers)):
        inputs = extend_inputs(processor_inputs(vlm, image, prompt), answer)
        logits = model(**inputs).logits[0].float()                            # (T, V)
        prompt_len = inputs["input_ids"].shape[1] - len(answer)
        expected = logits[prompt_len - 1 : prompt_len - 1 + len(answer)]      # (A, V)
        assert torch.allclose(result.logits_full[row, : len(answer)], expected, atol=1e-4)
        assert torch.allclose(result.logits_drop[row, : len(answer)], expected, atol=1e-4)
        assert result.coupling_scores[row].abs().max() < 1e-4


@torch.no_grad()
def test_dropout_cuts_family_tensors(family):
    _, vlm = family
    adapter, model = vlm.adapter, vlm.model
    _, _, prompt_ids, answers, features = prepared(vlm)
    batch = build_batch(adapter, model, prompt_ids, answers, features, [0, 1])
    dropped = draw_dropped_positions(batch.image_token_mask, 0.5, [1, 2])
    cut = apply_dropout(batch, dropped, "remove")
    for row in range(2):
        before = int(batch.image_token_mask[row].sum())
        after = int(cut.image_token_mask[row].sum())
        assert after == before - before // 2
        assert int(cut.attention_mask[row].sum()) == int(batch.attention_mask[row].sum()) - before // 2
    assert set(cut.extras) == set(batch.extras) == set(adapter.per_token_extras())
    for name, value in batch.extras.items():
        keep = ~dropped
        for row in range(2):
            length = int(cut.attention_mask[row].sum())
            kept = value[row][keep[row]][:length]
            assert torch.equal(cut.extras[name][row, :length], kept), name
    result = contrast(adapter, model, batch, seeds=[1, 2], ratio=0.5)
    assert result.coupling_scores.abs().max() > 1e-4


@torch.no_grad()
def test_copied_features_without_counts_rejected(family):
    _, vlm = family
    if not vlm.adapter.variable_image_tokens:
        pytest.skip("fixed image token count")
    _, _, prompt_ids, answers, features = prepared(vlm)
    with pytest.raises(ValueError, match="carry no token counts"):
        build_batch(vlm.adapter, vlm.model, prompt_ids, answers, features.clone(), [0, 1])


@torch.no_grad()
def test_cached_decoding_matches_generate(family):
    _, vlm = family
    images, prompts, _, _, _ = prepared(vlm)
    ours = greedy_generate_ids(vlm, images, [question for question, _, _ in SAMPLES], max_new_tokens=6)
    for row, (image, prompt) in enumerate(zip(images, prompts)):
        inputs = processor_inputs(vlm, image, prompt)
        out = vlm.model.generate(**inputs, max_new_tokens=6, do_sample=False)
        expected = out[0, inputs["input_ids"].shape[1]:].tolist()
        assert len(ours[row]) >= 1
        assert ours[row] == expected[: len(ours[row])]


@torch.no_grad()
def test_packed_logps_equal_repeated(family):
    name, vlm = family
    if not SHARED_PREFIX[name]:
        pytest.skip(f"{name} trains with shared_prefix=false")
    adapter, model = vlm.adapter, vlm.model
    _, _, prompt_ids, _, features = prepared(vlm)
    responses = [[adapter.answer_ids(t) for t in ("yes", "no", "two lesions")],
                 [adapter.answer_ids(t) for t in ("the chest", "the brain")]]
    packed = packed_logps(adapter, model, build_packed_batch(adapter, model, prompt_ids, responses, features, [0, 1]))
    repeated = repeated_logps(adapter, model, prompt_ids, responses, features, [0, 1])
    assert packed.shape == (2, 3)
    assert torch.allclose(packed, repeated, atol=1e-4)


def test_turn_markers_count_as_special(family):
    name, vlm = family
    markers = {"gemma3": ["<end_of_turn>", "<start_of_turn>"], "qwen2_vl": ["<|im_start|>", "<|im_end|>"],
               "qwen2_5_vl": ["<|im_start|>", "<|im_end|>"]}.get(name)
    if markers is None:
        pytest.skip(f"{name} has no chat-turn markers")
    special = vlm.adapter.special_token_ids()
    for marker in markers:
        assert vlm.tokenizer.convert_tokens_to_ids(marker) in special, marker
    assert vlm.adapter.image_token_id in special
    answer = vlm.adapter.answer_ids("yes")
    assert answer[-1] in special
    assert not set(answer[:-1]) & special


def test_saved_family_loads_with_its_adapter(family, tmp_path):
    name, vlm = family
    if name.startswith("qwen"):
        # NOTE: AutoProcessor builds Qwen2-VL's video processor, whose base class needs torchvision.
        pytest.importorskip("torchvision", reason="loading a saved Qwen2-VL processor needs torchvision")
    vlm.model.save_pretrained(tmp_path / name)
    vlm.processor.save_pretrained(tmp_path / name)
    loaded = load_vlm(tmp_path / name, device="cpu")
    assert type(loaded.adapter) is type(vlm.adapter)
    assert loaded.adapter.image_token_id == vlm.adapter.image_token_id
    assert loaded.adapter.prompt("which organ is shown ?") == vlm.adapter.prompt("which organ is shown ?")


def test_qwen_processor_without_torchvision_reported(tmp_path):
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed, so the processor loads")
    model, processor = build_tiny_qwen2_vl()
    # The files of a released checkpoint, written without the video processor this class cannot save.
    model.save_pretrained(tmp_path)
    processor.tokenizer.save_pretrained(tmp_path)
    processor.image_processor.save_pretrained(tmp_path)
    config_path = tmp_path / "preprocessor_config.json"
    config = json.loads(config_path.read_text())
    config.update(processor_class="Qwen2VLProcessor", image_processor_type="Qwen2VLImageProcessor")
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="cannot load the processor of .*Torchvision"):
        load_vlm(tmp_path, device="cpu")


def test_unsupported_architecture_lists_supported():
    with pytest.raises(ModelLoadError) as info:
        adapter_class("BlipForConditionalGeneration")
    message = str(info.value)
    assert "BlipForConditionalGeneration" in message
    for architecture in ("LlavaForConditionalGeneration", "Gemma3ForConditionalGeneration",
                         "LlavaNextForConditionalGeneration", "Qwen2VLForConditionalGeneration",
                         "Qwen2_5_VLForConditionalGeneration"):
        assert architecture in message


def write_family_dataset(folder: Path) -> Path:
    """Four samples on three images of different sizes, with a samples.csv."""
    import csv

    folder.mkdir(parents=True)
    rows = [
        {"image": "wide.png", "question": "is there a lesion in the left lung ?", "answer": "yes"},
        {"image": "tall.png", "question": "which organ is shown ?", "answer": "the chest"},
        {"image": "square.png", "question": "how many lesions ?", "answer": "two"},
        {"image": "wide.png", "question": "what modality is this image ?", "answer": "x-ray"},
    ]
    for seed, (name, size) in enumerate({"wide.png": (40, 30), "tall.png": (24, 48), "square.png": (32, 32)}.items()):
        family_image(seed, size).save(folder / name)
    with open(folder / "samples.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_generate_train_evaluate_end_to_end(name, tmp_path):
    model, processor = BUILDERS[name]()
    vlm = wrap_vlm(model, processor, name=f"tiny-{name}")
    folder = write_family_dataset(tmp_path / "source")
    with Store(tmp_path / "data" / "hscr.duckdb") as store:
        report = import_path(store, folder, ImportOptions(name="toy"))
        assert report.ok, report.errors

        generated = run_generation(vlm, store, GenerateConfig(batch_size=2, num_coupled_tokens=3),
                                   dataset="toy", progress=False)
        assert generated["errors"] == []
        assert generated["processed"] == 4
        rows = load_preferences(store, dataset="toy")
        assert rows

        base_before = {n: p.detach().clone() for n, p in vlm.model.named_parameters()}
        # The default shared_prefix=True: families that cannot pack fall back to one sequence per answer.
        config = TrainConfig(max_steps=2, batch_size=2, learning_rate=5e-3, lora_r=4, lora_alpha=8,
                             save_steps=100, warmup_ratio=0.0)
        result = train(vlm, rows, config, tmp_path / "run")
        assert result.status == "completed"
        assert result.step == 2
        moved = [n for n, p in vlm.model.named_parameters() if "lora_B" in n and p.abs().max() > 0]
        assert moved
        for param_name, param in vlm.model.get_base_model().named_parameters():
            if "lora_" not in param_name:
                key = param_name.replace("base_layer.", "")
                assert torch.equal(param, base_before[key]), param_name

        evaluated = run_evaluation(vlm, store, "toy", split="train", progress=False,
                                   config=EvalConfig(batch_size=2, max_new_tokens=4))
        assert evaluated["errors"] == []
        assert evaluated["processed"] == 4
        assert set(evaluated["metrics"]) >= {"paper", "strict"}
