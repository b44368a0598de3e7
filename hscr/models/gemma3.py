"""Adapter for ``Gemma3ForConditionalGeneration`` checkpoints (Gemma 3, MedGemma).

The processor replaces ``<start_of_image>`` in the prompt with ``\\n\\n<start_of_image>``, a fixed
run of ``<image_soft_token>`` placeholders (256 in the released models) and ``<end_of_image>\\n\\n``.
Gemma 3 marks the placeholders with token-type ids and lets the tokens of one image attend to each
other in both directions. The token-type ids are a per-token extra here, so dropout removes them
together with the dropped image tokens and the bidirectional blocks shrink with the image.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from hscr.errors import ModelLoadError
from hscr.models.base import FamilyAdapter, added_special_ids, unwrap_model

TOKEN_TYPE_IDS = "token_type_ids"


class Gemma3Adapter(FamilyAdapter):
    name = "gemma3"
    architectures = ("Gemma3ForConditionalGeneration",)
    supports_packed_prefix = False

    def find_image_token_id(self, model: Any) -> int:
        config = unwrap_model(model).config
        token_id = getattr(config, "image_token_id", None)
        vocab_size = len(self.tokenizer)
        if token_id is None or token_id >= vocab_size:
            raise ModelLoadError(
                f"the Gemma 3 model has no usable image token: config.image_token_index is {token_id!r} but the "
                f"tokenizer has {vocab_size} tokens; use the processor files that came with the checkpoint"
            )
        for attribute in ("boi_token", "eoi_token", "image_token"):
            if not getattr(self.tokenizer, attribute, None):
                raise ModelLoadError(
                    f"the Gemma 3 tokenizer defines no {attribute}; use the processor files that came with the checkpoint"
                )
        return int(token_id)

    def prompt(self, question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        template = getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ModelLoadError("the Gemma 3 processor has no chat template; use the processor files of an instruction-tuned checkpoint")
        return self.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                  add_generation_prompt=True)

    def pixel_values(self, images: Sequence[Any]) -> dict[str, torch.Tensor]:
        # Pan-and-scan would add crops as extra images; one image per prompt keeps one block of tokens.
        out = self.processor.image_processor(images=list(images), do_pan_and_scan=False, return_tensors="pt")
        return {"pixel_values": out["pixel_values"]}

    def prompt_ids(self, prompts: Sequence[str], num_image_tokens: int) -> list[list[int]]:
        tok = self.tokenizer
        block = f"\n\n{tok.boi_token}{tok.image_token * num_image_tokens}{tok.eoi_token}\n\n"
        rows = []
        for text in prompts:
            count = text.count(tok.boi_token)
            if count != 1:
                raise ModelLoadError(
                    f"the prompt template produced {count} {tok.boi_token} markers, expected 1: {text!r}; "
                    "check the chat template of the processor"
                )
            # The Gemma chat template writes <bos> itself, so the tokenizer must not add a second one.
            add_special = not (tok.bos_token and text.startswith(tok.bos_token))
            rows.append(tok(text.replace(tok.boi_token, block), add_special_tokens=add_special)["input_ids"])
        return rows

    def answer_ids(self, answer: str) -> list[int]:
        """Tokenize an answer as the chat template ends a model turn: with ``<end_of_turn>`` when it exists."""
        ids = self.tokenizer(answer.strip(), add_special_tokens=False)["input_ids"]
        end_of_turn = self.tokenizer.convert_tokens_to_ids("<end_of_turn>")
        if end_of_turn is not None and end_of_turn != self.tokenizer.unk_token_id:
            return list(ids) + [end_of_turn]
        eos = self.tokenizer.eos_token_id
        return list(ids) + ([eos] if eos is not None else [])

    def special_token_ids(self) -> set[int]:
        # Chat-turn markers are added special tokens that all_special_ids leaves out.
        return super().special_token_ids() | added_special_ids(self.tokenizer)

    def image_features(self, model: Any, pixel_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        inner = unwrap_model(model)
        param = next(inner.model.multi_modal_projector.parameters())
        pixel_values = pixel_inputs["pixel_values"].to(param.device, param.dtype)
        out = inner.model.get_image_features(pixel_values=pixel_values, return_dict=True)
        return out.pooler_output                                                # (num_images, N, D)

    def per_token_extras(self) -> tuple[str, ...]:
        return (TOKEN_TYPE_IDS,)

    def sequence_extras(self, input_ids, attention_mask, image_token_mask, image_features, image_rows):
        return {TOKEN_TYPE_IDS: image_token_mask.long()}                        # (B, T), 1 at image tokens

    def _masks(self, inner: Any, inputs_embeds, attention_mask, position_ids, cache, extras) -> Any:
        """Build the per-layer-type masks as ``Gemma3Model.forward`` does (transformers 5.25)."""
        from transformers.models.gemma3 import modeling_gemma3

        if attention_mask.dim() == 4:
            raise NotImplementedError(
                "a custom 4D attention mask (the packed MLPO forward) with Gemma 3, whose image tokens attend "
                "bidirectionally; set shared_prefix=false to use one sequence per answer"
            )
        mask_kwargs = {
            "config": inner.config.get_text_config(),
            "inputs_embeds": inputs_embeds,
            "attention_mask": attention_mask,
            "cache": cache,
            "position_ids": position_ids,
        }
        token_type_ids = (extras or {}).get(TOKEN_TYPE_IDS)
        if token_type_ids is None:
            # Decode steps: text tokens only, plain causal masks over the cache.
            return modeling_gemma3.create_masks_for_generate(**mask_kwargs)
        block_ids = modeling_gemma3.get_block_sequence_ids_for_mask(token_type_ids, device=inputs_embeds.device)
        return modeling_gemma3.create_masks_for_vision_model(block_sequence_ids=block_ids, **mask_kwargs)

    def language_forward(self, model, inputs_embeds, attention_mask, position_ids, extras=None):
        inner = unwrap_model(model)
        masks = self._masks(inner, inputs_embeds, attention_mask, position_ids, None, extras)
        out = inner.model.language_model(
            inputs_embeds=inputs_embeds, attention_mask=masks, position_ids=position_ids, use_cache=False
        )
        return out.last_hidden_state

    def language_forward_cached(self, model, inputs_embeds, attention_mask, position_ids, cache=None, extras=None):
        from transformers import DynamicCache

        inner = unwrap_model(model)
        if cache is None:
            # The masks depend on the cache, so it must exist before they are built.
            cache = DynamicCache(config=inner.config.get_text_config())
        masks = self._masks(inner, inputs_embeds, attention_mask, position_ids, cache, extras)
        out = inner.model.language_model(
            inputs_embeds=inputs_embeds, attention_mask=masks, position_ids=position_ids, cache=cache, use_cache=True
        )
        return out.last_hidden_state, out.cache

    def lm_head(self, model: Any) -> torch.nn.Module:
        return unwrap_model(model).lm_head

    def embed_tokens(self, model: Any) -> torch.nn.Module:
        # Gemma scales embeddings by sqrt(hidden_size) inside this module, as the model's own forward does.
        return unwrap_model(model).get_input_embeddings()
