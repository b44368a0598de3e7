"""The shared-prefix packed forward equals one sequence per answer, values and LoRA gradients."""

import pytest
import torch

from hscr.config import TrainConfig
from hscr.mlpo import mlpo_loss
from hscr.packing import block_attention_mask, build_packed_batch, packed_logps, repeated_logps
from hscr.sequences import encode_images
from hscr.trainer import apply_lora
from support import random_image, tiny_vlm


@pytest.fixture(autouse=True)
def one_thread():
    # Two threads on a shared 2-core machine make tiny matmuls many times slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def lora_vlm(attn_implementation="sdpa", gradient_checkpointing=False):
    vlm = tiny_vlm()
    vlm.model.config._attn_implementation = attn_implementation
    vlm.model.config.text_config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    peft_model = apply_lora(vlm.model, TrainConfig(lora_r=4, lora_dropout=0.0))
    # LoRA B starts at zero, which would leave every A gradient zero; randomize it.
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    if gradient_checkpointing:
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model.train()
    vlm.model = peft_model
    return vlm


def inputs(vlm):
    adapter = vlm.adapter
    features = encode_images(adapter, vlm.model, [random_image(0), random_image(1)])   # (2, N, D)
    prompts = adapter.prompt_ids(
        [adapter.prompt("is there a lesion in the left lung ?"), adapter.prompt("what modality is this image ?")],
        features.shape[1],
    )
    responses = [
        [adapter.answer_ids(t) for t in ("yes", "no there is", "the right upper lobe", "two lesions")],
        [adapter.answer_ids(t) for t in ("x-ray", "ct", "mri")],   # one answer fewer
    ]
    return prompts, responses, features


def losses_and_grads(vlm, shared_prefix):
    vlm.model.zero_grad(set_to_none=True)
    prompts, responses, features = inputs(vlm)
    if shared_prefix:
        batch = build_packed_batch(vlm.adapter, vlm.model, prompts, responses, features, [0, 1])
        logps = packed_logps(vlm.adapter, vlm.model, batch)
    else:
        logps = repeated_logps(vlm.adapter, vlm.model, prompts, responses, features, [0, 1])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    refs = torch.tensor([[-20.0, -21.0, -22.0, -23.0], [-19.0, -20.0, -21.0, float("nan")]])
    out = mlpo_loss(logps[:, 0], logps[:, 1:], refs[:, 0], refs[:, 1:], mask, gamma=0.5)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in vlm.model.named_parameters() if p.requires_grad}
    return logps.detach(), out.loss.detach(), grads


def assert_same(vlm):
    packed_values, packed_loss, packed_grads = losses_and_grads(vlm, shared_prefix=True)
    repeated_values, repeated_loss, repeated_grads = losses_and_grads(vlm, shared_prefix=False)

    assert packed_values.shape == (2, 4)
    assert packed_values[1, 3].item() == 0.0
    assert (packed_values - repeated_values).abs().max().item() <= 1e-4
    assert abs(packed_loss.item() - repeated_loss.item()) <= 1e-4
    assert packed_grads.keys() == repeated_grads.keys()
    assert len(packed_grads) > 0
    worst = max((packed_grads[n] - repeated_grads[n]).abs().max().item() for n in packed_grads)
    assert worst <= 1e-4
    # The gradients are not trivially zero, so the comparison means something.
    assert max(g.abs().max().item() for g in packed_grads.values()) > 1e-3


def test_packed_equals_repeated_prefix_sdpa():
    assert_same(lora_vlm("sdpa"))


def test_packed_equals_repeated_prefix_eager():
    assert_same(lora_vlm("eager"))


def test_packed_equals_repeated_with_gradient_checkpointing():
    assert_same(lora_vlm("sdpa", gradient_checkpointing=True))


def test_block_mask_layout():
    # prefix of 2, answer 1 of 2 tokens, answer 2 of 1 token, one padding slot
    segments = torch.tensor([[0, 0, 1, 1, 2, -1]])
    mask = block_attention_mask(segments, "sdpa", torch.float32)[0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]


def test_eager_mask_is_additive():
    segments = torch.tensor([[0, 1, 2]])
    mask = block_attention_mask(segments, "eager", torch.float32)[0, 0]
    assert mask[2, 0].item() == 0.0
    assert mask[2, 1].item() == torch.finfo(torch.float32).min
    assert mask[0, 1].item() == torch.finfo(torch.float32).min


def test_flash_attention_is_rejected():
    from hscr.errors import HSCRError

    with pytest.raises(HSCRError, match="shared_prefix=false"):
        block_attention_mask(torch.tensor([[0, 1]]), "flash_attention_2", torch.float32)
