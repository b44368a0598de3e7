import pytest
import torch

from hscr.config import GenerateConfig
from hscr.errors import ModelLoadError
from hscr.generate import GenerationSample, process_batch
from hscr.models import load_vlm, resolve_device, resolve_dtype
from hscr.models.loader import adapter_class
from support import random_image


def test_load_local_checkpoint(tiny_model_dir):
    vlm = load_vlm(tiny_model_dir, device="cpu")
    assert type(vlm.model).__name__ == "LlavaForConditionalGeneration"
    assert vlm.dtype == torch.float32 and vlm.device.type == "cpu"
    assert vlm.adapter.image_token_id == vlm.model.config.image_token_id
    assert vlm.adapter.prompt("is it normal ?") == "[INST] <image>\nis it normal ? [/INST]"


def test_load_bf16(tiny_model_dir):
    vlm = load_vlm(tiny_model_dir, device="cpu", dtype="bf16")
    assert next(vlm.model.parameters()).dtype == torch.bfloat16
    sample = GenerationSample("s", random_image(0), "i", "which organ is shown ?", "the left lung")
    out = process_batch(vlm, [sample], GenerateConfig())[0]
    assert out["candidates"][0]["ref_logp"] < 0


def test_unknown_model_id():
    with pytest.raises(ModelLoadError, match="not found"):
        load_vlm("no-such-org/no-such-model-xyz", device="cpu")


def test_unsupported_architecture():
    with pytest.raises(ModelLoadError, match="supported: LlavaForConditionalGeneration"):
        adapter_class("BertForMaskedLM")


def test_device_and_dtype_choice():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ModelLoadError, match="invalid dtype"):
        resolve_dtype("int3", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_generation(tiny_model_dir):
    vlm = load_vlm(tiny_model_dir, device="cuda", dtype="auto")
    assert vlm.dtype == torch.bfloat16
    sample = GenerationSample("s", random_image(0), "i", "which organ is shown ?", "the left lung")
    out = process_batch(vlm, [sample], GenerateConfig())[0]
    assert out["candidates"][0]["ref_logp"] < 0


def test_greedy_preferred_and_redecode(tiny_model_dir):
    vlm = load_vlm(tiny_model_dir, device="cpu")
    samples = [GenerationSample(f"s{i}", random_image(i), f"i{i}", "which organ is shown ?", "the left lung") for i in range(2)]
    greedy = process_batch(vlm, samples, GenerateConfig(preferred="greedy", max_new_tokens=6))
    for out in greedy:
        assert out["model_answer"] is not None
        reference = out["candidates"][0]["text"]
        assert reference == (out["model_answer"].strip() or "the left lung")
    redecoded = process_batch(vlm, samples, GenerateConfig(replacement="redecode", max_new_tokens=4))
    for out in redecoded:
        texts = [c["text"] for c in out["candidates"]]
        assert len(texts) == len(set(texts))
        assert all(t for t in texts)
