"""Adapter for ``LlavaNextForConditionalGeneration`` checkpoints (LLaVA-NeXT / LLaVA 1.6).

LLaVA-NeXT tiles each image at the grid resolution that fits its aspect ratio best ("anyres"),
encodes a base view plus the tiles, removes the padding rows or columns and appends a learned
newline embedding per row. The number of image tokens therefore depends on the image size. The
features of a batch are padded to the largest count, the real counts travel with them as an
:class:`~hscr.models.base.ImageLayout`, and ``build_batch`` fits each prompt's placeholder run to
its own image. The newline embeddings sit at placeholder positions too, so dropout may remove them.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from hscr.models.base import ImageLayout, attach_image_layout, unwrap_model
from hscr.models.llava import LlavaAdapter


class LlavaNextAdapter(LlavaAdapter):
    name = "llava_next"
    architectures = ("LlavaNextForConditionalGeneration",)
    variable_image_tokens = True

    def pixel_values(self, images: Sequence[Any]) -> dict[str, torch.Tensor]:
        out = self.processor.image_processor(images=list(images), return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]}

    def image_features(self, model: Any, pixel_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        inner = unwrap_model(model)
        config = inner.config
        param = next(inner.model.multi_modal_projector.parameters())
        pixel_values = pixel_inputs["pixel_values"].to(param.device, param.dtype)  # (U, tiles, C, H, W)
        image_sizes = pixel_inputs["image_sizes"].to(param.device)                 # (U, 2) height, width
        out = inner.model.get_image_features(
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            return_dict=True,
        )
        per_image = list(out.pooler_output)                                      # U tensors (n_i, D)
        counts = [int(f.shape[0]) for f in per_image]
        padded = per_image[0].new_zeros((len(per_image), max(counts), per_image[0].shape[-1]))  # (U, N_max, D)
        for index, features in enumerate(per_image):
            padded[index, : counts[index]] = features
        layout = ImageLayout(token_counts=counts, image_sizes=[tuple(s) for s in image_sizes.tolist()])
        return attach_image_layout(padded, layout)
