"""Convert an original LLaVA-Med v1.5 checkpoint into ``LlavaForConditionalGeneration`` format.

The official LLaVA-Med v1.5 release (``llava_mistral``) stores Mistral weights with the projector
as ``model.mm_projector.{0,2}.*`` and names the CLIP tower in ``mm_vision_tower``. The conversion
maps every source key to its Hugging Face name. It takes the CLIP weights from the checkpoint when
they are bundled (``model.vision_tower.vision_tower.vision_model.*``) and otherwise loads the tower
(``--vision-tower``, default: the name in the source config). It adds ``<image>`` and ``<pad>`` to
the tokenizer and pads the vocabulary. The processor it writes pads images to a square with the
CLIP mean colour before resizing, as the original preprocessing does.

    python -m hscr convert-llava-med llava-med-v1.5-mistral-7b llava-med-hf \\
        --vision-tower openai/clip-vit-large-patch14-336
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hscr.errors import HSCRError
from hscr.models.tiny import LLAVA_MED_CHAT_TEMPLATE

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"

# Source config keys the conversion cannot do without.
REQUIRED_CONFIG_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")

# Buffers that older checkpoints store but that transformers recomputes: rotary tables, and the
# CLIP position ids that transformers 4.3x saved with a bundled tower.
IGNORED_KEY = re.compile(
    r"^(model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"
    r"|model\.vision_tower\.vision_tower\.vision_model\.embeddings\.position_ids)$"
)
BUNDLED_TOWER_PREFIX = "model.vision_tower."

# (pattern, replacement) from original to Hugging Face LLaVA names, tried in order.
KEY_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^model\.embed_tokens\.(.+)$"), r"model.language_model.embed_tokens.\1"),
    (re.compile(r"^model\.layers\.(\d+)\.(.+)$"), r"model.language_model.layers.\1.\2"),
    (re.compile(r"^model\.norm\.(.+)$"), r"model.language_model.norm.\1"),
    (re.compile(r"^lm_head\.(.+)$"), r"lm_head.\1"),
    (re.compile(r"^model\.mm_projector\.0\.(weight|bias)$"), r"model.multi_modal_projector.linear_1.\1"),
    (re.compile(r"^model\.mm_projector\.2\.(weight|bias)$"), r"model.multi_modal_projector.linear_2.\1"),
    # Some LLaVA releases bundle the CLIP tower under the wrapper's `vision_tower` attribute.
    (re.compile(r"^model\.vision_tower\.vision_tower\.vision_model\.(.+)$"), r"model.vision_tower.\1"),
)


@dataclass
class ConversionReport:
    """Summary of one conversion: the key mapping, the vision tower and the vocabulary change."""

    source: str
    destination: str
    key_map: dict[str, str] = field(default_factory=dict)   # source key -> Hugging Face key
    ignored_keys: list[str] = field(default_factory=list)
    vision_tower: str = ""
    vision_tower_bundled: bool = False
    source_vocab_size: int = 0
    vocab_size: int = 0
    added_tokens: dict[str, int] = field(default_factory=dict)
    num_image_tokens: int = 0


def map_key(key: str) -> str | None:
    """Return the Hugging Face LLaVA name of an original LLaVA-Med key, or None when it is unknown."""
    for pattern, replacement in KEY_RULES:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    return None


def read_source_config(src: Path) -> dict[str, Any]:
    path = src / "config.json"
    if not path.is_file():
        raise HSCRError(f"{src} has no config.json; pass the folder of an original LLaVA-Med v1.5 checkpoint")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise HSCRError(f"{path} is not valid JSON: {exc}") from None
    model_type = config.get("model_type")
    if model_type in ("llava", "llava_next", "mistral"):
        raise HSCRError(
            f"{path} has model_type {model_type!r}, which is not an original LLaVA-Med checkpoint "
            "(expected 'llava_mistral'); a Hugging Face LLaVA checkpoint can be loaded directly without conversion"
        )
    missing = [key for key in REQUIRED_CONFIG_KEYS if key not in config]
    if missing:
        raise HSCRError(f"{path} is missing {', '.join(missing)}; it does not describe a Mistral-based LLaVA-Med model")
    projector = config.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise HSCRError(
            f"{path}: mm_projector_type {projector!r} is not supported; LLaVA-Med v1.5 uses 'mlp2x_gelu' "
            "(Linear, GELU, Linear), which is what LlavaForConditionalGeneration implements"
        )
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        raise HSCRError(f"{path}: mm_vision_select_feature {feature!r} is invalid; expected 'patch' or 'cls_patch'")
    return config


def load_source_state_dict(src: Path) -> dict[str, torch.Tensor]:
    """Read all weight files of ``src`` (safetensors or PyTorch ``.bin``, sharded or not)."""
    safetensor_files = sorted(src.glob("*.safetensors"))
    bin_files = sorted(p for p in src.glob("*.bin") if p.name.startswith("pytorch_model"))
    if not safetensor_files and not bin_files:
        raise HSCRError(f"no weights in {src}: expected *.safetensors or pytorch_model*.bin files")
    state: dict[str, torch.Tensor] = {}
    if safetensor_files:
        from safetensors.torch import load_file

        for path in safetensor_files:
            try:
                state.update(load_file(str(path)))
            except Exception as exc:  # safetensors raises its own error types for damaged files
                raise HSCRError(f"cannot read weights {path}: {exc}") from None
    else:
        for path in bin_files:
            try:
                state.update(torch.load(path, map_location="cpu", weights_only=True))
            except Exception as exc:  # pickle, zip and torch errors for damaged files
                raise HSCRError(f"cannot read weights {path}: {exc}") from None
    return state


def map_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Rename every source tensor; raises on a key that has no rule, listing a few of them."""
    mapped: dict[str, torch.Tensor] = {}
    key_map: dict[str, str] = {}
    ignored: list[str] = []
    unknown: list[str] = []
    for key, tensor in state.items():
        if IGNORED_KEY.match(key):
            ignored.append(key)
            continue
        target = map_key(key)
        if target is None:
            unknown.append(key)
            continue
        key_map[key] = target
        mapped[target] = tensor
    if unknown:
        raise HSCRError(
            f"{len(unknown)} weights have no known LLaVA-Med name, for example {unknown[:3]}; "
            "this converter handles llava_mistral checkpoints (Mistral layers plus model.mm_projector.*)"
        )
    return mapped, key_map, ignored


