"""Adapter for ``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration`` checkpoints.

Qwen2-VL and Qwen2.5-VL (and models built on them such as Lingshu and HuatuoGPT-Vision) encode each
image at its own resolution. The processor resizes it to a multiple of ``patch_size *
merge_size`` pixels, and every 2x2 block of patches becomes one ``<|image_pad|>`` token, so the
token count depends on the image size. Positions are multimodal rotary ("M-RoPE") ids of shape
``(3, B, T)``. Text tokens carry their running index on all three axes, while image tokens carry
(start, start + row, start + column) over the merged patch grid, and the text after an image
continues at ``start + max(rows, columns)``.

Here the M-RoPE ids are a per-token extra of shape ``(B, T, 3)``, so visual token dropout cuts them
together with the dropped tokens. The kept image tokens keep their grid coordinates and the text
after the image keeps its positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from hscr.errors import ModelLoadError
from hscr.models.base import (
    FamilyAdapter,
    ImageLayout,
    added_special_ids,
    attach_image_layout,
    image_layout,
    unwrap_model,
)

MROPE_POSITION_IDS = "mrope_position_ids"


@dataclass
class MropeCache:
    """A key/value cache together with each row's offset from 1D to M-RoPE text positions."""

    cache: Any
    rope_deltas: torch.Tensor        # (B, 1)


