"""Tiny randomly initialised models of the non-LLaVA-1.5 families, built offline from configs.

Each builder returns ``(model, processor)`` with the real transformers classes of the family, a
byte-level BPE tokenizer carrying the family's special tokens and a chat template of the same
shape as the released checkpoints'.
"""

from __future__ import annotations

import torch

CORPUS = (
    "is there a lesion in the left lung ? yes no . the right upper lobe shows a nodule . what modality "
    "is this image ? x-ray ct mri . which organ is shown ? chest brain liver heart . how many lesions ? one two"
)

GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<start_of_image>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

LLAVA_QWEN2_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

LLAVA_NEXT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST] "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    " [/INST]"
    "{% elif message['role'] == 'assistant' %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %} {{ item['text'] }}{% endif %}{% endfor %}</s>"
    "{% endif %}"
    "{% endfor %}"
)


def byte_level_tokenizer(special_tokens: list[str], bos: str | None, eos: str, pad: str, unk: str | None = None,
                         named: dict[str, str] | None = None, vocab_size: int = 300):
    """A byte-level BPE tokenizer (every character encodable, newlines included) with special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer=trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    kwargs = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="right", model_max_length=4096,
                                   **{k: v for k, v in kwargs.items() if v is not None},
                                   extra_special_tokens=named or {})
    return fast


def build_tiny_gemma3(seed: int = 0, image_size: int = 32, patch_size: int = 4, tokens_per_image: int = 16):
    """A tiny ``Gemma3ForConditionalGeneration`` (SigLIP + Gemma 3 text), 16 image tokens by default."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    tokenizer = byte_level_tokenizer(
        specials, bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>",
        named={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    )
    tokenizer.chat_template = GEMMA3_TEMPLATE
    image_processor = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                chat_template=GEMMA3_TEMPLATE, image_seq_length=tokens_per_image)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=image_size, patch_size=patch_size, vision_use_head=False)
    text = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    config = Gemma3Config(
        vision_config=vision, text_config=text, mm_tokens_per_image=tokens_per_image,
        boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    _set_generation_ids(model, tokenizer)
    # Released Gemma 3 chat models stop at <eos> or at the <end_of_turn> that closes a model turn.
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    return model, processor


def build_tiny_llava_next(seed: int = 0, tile_size: int = 16, patch_size: int = 4):
    """A tiny ``LlavaNextForConditionalGeneration`` (CLIP + Mistral) with 1x2, 2x1 and 2x2 tile grids."""
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
        MistralConfig,
    )

    from hscr.models.tiny import CLIP_MEAN, CLIP_STD, build_tokenizer

    tokenizer = build_tokenizer("bpe", CORPUS, 160)
    tokenizer.chat_template = LLAVA_NEXT_TEMPLATE
    pinpoints = [[tile_size, 2 * tile_size], [2 * tile_size, tile_size], [2 * tile_size, 2 * tile_size]]
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile_size}, crop_size={"height": tile_size, "width": tile_size},
        image_grid_pinpoints=pinpoints, image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=LLAVA_NEXT_TEMPLATE,
    )
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=tile_size, patch_size=patch_size)
    text = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, sliding_window=None, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaNextConfig(
        vision_config=vision, text_config=text, image_grid_pinpoints=pinpoints,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default", tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    _set_generation_ids(model, tokenizer)
    return model, processor


def build_tiny_qwen2_vl(seed: int = 0, version: str = "2", patch_size: int = 4):
    """A tiny ``Qwen2VLForConditionalGeneration`` (or Qwen2.5-VL with ``version="2.5"``).

    Images are resized to multiples of 8 pixels (patch 4, 2x2 merge) between 16x16 and 48x48.
    """
    import transformers
    from transformers import Qwen2VLImageProcessorPil

    _ImageOnlyQwen2VLProcessor = _image_only_processor_class()

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tokenizer = byte_level_tokenizer(specials, bos=None, eos="<|im_end|>", pad="<|endoftext|>")
    tokenizer.chat_template = QWEN2_VL_TEMPLATE
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 16 * 16, "longest_edge": 48 * 48}, patch_size=patch_size, merge_size=2,
        temporal_patch_size=2,
    )
    processor = _ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                           chat_template=QWEN2_VL_TEMPLATE)
    text = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    token_ids = dict(
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    if version == "2":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=patch_size,
                      spatial_merge_size=2, temporal_patch_size=2)
        config = transformers.Qwen2VLConfig(vision_config=vision, text_config=text, **token_ids)
        model_class = transformers.Qwen2VLForConditionalGeneration
    elif version == "2.5":
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2,
                      patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                      fullatt_block_indexes=[1])
        config = transformers.Qwen2_5_VLConfig(vision_config=vision, text_config=text, **token_ids)
        model_class = transformers.Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(f"unknown Qwen2-VL version {version!r}: expected '2' or '2.5'")
    config.tie_word_embeddings = False
    torch.manual_seed(seed)
    model = model_class(config).eval()
    _set_generation_ids(model, tokenizer)
    return model, processor


def build_tiny_llava_qwen2(seed: int = 0, image_size: int = 32, patch_size: int = 8):
    """A tiny ``LlavaForConditionalGeneration`` with a Qwen2 text model, the layout of HuatuoGPT-Vision-7B-hf."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        Qwen2Config,
    )

    from hscr.models.tiny import CLIP_MEAN, CLIP_STD

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
    tokenizer = byte_level_tokenizer(specials, bos=None, eos="<|im_end|>", pad="<|endoftext|>")
    tokenizer.chat_template = LLAVA_QWEN2_TEMPLATE
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_QWEN2_TEMPLATE)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=patch_size)
    text = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    _set_generation_ids(model, tokenizer)
    return model, processor


def _image_only_processor_class():
    from transformers import Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        """Qwen2-VL processor without a video processor, whose base class needs torchvision (not installed)."""

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyQwen2VLProcessor


def build_tiny_qwen2_5_vl(seed: int = 0):
    return build_tiny_qwen2_vl(seed, version="2.5")


def _set_generation_ids(model, tokenizer) -> None:
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
