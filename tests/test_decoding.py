"""Batched greedy decoding against one-at-a-time decoding and ``model.generate``."""

import dataclasses

import pytest
import torch
from support import random_image, tiny_vlm

from hscr.decoding import eos_token_ids, greedy_generate, greedy_generate_ids, left_align

QUESTIONS = [
    "is there a lesion in the left lung ?",
    "what modality is this image ?",
    "how many lesions are visible in the right upper lobe ?",
    "which organ is shown ?",
]


@pytest.fixture(scope="module")
def vlm():
    return tiny_vlm()


@pytest.fixture(scope="module")
def images():
    first, second, third = (random_image(seed) for seed in range(3))
    return [first, second, first, third]   # rows 0 and 2 share one image


def hf_generate(vlm, image, question, max_new_tokens):
    """Greedy ids from transformers' own generate on the processor's inputs."""
    prompt = vlm.adapter.prompt(question)
    inputs = vlm.processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = vlm.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def test_left_align_moves_padding_first():
    values = torch.tensor([[1, 2, 0, 0], [3, 4, 5, 6], [7, 0, 0, 0]])
    lengths = torch.tensor([2, 4, 1])
    assert left_align(values, lengths).tolist() == [[0, 0, 1, 2], [3, 4, 5, 6], [0, 0, 0, 7]]


def test_batched_equals_one_at_a_time(vlm, images):
    batched = greedy_generate_ids(vlm, images, QUESTIONS, max_new_tokens=10, batch_size=4)
    single = [greedy_generate_ids(vlm, [image], [question], max_new_tokens=10)[0] for image, question in zip(images, QUESTIONS)]
    assert batched == single
    assert len({tuple(ids) for ids in batched}) > 1   # the rows really differ


def test_single_sample_equals_hf_generate(vlm, images):
    ours = greedy_generate_ids(vlm, images[:1], QUESTIONS[:1], max_new_tokens=10)[0]
    assert ours == hf_generate(vlm, images[0], QUESTIONS[0], 10)
    text = greedy_generate(vlm, images[:1], QUESTIONS[:1], max_new_tokens=10)[0]
    assert text == vlm.tokenizer.decode(ours, skip_special_tokens=True).strip()


def test_rows_stop_at_their_own_eos(images):
    vlm = tiny_vlm()
    free = greedy_generate_ids(vlm, images, QUESTIONS, max_new_tokens=10, batch_size=4)
    # Make a token that some rows emit early an end-of-sequence token, so rows end at different steps.
    stop_token = free[0][3]
    vlm.model.generation_config.eos_token_id = [vlm.tokenizer.eos_token_id, stop_token]
    assert stop_token in eos_token_ids(vlm)

    batched = greedy_generate_ids(vlm, images, QUESTIONS, max_new_tokens=10, batch_size=4)
    single = [greedy_generate_ids(vlm, [image], [question], max_new_tokens=10)[0] for image, question in zip(images, QUESTIONS)]
    assert batched == single
    assert batched[0] == free[0][: free[0].index(stop_token) + 1]
    assert len({len(ids) for ids in batched}) > 1
    assert batched[0] == hf_generate(vlm, images[0], QUESTIONS[0], 10)


def test_batch_size_does_not_change_output(vlm, images):
    by_four = greedy_generate(vlm, images, QUESTIONS, max_new_tokens=6, batch_size=4)
    by_three = greedy_generate(vlm, images, QUESTIONS, max_new_tokens=6, batch_size=3)
    assert by_four == by_three


def test_image_paths_are_accepted(vlm, images, tmp_path):
    path = tmp_path / "image.png"
    images[1].save(path)
    from_path = greedy_generate_ids(vlm, [path, str(path)], QUESTIONS[:2], max_new_tokens=6)
    from_image = greedy_generate_ids(vlm, [images[1], images[1]], QUESTIONS[:2], max_new_tokens=6)
    assert from_path == from_image


def test_mismatched_lengths_raise(vlm, images):
    with pytest.raises(ValueError, match="2 images for 1 questions"):
        greedy_generate(vlm, images[:2], QUESTIONS[:1])


def test_lora_model_decodes_with_adapter(images):
    from peft import LoraConfig, get_peft_model

    vlm = tiny_vlm()
    base_ids = greedy_generate_ids(vlm, images[:2], QUESTIONS[:2], max_new_tokens=8)
    config = LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=r".*language_model.*\.(q_proj|v_proj|o_proj)",
        init_lora_weights=False,   # random B, so the adapter changes the output
    )
    peft_model = get_peft_model(vlm.model, config)
    peft_model.eval()
    lora_vlm = dataclasses.replace(vlm, model=peft_model)

    lora_ids = greedy_generate_ids(lora_vlm, images[:2], QUESTIONS[:2], max_new_tokens=8)
    assert lora_ids != base_ids
    assert lora_ids[0] == hf_generate(lora_vlm, images[0], QUESTIONS[0], 8)