class Qwen2VLAdapter(FamilyAdapter):
    name = "qwen2_vl"
    architectures = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    supports_packed_prefix = False
    variable_image_tokens = True

    def __init__(self, model: Any, processor: Any):
        super().__init__(model, processor)
        vision_config = unwrap_model(model).config.vision_config
        self.spatial_merge_size = int(vision_config.spatial_merge_size)
        self.image_token = getattr(processor, "image_token", None) or "<|image_pad|>"

    def find_image_token_id(self, model: Any) -> int:
        token_id = getattr(unwrap_model(model).config, "image_token_id", None)
        vocab_size = len(self.tokenizer)
        if token_id is None or token_id >= vocab_size:
            raise ModelLoadError(
                f"the Qwen2-VL model has no usable image token: config.image_token_id is {token_id!r} but the "
                f"tokenizer has {vocab_size} tokens; use the processor files that came with the checkpoint"
            )
        return int(token_id)

    def prompt(self, question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        template = getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ModelLoadError("the Qwen2-VL processor has no chat template; use the processor files of an instruction-tuned checkpoint")
        return self.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                  add_generation_prompt=True)

    def pixel_values(self, images: Sequence[Any]) -> dict[str, torch.Tensor]:
        out = self.processor.image_processor(images=list(images), return_tensors="pt")
        # pixel_values: (total patches, C * temporal_patch * patch * patch); image_grid_thw: (U, 3)
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def prompt_ids(self, prompts: Sequence[str], num_image_tokens: int) -> list[list[int]]:
        rows = []
        for text in prompts:
            count = text.count(self.image_token)
            if count != 1:
                raise ModelLoadError(
                    f"the prompt template produced {count} {self.image_token} markers, expected 1: {text!r}; "
                    "check the chat template of the processor"
                )
            rows.append(self.tokenizer(text.replace(self.image_token, self.image_token * num_image_tokens))["input_ids"])
        return rows

    def special_token_ids(self) -> set[int]:
        # Chat-turn markers are added special tokens that all_special_ids leaves out.
        return super().special_token_ids() | added_special_ids(self.tokenizer)

    def image_features(self, model: Any, pixel_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        inner = unwrap_model(model)
        visual = inner.model.visual
        param = next(visual.parameters())
        grids = pixel_inputs["image_grid_thw"].to(param.device)                 # (U, 3) in patches
        out = inner.model.get_image_features(
            pixel_values=pixel_inputs["pixel_values"].to(param.device, param.dtype),
            image_grid_thw=grids,
            return_dict=True,
        )
        per_image = list(out.pooler_output)                                      # U tensors (n_i, D)
        counts = [int(f.shape[0]) for f in per_image]
        padded = per_image[0].new_zeros((len(per_image), max(counts), per_image[0].shape[-1]))  # (U, N_max, D)
        for index, features in enumerate(per_image):
            padded[index, : counts[index]] = features
        layout = ImageLayout(token_counts=counts, grids=[tuple(int(v) for v in g) for g in grids.tolist()])
        return attach_image_layout(padded, layout)

    def per_token_extras(self) -> tuple[str, ...]:
        return (MROPE_POSITION_IDS,)

    def sequence_extras(self, input_ids, attention_mask, image_token_mask, image_features, image_rows):
        layout = image_layout(image_features)
        if layout is None or layout.grids is None:
            raise ValueError("Qwen2-VL image features carry no patch grids; build them with this adapter's image_features")
        positions = torch.zeros((*input_ids.shape, 3), dtype=torch.long)       # (B, T, 3)
        for row, image_index in enumerate(image_rows):
            length = int(attention_mask[row].sum())
            is_image = image_token_mask[row, :length].tolist()
            positions[row, :length] = self._row_positions(is_image, layout.grids[image_index])
        return {MROPE_POSITION_IDS: positions.to(input_ids.device)}

    def _row_positions(self, is_image: list[bool], grid: tuple[int, int, int]) -> torch.Tensor:
        """M-RoPE ids ``(T, 3)`` of one unpadded row with one image, as ``get_rope_index`` builds them."""
        _, grid_h, grid_w = grid
        rows_merged, cols_merged = grid_h // self.spatial_merge_size, grid_w // self.spatial_merge_size
        first = is_image.index(True)
        count = sum(is_image)
        if count != rows_merged * cols_merged:
            raise ValueError(f"{count} image tokens in a row but the image grid {grid} gives {rows_merged * cols_merged}")
        positions = torch.zeros((len(is_image), 3), dtype=torch.long)
        positions[:first] = torch.arange(first).unsqueeze(1)                     # text before the image
        # Images have one temporal step, so the temporal axis stays at the start position.
        row_index = torch.arange(rows_merged).repeat_interleave(cols_merged)    # (count,)
        col_index = torch.arange(cols_merged).repeat(rows_merged)               # (count,)
        positions[first : first + count, 0] = first
        positions[first : first + count, 1] = first + row_index
        positions[first : first + count, 2] = first + col_index
        after = len(is_image) - first - count
        restart = first + max(rows_merged, cols_merged)
        positions[first + count :] = (restart + torch.arange(after)).unsqueeze(1)
        return positions

    def _rope_positions(self, position_ids: torch.Tensor, extras: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """M-RoPE ids ``(3, B, T)`` from the extras, or the 1D ids on all three axes for text only."""
        mrope = (extras or {}).get(MROPE_POSITION_IDS)
        if mrope is not None:
            return mrope.permute(2, 0, 1)
        return position_ids.unsqueeze(0).expand(3, -1, -1)

    def language_forward(self, model, inputs_embeds, attention_mask, position_ids, extras=None):
        inner = unwrap_model(model)
        out = inner.model.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=self._rope_positions(position_ids, extras),
            use_cache=False,
        )
        return out.last_hidden_state

    def language_forward_cached(self, model, inputs_embeds, attention_mask, position_ids, cache=None, extras=None):
        inner = unwrap_model(model)
        if isinstance(cache, MropeCache):
            # Decode steps: text positions continue from the prompt's last M-RoPE position.
            rope_positions = (position_ids + cache.rope_deltas).unsqueeze(0).expand(3, -1, -1)
            past, deltas = cache.cache, cache.rope_deltas
        else:
            rope_positions = self._rope_positions(position_ids, extras)        # (3, B, T)
            past = cache
            deltas = (rope_positions[0, :, -1] - position_ids[:, -1]).unsqueeze(1)  # (B, 1)
        out = inner.model.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=rope_positions,
            cache=past,
            use_cache=True,
        )
        return out.last_hidden_state, MropeCache(out.cache, deltas)

    def lm_head(self, model: Any) -> torch.nn.Module:
        return unwrap_model(model).lm_head

    def embed_tokens(self, model: Any) -> torch.nn.Module:
        return unwrap_model(model).get_input_embeddings()