def load_vision_tower(name_or_path: str) -> tuple[Any, Any]:
    """Load the CLIP vision tower and its image processor settings (a local folder or a cached hub id)."""
    from transformers import CLIPVisionModel

    try:
        tower = CLIPVisionModel.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise HSCRError(
            f"cannot load the CLIP vision tower {name_or_path!r}: {exc}. Download it first (for example "
            "`huggingface-cli download openai/clip-vit-large-patch14-336`) or pass a local folder with --vision-tower"
        ) from None
    return tower, _clip_image_processor(name_or_path)


def _clip_image_processor(name_or_path: str) -> Any:
    try:
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil.from_pretrained(name_or_path)
    except (OSError, ValueError):
        return None  # a bare vision checkpoint or not cached: the CLIP defaults apply


def bundled_tower_config(name_or_path: str, mapped: dict[str, torch.Tensor]) -> Any:
    """Return the config of a tower whose weights the checkpoint bundles.

    The named tower's config is used when it can be read (a local folder or a cached hub id).
    Otherwise the sizes are read from the weights, assuming OpenAI CLIP's 64-dimensional heads and
    quick-GELU, which holds for the ViT-B/L towers that LLaVA models use.
    """
    from transformers import CLIPVisionConfig

    try:
        return CLIPVisionConfig.from_pretrained(name_or_path)
    except (OSError, ValueError):
        pass
    prefix = BUNDLED_TOWER_PREFIX
    patch = mapped[prefix + "embeddings.patch_embedding.weight"]                   # (hidden, 3, p, p)
    positions = mapped[prefix + "embeddings.position_embedding.weight"].shape[0]   # patches + CLS
    hidden, channels, patch_size = patch.shape[0], patch.shape[1], patch.shape[2]
    side = int(round((positions - 1) ** 0.5))
    layers = {int(k.split(".")[4]) for k in mapped if k.startswith(prefix + "encoder.layers.")}
    config = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=mapped[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=len(layers),
        num_attention_heads=hidden // 64,
        num_channels=channels,
        image_size=side * patch_size,
        patch_size=patch_size,
        hidden_act="quick_gelu",
    )
    logger.warning(
        "could not read the config of %s; inferred a CLIP tower from the bundled weights: %d layers, hidden %d, "
        "%d heads, %d px images, %d px patches", name_or_path, config.num_hidden_layers, hidden,
        config.num_attention_heads, config.image_size, patch_size,
    )
    return config


def _text_config(source: dict[str, Any], vocab_size: int, pad_token_id: int) -> Any:
    from transformers import MistralConfig

    return MistralConfig(
        vocab_size=vocab_size,
        hidden_size=source["hidden_size"],
        intermediate_size=source["intermediate_size"],
        num_hidden_layers=source["num_hidden_layers"],
        num_attention_heads=source["num_attention_heads"],
        num_key_value_heads=source.get("num_key_value_heads", source["num_attention_heads"]),
        head_dim=source.get("head_dim"),
        hidden_act=source.get("hidden_act", "silu"),
        max_position_embeddings=source.get("max_position_embeddings", 32768),
        rms_norm_eps=source.get("rms_norm_eps", 1e-5),
        rope_theta=source.get("rope_theta", 10000.0),
        sliding_window=source.get("sliding_window"),
        tie_word_embeddings=bool(source.get("tie_word_embeddings", False)),
        bos_token_id=source.get("bos_token_id", 1),
        eos_token_id=source.get("eos_token_id", 2),
        pad_token_id=pad_token_id,
    )


