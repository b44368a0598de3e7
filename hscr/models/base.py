"""The family-adapter interface and the loaded-model bundle.

The method code (contrast, candidates, training, evaluation) never touches a model family's
internals. It asks a :class:`FamilyAdapter` to build the token ids of a prompt, to encode images
once, to place image features into the input embeddings, and to run the language model on
embeddings with the per-token tensors that the family needs. A new family is a new adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch


@dataclass
class EncodedPrompts:
    """Token ids of prompts with their image placeholders expanded (right-padded lists)."""

    input_ids: list[list[int]]          # one list per row, image placeholders already expanded
    image_rows: list[int]               # row -> index into the image features tensor
    extras: dict[str, Any] = field(default_factory=dict)


class FamilyAdapter:
    """The image-token layout and language-model call of one model family."""

    name = "base"
    architectures: tuple[str, ...] = ()
    # False where the packed MLPO forward (a block attention mask over prefix + all answers) does
    # not fit the family's per-token tensors; training then runs one sequence per answer.
    supports_packed_prefix = True

    def __init__(self, model: Any, processor: Any):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.image_token_id = self.find_image_token_id(model)

    # -- what a family must provide ------------------------------------------------------------

    def find_image_token_id(self, model: Any) -> int:
        raise NotImplementedError

    def prompt(self, question: str) -> str:
        """Return the chat-formatted prompt text for one image and ``question``."""
        raise NotImplementedError

    def pixel_values(self, images: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Preprocess images; returns the tensors that :meth:`image_features` takes."""
        raise NotImplementedError

    def prompt_ids(self, prompts: Sequence[str], num_image_tokens: int) -> list[list[int]]:
        """Tokenize prompts with every image placeholder expanded to the image's token count."""
        raise NotImplementedError

    def image_features(self, model: Any, pixel_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run the vision tower and projector once: ``(num_images, N, D)``."""
        raise NotImplementedError

    def language_forward(
        self,
        model: Any,
        inputs_embeds: torch.Tensor,          # (B, T, D)
        attention_mask: torch.Tensor,         # (B, T)
        position_ids: torch.Tensor,           # (B, T)
        extras: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run the language model on embeddings; returns hidden states ``(B, T, D)``."""
        raise NotImplementedError

    def language_forward_cached(
        self,
        model: Any,
        inputs_embeds: torch.Tensor,          # (B, T_new, D)
        attention_mask: torch.Tensor,         # (B, T_cached + T_new)
        position_ids: torch.Tensor,           # (B, T_new)
        cache: Any = None,
        extras: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """Run the language model with a key/value cache (None starts one).

        Returns the hidden states of the new tokens ``(B, T_new, D)`` and the updated cache.
        """
        raise NotImplementedError(f"the {self.name} adapter does not support cached decoding")

    def lm_head(self, model: Any) -> torch.nn.Module:
        raise NotImplementedError

    def embed_tokens(self, model: Any) -> torch.nn.Module:
        raise NotImplementedError

    # -- hooks with defaults for fixed-layout families like LLaVA 1.5 ----------------------------

    # True for families whose image token count depends on the image size (LLaVA-NeXT, Qwen2-VL).
    # Their image features are padded to the largest count in the batch, and ``build_batch`` fits
    # each prompt's run of placeholders to its own image's count.
    variable_image_tokens = False

    def image_token_counts(self, image_features: torch.Tensor) -> list[int]:
        """Image tokens of each image in ``image_features`` ``(U, N, D)``; rows past a count are padding."""
        layout = image_layout(image_features)
        if layout is not None:
            return list(layout.token_counts)
        if self.variable_image_tokens:
            raise ValueError(
                f"the {self.name} image features carry no token counts; pass the tensor that encode_images "
                "returned on unchanged (a copy made with .to() or indexing drops them)"
            )
        return [int(image_features.shape[1])] * int(image_features.shape[0])

    def sequence_extras(
        self,
        input_ids: torch.Tensor,              # (B, T), right-padded, placeholders expanded
        attention_mask: torch.Tensor,         # (B, T)
        image_token_mask: torch.Tensor,       # (B, T) bool
        image_features: torch.Tensor,         # (U, N, D)
        image_rows: Sequence[int],            # row -> index into image_features
    ) -> dict[str, torch.Tensor]:
        """Build the family-specific per-token tensors ``(B, T, ...)`` of a batch.

        Dropout cuts them with the tokens, decoding left-aligns them, and ``language_forward``
        receives them as ``extras``. The default family needs none.
        """
        return {}

    # -- shared helpers ------------------------------------------------------------------------

    def per_token_extras(self) -> tuple[str, ...]:
        """Names of family-specific per-token tensors that dropout must cut with the tokens."""
        return ()

    def answer_ids(self, answer: str) -> list[int]:
        """Tokenize an answer as it follows the prompt, ending with EOS."""
        ids = self.tokenizer(answer.strip(), add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        return list(ids) + ([eos] if eos is not None else [])

    def special_token_ids(self) -> set[int]:
        ids = set(self.tokenizer.all_special_ids)
        ids.add(self.image_token_id)
        return ids


@dataclass
class ImageLayout:
    """Per-image facts that a variable-layout family attaches to its image-features tensor."""

    token_counts: list[int]                                  # real image tokens per image
    grids: list[tuple[int, int, int]] | None = None          # (t, h, w) patch grid per image, Qwen2-VL
    image_sizes: list[tuple[int, int]] | None = None         # (height, width) of each original image


_LAYOUT_ATTRIBUTE = "_hscr_image_layout"


def attach_image_layout(image_features: torch.Tensor, layout: ImageLayout) -> torch.Tensor:
    """Attach ``layout`` to ``image_features`` and return the same tensor.

    The callers of ``encode_images`` pass the returned tensor on to ``build_batch`` unchanged, so
    the layout travels with it. A copy made with ``.to()`` or indexing loses the layout.
    """
    setattr(image_features, _LAYOUT_ATTRIBUTE, layout)
    return image_features


def image_layout(image_features: torch.Tensor) -> ImageLayout | None:
    """Return the layout attached by :func:`attach_image_layout`, or None."""
    return getattr(image_features, _LAYOUT_ATTRIBUTE, None)


def added_special_ids(tokenizer: Any) -> set[int]:
    """Return the ids of every added token flagged special, such as chat-turn markers.

    ``all_special_ids`` lists only the named special tokens, which in Gemma 3 and Qwen2-VL
    tokenizers leaves out markers like ``<end_of_turn>`` and ``<|im_start|>``.
    """
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return {int(token_id) for token_id, token in decoder.items() if getattr(token, "special", False)}


def unwrap_model(model: Any) -> Any:
    """Return the transformers model under a PEFT or DDP wrapper (LoRA layers stay in place)."""
    inner = model
    for _ in range(4):
        if hasattr(inner, "module") and isinstance(getattr(inner, "module"), torch.nn.Module):
            inner = inner.module  # DDP / FSDP wrapper
        elif hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()  # PeftModel
        else:
            break
    return inner


@dataclass
class VLM:
    """A loaded vision-language model with its processor and family adapter."""

    model: Any
    processor: Any
    adapter: FamilyAdapter
    name: str
    device: torch.device
    dtype: torch.dtype

    @property
    def tokenizer(self) -> Any:
        return self.adapter.tokenizer
