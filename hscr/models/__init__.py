"""Model loading and family adapters.

    from hscr.models import load_vlm
    vlm = load_vlm("data/demo/model", device="cpu")
"""

from hscr.models.base import VLM, FamilyAdapter, unwrap_model
from hscr.models.loader import ADAPTERS, load_vlm, resolve_device, resolve_dtype, wrap_vlm

__all__ = ["ADAPTERS", "VLM", "FamilyAdapter", "load_vlm", "resolve_device", "resolve_dtype", "unwrap_model", "wrap_vlm"]