def _grow_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Append rows equal to the mean of the existing ones, so new tokens start as an average token."""
    extra = rows - weight.shape[0]
    if extra <= 0:
        return weight
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)       # (1, D)
    return torch.cat([weight, mean.expand(extra, -1)], dim=0)              # (rows, D)


def build_processor(tokenizer: Any, tower_config: Any, clip_processor: Any, strategy: str) -> Any:
    """LLaVA processor with pad-to-square preprocessing and the LLaVA-Med v1.5 chat template."""
    from transformers import LlavaImageProcessorPil, LlavaProcessor

    from hscr.models.tiny import CLIP_MEAN, CLIP_STD

    size = tower_config.image_size
    mean = list(getattr(clip_processor, "image_mean", None) or CLIP_MEAN)
    std = list(getattr(clip_processor, "image_std", None) or CLIP_STD)
    image_processor = LlavaImageProcessorPil(
        do_pad=True,   # expand to a square filled with the mean colour, then resize: LLaVA's "pad" aspect mode
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_center_crop=True,
        do_resize=True,
        do_normalize=True,
        image_mean=mean,
        image_std=std,
        do_convert_rgb=True,
    )
    # CLIP emits a CLS token; the processor must count it so that "default" (which drops it) matches.
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=tower_config.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,
        chat_template=LLAVA_MED_CHAT_TEMPLATE,
    )


def _prepare_destination(dst: Path, overwrite: bool) -> None:
    if dst.exists() and any(dst.iterdir()):
        if not overwrite:
            raise HSCRError(f"{dst} exists and is not empty; choose a new folder or pass --overwrite")
        if not (dst / "config.json").is_file():
            raise HSCRError(f"{dst} has no config.json, so it is not a converted checkpoint and is left as it is")


def convert_llava_med(
    src: str | Path,
    dst: str | Path,
    vision_tower: str | None = None,
    pad_to_multiple: int = 64,
    dtype: str = "auto",
    overwrite: bool = False,
) -> ConversionReport:
    """Convert ``src`` (original LLaVA-Med v1.5) into a Hugging Face LLaVA checkpoint in ``dst``.

    ``dtype`` ``auto`` keeps the source tensors' dtype; ``fp32``, ``bf16`` and ``fp16`` cast them.
    The result is written to a temporary sibling folder first and renamed, so a failed conversion
    leaves no partial checkpoint behind.
    """
    from transformers import AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise HSCRError(f"source folder not found: {src}")
    if pad_to_multiple < 1:
        raise HSCRError(f"invalid pad_to_multiple {pad_to_multiple}: expected a positive integer")
    casts = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in casts:
        raise HSCRError(f"invalid dtype {dtype!r}: expected one of {', '.join(casts)}")
    _prepare_destination(dst, overwrite)
    source = read_source_config(src)
    report = ConversionReport(source=str(src), destination=str(dst))

    # Weights: rename every key, load the tower when the checkpoint does not bundle it.
    state = load_source_state_dict(src)
    mapped, report.key_map, report.ignored_keys = map_state_dict(state)
    del state
    tower_name = vision_tower or source.get("mm_vision_tower")
    if not tower_name:
        raise HSCRError(f"{src / 'config.json'} names no mm_vision_tower; pass --vision-tower PATH_OR_ID")
    report.vision_tower = str(tower_name)
    report.vision_tower_bundled = any(k.startswith(BUNDLED_TOWER_PREFIX) for k in mapped)
    if report.vision_tower_bundled:
        # The bundled weights are the ones the model was trained with; the named tower gives settings only.
        tower_config = bundled_tower_config(str(tower_name), mapped)
        clip_processor = _clip_image_processor(str(tower_name))
    else:
        tower, clip_processor = load_vision_tower(str(tower_name))
        tower_config = tower.config
        for key, tensor in tower.state_dict().items():
            # transformers 4.x names the tower's weights `vision_model.*`, 5.x without the prefix.
            mapped[BUNDLED_TOWER_PREFIX + key.removeprefix("vision_model.")] = tensor
        del tower

    # Tokenizer: add the image placeholder and a pad token, then pad the vocabulary.
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src))
    except ImportError as exc:
        # The official release ships only a SentencePiece tokenizer.model, which needs both packages.
        raise HSCRError(
            f"cannot read the tokenizer in {src}: {exc}; install the packages with `pip install sentencepiece protobuf`"
        ) from None
    except (OSError, ValueError, TypeError) as exc:
        raise HSCRError(f"cannot load the tokenizer in {src}: {exc}") from None
    embed_key = "model.language_model.embed_tokens.weight"
    if embed_key not in mapped or "lm_head.weight" not in mapped:
        raise HSCRError(f"{src} has no model.embed_tokens.weight or lm_head.weight; the checkpoint is incomplete")
    report.source_vocab_size = mapped[embed_key].shape[0]
    tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    report.added_tokens = {IMAGE_TOKEN: tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                           tokenizer.pad_token: tokenizer.pad_token_id}
    needed = max(len(tokenizer), report.source_vocab_size)
    report.vocab_size = -(-needed // pad_to_multiple) * pad_to_multiple
    mapped[embed_key] = _grow_rows(mapped[embed_key], report.vocab_size)
    mapped["lm_head.weight"] = _grow_rows(mapped["lm_head.weight"], report.vocab_size)

    # Config and model: built on the meta device, so a 7B model never exists twice in memory.
    select_feature = source.get("mm_vision_select_feature", "patch")
    strategy = "default" if select_feature == "patch" else "full"
    config = LlavaConfig(
        vision_config=tower_config.to_dict(),
        text_config=_text_config(source, report.vocab_size, tokenizer.pad_token_id).to_dict(),
        image_token_index=report.added_tokens[IMAGE_TOKEN],
        vision_feature_layer=int(source.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=bool(source.get("tie_word_embeddings", False)),
    )
    cast = casts[dtype]
    if cast is not None:
        mapped = {k: v.to(cast) if v.is_floating_point() else v for k, v in mapped.items()}
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    expected = set(model.state_dict())
    missing = sorted(expected - set(mapped))
    unexpected = sorted(set(mapped) - expected)
    if missing or unexpected:
        raise HSCRError(
            f"the converted weights do not match LlavaForConditionalGeneration: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}; check that {src} is a complete llava_mistral checkpoint"
        )
    for key, tensor in mapped.items():
        target_shape = model.state_dict()[key].shape
        if tuple(tensor.shape) != tuple(target_shape):
            raise HSCRError(
                f"weight {key} has shape {tuple(tensor.shape)} but the config implies {tuple(target_shape)}; "
                f"check hidden sizes in {src / 'config.json'} and that --vision-tower is the tower the model was trained with"
            )
    model.load_state_dict(mapped, strict=True, assign=True)
    del mapped
    _materialize_buffers(model)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    processor = build_processor(tokenizer, tower_config, clip_processor, strategy)
    report.num_image_tokens = (tower_config.image_size // tower_config.patch_size) ** 2 + (0 if strategy == "default" else 1)

    # Write next to the destination, then rename: no half-written checkpoint on failure.
    staging = dst.with_name(dst.name + ".converting")
    if staging.exists():
        shutil.rmtree(staging)
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        (staging / "hscr_conversion.json").write_text(
            json.dumps({"source": str(src), "vision_tower": report.vision_tower,
                        "source_vocab_size": report.source_vocab_size, "vocab_size": report.vocab_size,
                        "added_tokens": report.added_tokens}, indent=2),
            encoding="utf-8",
        )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if dst.exists():
        shutil.rmtree(dst)
    staging.rename(dst)
    logger.info("converted %s to %s (%d keys, vocabulary %d -> %d)", src, dst, len(report.key_map),
                report.source_vocab_size, report.vocab_size)
    return report


def _materialize_buffers(model: torch.nn.Module) -> None:
    """Recreate non-persistent buffers (rotary tables, position ids) that the meta device left empty."""
    meta = [name for name, buffer in model.named_buffers() if buffer.is_meta]
    if not meta:
        return
    # Building the small modules that own these buffers on CPU gives their real values.
    for module_name, module in model.named_modules():
        for buffer_name, buffer in list(module.named_buffers(recurse=False)):
            if not buffer.is_meta:
                continue
            fresh = _fresh_buffer(module, buffer_name)
            if fresh is None:
                raise HSCRError(f"cannot initialise buffer {module_name}.{buffer_name} after conversion")
            module.register_buffer(buffer_name, fresh, persistent=buffer_name not in module._non_persistent_buffers_set)


def _fresh_buffer(module: torch.nn.Module, name: str) -> torch.Tensor | None:
    config = getattr(module, "config", None)
    if config is not None:
        with torch.device("cpu"):
            rebuilt = type(module)(config)
        return getattr(rebuilt, name, None)
    return None
