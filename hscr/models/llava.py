"""Adapter for ``LlavaForConditionalGeneration`` checkpoints (LLaVA 1.5, converted LLaVA-Med).

Image features replace a run of ``<image>`` placeholder tokens in the prompt, one per patch.
The language model takes plain embeddings, an attention mask and position ids, so dropout only
has to cut those three tensors.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from hscr.errors import ModelLoadError
from hscr.models.base import FamilyAdapter, unwrap_model
from hscr.models.tiny import LLAVA_MED_CHAT_TEMPLATE


class LlavaAdapter(FamilyAdapter):
    name = "llava"
    architectures = ("LlavaForConditionalGeneration",)

    def find_image_token_id(self, model: Any) -> int:
        config = unwrap_model(model).config
        token_id = getattr(config, "image_token_id", None)
        if token_id is None:
            token_id = getattr(config, "image_token_index", None)
        vocab_size = len(self.tokenizer)
        if token_id is None or token_id >= vocab_size:
            raise ModelLoadError(
                "the model has no usable image token: config.image_token_id is "
                f"{token_id!r} but the tokenizer has {vocab_size} tokens; add an '<image>' token to the "
                "tokenizer and set image_token_index in config.json"
            )
        return int(token_id)

    def prompt(self, question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        template = getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=template or LLAVA_MED_CHAT_TEMPLATE,
            tokenize=False,
            add_generation_prompt=True,
        )

    def pixel_values(self, images: Sequence[Any]) -> dict[str, torch.Tensor]:
        out = self.processor.image_processor(images=list(images), return_tensors="pt")
        return {"pixel_values": out["pixel_values"]}

    def prompt_ids(self, prompts: Sequence[str], num_image_tokens: int) -> list[list[int]]:
        rows = []
        for text in prompts:
            ids = self.tokenizer(text)["input_ids"]
            count = ids.count(self.image_token_id)
            if count != 1:
                raise ModelLoadError(
                    f"the prompt template produced {count} image tokens, expected 1: {text!r}; "
                    "check the chat template of the processor"
                )
            at = ids.index(self.image_token_id)
            rows.append(ids[:at] + [self.image_token_id] * num_image_tokens + ids[at + 1 :])
        return rows

    def image_features(self, model: Any, pixel_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        inner = unwrap_model(model)
        config = inner.config
        param = next(inner.model.multi_modal_projector.parameters())
        pixel_values = pixel_inputs["pixel_values"].to(param.device, param.dtype)
        out = inner.model.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            return_dict=True,
        )
        features = out.pooler_output
        if isinstance(features, (list, tuple)):
            features = torch.stack(list(features))
        return features  # (num_images, N, D)

    def language_forward(self, model, inputs_embeds, attention_mask, position_ids, extras=None):
        inner = unwrap_model(model)
        out = inner.model.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
        return out.last_hidden_state

    def language_forward_cached(self, model, inputs_embeds, attention_mask, position_ids, cache=None, extras=None):
        # transformers 5.x names the key/value cache argument `cache` (formerly `past_key_values`).
        inner = unwrap_model(model)
        out = inner.model.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        return out.last_hidden_state, out.cache

    def lm_head(self, model: Any) -> torch.nn.Module:
        return unwrap_model(model).lm_head

    def embed_tokens(self, model: Any) -> torch.nn.Module:
        return unwrap_model(model).get_input_embeddings()
