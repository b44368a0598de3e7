"""Load a vision-language model and its processor from a local folder or a hub id.

Nothing is downloaded unless the user names a hub id that is not cached and the environment
allows network access; a missing model gets an error that says which it was.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from hscr.errors import ModelLoadError
from hscr.models.base import VLM, FamilyAdapter
from hscr.models.gemma3 import Gemma3Adapter
from hscr.models.llava import LlavaAdapter
from hscr.models.llava_next import LlavaNextAdapter
from hscr.models.qwen2_vl import Qwen2VLAdapter

logger = logging.getLogger(__name__)

# architecture name in config.json -> adapter class
ADAPTERS: dict[str, type[FamilyAdapter]] = {arch: LlavaAdapter for arch in LlavaAdapter.architectures}
ADAPTERS.update({arch: Gemma3Adapter for arch in Gemma3Adapter.architectures})
ADAPTERS.update({arch: LlavaNextAdapter for arch in LlavaNextAdapter.architectures})
ADAPTERS.update({arch: Qwen2VLAdapter for arch in Qwen2VLAdapter.architectures})


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device} requested but CUDA is not available; use --device cpu")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on CUDA and fp32 on CPU, where bf16 arithmetic is several times slower."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if dtype not in names:
        raise ModelLoadError(f"invalid dtype {dtype!r}: expected one of auto, {', '.join(names)}")
    return names[dtype]


def _architecture(name_or_path: str) -> str:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        local = Path(name_or_path)
        if local.exists():
            raise ModelLoadError(
                f"cannot read model config in {name_or_path}: {exc}. The folder must hold a Hugging Face "
                "checkpoint (config.json, weights, processor files); convert original LLaVA-Med "
                "checkpoints with `python -m hscr convert-llava-med`."
            ) from None
        raise ModelLoadError(
            f"model {name_or_path!r} not found: it is not a local folder and could not be loaded as a "
            "hub id (offline, not cached, or misspelled). Pass the path of a downloaded checkpoint, "
            "or build the demo model with `python -m hscr demo`."
        ) from None
    architectures = list(getattr(config, "architectures", None) or [])
    if not architectures:
        architectures = [type(config).__name__.replace("Config", "ForConditionalGeneration")]
    return architectures[0]


def adapter_class(architecture: str) -> type[FamilyAdapter]:
    if architecture not in ADAPTERS:
        raise ModelLoadError(
            f"unsupported model architecture {architecture!r}; supported: {', '.join(ADAPTERS)}. "
            "Original LLaVA-Med v1.5 checkpoints (llava_mistral) must first be converted with "
            "`python -m hscr convert-llava-med`; see 'Model families' in the README"
        )
    return ADAPTERS[architecture]


def wrap_vlm(model: Any, processor: Any, name: str = "model") -> VLM:
    """Bundle an already built model and processor (tests, the demo builder)."""
    architecture = type(model).__name__
    cls = adapter_class(architecture)
    param = next(model.parameters())
    return VLM(model=model, processor=processor, adapter=cls(model, processor), name=name,
               device=param.device, dtype=param.dtype)


def load_vlm(
    name_or_path: str | Path,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
) -> VLM:
    """Load a checkpoint in Hugging Face format with its processor and family adapter."""
    import transformers
    from transformers import AutoProcessor

    # A local folder is named by its absolute path, so runs started from different working
    # directories (the app, a shell) share generation and evaluation run ids.
    local = Path(name_or_path)
    name = str(local.resolve()) if local.exists() else str(name_or_path)
    architecture = _architecture(name)
    adapter_cls = adapter_class(architecture)
    model_cls = getattr(transformers, architecture)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    try:
        processor = AutoProcessor.from_pretrained(name)
    except (OSError, ValueError, TypeError, ImportError) as exc:
        # ImportError: a missing optional package, e.g. torchvision for Qwen2-VL's video processor.
        raise ModelLoadError(f"cannot load the processor of {name}: {str(exc).strip()}") from None
    try:
        model = model_cls.from_pretrained(name, dtype=torch_dtype)
    except torch.cuda.OutOfMemoryError:
        raise ModelLoadError(f"out of GPU memory while loading {name}; use a smaller model or --device cpu") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the weights of {name}: {exc}") from None
    model.to(device)
    model.eval()
    adapter = adapter_cls(model, processor)
    logger.info("loaded %s (%s) on %s as %s", name, architecture, device, torch_dtype)
    return VLM(model=model, processor=processor, adapter=adapter, name=name, device=device, dtype=torch_dtype)


def model_info(name_or_path: str | Path) -> dict[str, Any]:
    """Return a short description of a local checkpoint without loading weights."""
    path = Path(name_or_path) / "config.json"
    if not path.is_file():
        return {"name": str(name_or_path)}
    config = json.loads(path.read_text())
    return {"name": str(name_or_path), "architecture": (config.get("architectures") or ["?"])[0]}
