"""Tiny LLaVA models built offline from configs, for tests, benchmarks and the demo.

They use the classes of the LLaVA-Med conversion (``LlavaForConditionalGeneration`` with a CLIP
vision tower and a Mistral language model), a tokenizer built with the ``tokenizers`` library
and a ``LlavaProcessor``, so every code path that loads a real checkpoint runs on them too.

    from hscr.models.tiny import build_tiny_llava
    model, processor = build_tiny_llava(image_size=64, patch_size=8)   # 64 image tokens
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

# LLaVA-Med v1.5 prompt: `[INST] <image>\n{question} [/INST]`, no system prompt.
LLAVA_MED_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST] "
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% endif %}"
    "{% endfor %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %} [/INST]"
    "{% elif message['role'] == 'assistant' %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %} {{ item['text'] }}{% endif %}{% endfor %}</s>"
    "{% endif %}"
    "{% endfor %}"
)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "[INST]", "[/INST]"]

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

DEFAULT_CORPUS = (
    "is there a lesion in the left lung ? yes . no . the right upper lobe shows a nodule . "
    "what modality is this image ? x-ray ct mri ultrasound . which organ is shown ? chest brain "
    "lung liver kidney heart abdomen . how many lesions are visible ? one two three four zero . "
    "where is the abnormality located ? upper lower middle left right central peripheral lobe zone . "
    "is the heart enlarged ? cardiomegaly pneumonia effusion pneumothorax atelectasis edema mass "
    "hemorrhage infarct tumor normal abnormal small large round irregular bright dark dense "
    "transverse coronal sagittal plane axial t1 t2 flair contrast enhancement fracture"
)


@dataclass
class TinySpec:
    """Sizes of a tiny LLaVA; the defaults give 64 image tokens and about 0.3M parameters."""

    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 128
    max_positions: int = 1024
    tokenizer: str = "bpe"  # "bpe" (Metaspace sub-words, like Mistral) or "word" (one token per word)
    bpe_vocab_size: int = 160
    seed: int = 0

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def build_tokenizer(kind: str = "bpe", corpus: str | Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 160):
    """Build a fast tokenizer offline with the ``tokenizers`` library.

    ``bpe`` splits on whitespace with a Metaspace marker (``▁``) like Mistral's SentencePiece
    tokenizer, so words can become several sub-word tokens; ``word`` maps each word to one token.
    Both add ``<s>`` at the start of a sequence, as Mistral's tokenizer does.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [corpus] if isinstance(corpus, str) else list(corpus)
    if kind == "word":
        words: list[str] = []
        seen = set(SPECIAL_TOKENS)
        for text in texts:
            for word in text.split():
                if word not in seen:
                    seen.add(word)
                    words.append(word)
        vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + words)}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    elif kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}: expected 'bpe' or 'word'")

    # The prompt has a newline after <image>; both tokenizers treat it as a plain space.
    tok.normalizer = normalizers.Replace("\n", " ")
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<image>", "[INST]", "[/INST]"],
        padding_side="right",
        model_max_length=1024,
    )
    fast.chat_template = LLAVA_MED_CHAT_TEMPLATE
    return fast


def build_processor(tokenizer, spec: TinySpec):
    from transformers import LlavaProcessor

    try:  # the PIL backend; the default one needs torchvision, which this project does not install
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor

    image_processor = ImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        do_center_crop=True,
        do_resize=True,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )
    # A CLIP tower emits a CLS token that the "default" strategy drops again, so the processor
    # must count it, or it expands <image> to one token fewer than the projector emits.
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_MED_CHAT_TEMPLATE,
    )


def build_llava_config(tokenizer, spec: TinySpec):
    from transformers import CLIPVisionConfig, LlavaConfig, MistralConfig

    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 4,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        num_channels=3,
    )
    text = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=spec.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        sliding_window=None,
        tie_word_embeddings=False,
    )
    # vision_feature_layer=-1: with the LLaVA default (-2) the last CLIP layer gets no gradient,
    # which wastes it in a model trained from scratch.
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id,
    )
    config.tie_word_embeddings = False
    return config


def build_tiny_llava(
    spec: TinySpec | None = None,
    corpus: str | Sequence[str] = DEFAULT_CORPUS,
    **overrides,
):
    """Build a randomly initialised tiny ``LlavaForConditionalGeneration`` and its processor."""
    import torch
    from transformers import LlavaForConditionalGeneration

    spec = spec or TinySpec()
    for name, value in overrides.items():
        if not hasattr(spec, name):
            raise TypeError(f"unknown TinySpec field {name!r}")
        setattr(spec, name, value)
    tokenizer = build_tokenizer(spec.tokenizer, corpus, spec.bpe_vocab_size)
    processor = build_processor(tokenizer, spec)
    config = build_llava_config(tokenizer, spec)
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(config)
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model, processor
