"""``python -m hscr convert-llava-med``: turn an original LLaVA-Med v1.5 checkpoint into Hugging Face format.

    python -m hscr convert-llava-med llava-med-v1.5-mistral-7b llava-med-hf \\
        --vision-tower openai/clip-vit-large-patch14-336
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert-llava-med",
        help="convert an original LLaVA-Med v1.5 (llava_mistral) checkpoint to LlavaForConditionalGeneration",
    )
    parser.add_argument("src", metavar="SRC", help="folder of the original checkpoint (config.json, weights, tokenizer)")
    parser.add_argument("dst", metavar="DST", help="new folder for the converted checkpoint")
    parser.add_argument("--vision-tower", metavar="PATH_OR_ID",
                        help="CLIP vision tower folder or cached hub id (default: mm_vision_tower of the source config)")
    parser.add_argument("--pad-to-multiple", type=int, default=64,
                        help="pad the vocabulary to a multiple of this many tokens (default 64)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="weight dtype of the output (default: keep the source dtype)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it holds a converted checkpoint")
    parser.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    from hscr.models.convert_llava_med import convert_llava_med

    report = convert_llava_med(
        args.src, args.dst, vision_tower=args.vision_tower, pad_to_multiple=args.pad_to_multiple,
        dtype=args.dtype, overwrite=args.overwrite,
    )
    tower = "bundled in the checkpoint" if report.vision_tower_bundled else f"from {report.vision_tower}"
    print(
        f"converted {report.source} -> {report.destination}: {len(report.key_map)} weights mapped, "
        f"vision tower {tower}, vocabulary {report.source_vocab_size} -> {report.vocab_size} "
        f"(<image> = {report.added_tokens.get('<image>')}), {report.num_image_tokens} image tokens per image"
    )
    print(f"load it with: python -m hscr generate --model {report.destination} ...")
    return 0
