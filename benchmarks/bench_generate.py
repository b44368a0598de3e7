"""Throughput of preference-data generation: the batched pipeline against a naive baseline.

Both run in this process on the same tiny LLaVA (CLIP + Mistral, 64 image tokens per image) and
the same samples. The baseline does what a first implementation would: one sample at a time, the
vision tower inside every forward, separate full and dropped passes, one forward per candidate for
the reference log-probs, and one embedding call per text.

    python benchmarks/bench_generate.py [--samples 48] [--batch-size 16]

The last line printed is ``speedup: X.XX``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hscr.candidates import graded_candidates, vocab_info  # noqa: E402
from hscr.config import GenerateConfig  # noqa: E402
from hscr.contrast import draw_dropped_positions, sample_seed  # noqa: E402
from hscr.generate import GenerationSample, process_batch  # noqa: E402
from hscr.models import wrap_vlm  # noqa: E402
from hscr.models.tiny import TinySpec, build_tiny_llava  # noqa: E402
from hscr.rerank import get_embedder, rank_and_select  # noqa: E402

QUESTIONS = [
    ("is there a lesion in the left lung ?", "yes"),
    ("which organ is shown ?", "the left lung"),
    ("where is the abnormality located ?", "right upper lobe"),
    ("how many lesions are visible ?", "two"),
    ("what modality is this image ?", "x-ray"),
    ("is the heart enlarged ?", "no"),
]


def make_samples(count: int, num_images: int, size: int) -> list[GenerationSample]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")) for _ in range(num_images)]
    samples = []
    for index in range(count):
        question, answer = QUESTIONS[index % len(QUESTIONS)]
        image_index = index % num_images
        samples.append(GenerationSample(f"s{index}", images[image_index], f"img{image_index}", question, answer))
    return samples


@torch.no_grad()
def naive_sample(vlm, sample: GenerationSample, config: GenerateConfig, embedder) -> list[tuple[str, bool]]:
    """The baseline: every pass is a separate full model call, texts are embedded one by one."""
    adapter, model, tokenizer = vlm.adapter, vlm.model, vlm.tokenizer
    pixels = adapter.pixel_values([sample.image])["pixel_values"]
    inner = model
    num_tokens = inner.model.get_image_features(pixel_values=pixels, vision_feature_layer=inner.config.vision_feature_layer,
                                                vision_feature_select_strategy="default").pooler_output[0].shape[0]
    prompt = adapter.prompt_ids([adapter.prompt(sample.question)], num_tokens)[0]
    answer = adapter.answer_ids(sample.answer)
    ids = torch.tensor([prompt + answer])
    start, length = len(prompt), len(answer)

    # Full pass: the whole model, vision tower included.
    logits_full = model(input_ids=ids, pixel_values=pixels).logits[0, start - 1 : start - 1 + length].float()

    # Dropped pass: encode the image again, build embeddings, cut positions, run the language model.
    features = inner.model.get_image_features(pixel_values=pixels, vision_feature_layer=inner.config.vision_feature_layer,
                                              vision_feature_select_strategy="default").pooler_output[0]
    embeds = inner.get_input_embeddings()(ids)[0]
    image_mask = ids[0] == adapter.image_token_id
    embeds[image_mask] = features
    dropped = draw_dropped_positions(image_mask.unsqueeze(0), config.dropout_ratio, [sample_seed(sample.sample_id, config.seed)])[0]
    kept_embeds = embeds[~dropped].unsqueeze(0)
    logits_all = model(inputs_embeds=kept_embeds).logits[0]
    new_start = start - int(dropped.sum())
    logits_drop = logits_all[new_start - 1 : new_start - 1 + length].float()

    logp_full = torch.log_softmax(logits_full, -1)[torch.arange(length), torch.tensor(answer)]
    logp_drop = torch.log_softmax(logits_drop, -1)[torch.arange(length), torch.tensor(answer)]
    scores = (logp_full - logp_drop).tolist()
    cands, _, _ = graded_candidates(answer, scores, logits_full, logits_drop, tokenizer, vocab_info(tokenizer),
                                    config.num_coupled_tokens, config.beta, config.plausibility_alpha)

    # One embedding call per text.
    reference = embedder.encode([sample.answer])[0]
    sims = [float(embedder.encode([c.text])[0] @ reference) for c in cands]
    _, kept = rank_and_select(sims, config.num_dispreferred, config.min_similarity_gap)

    # One full forward per kept candidate for its reference log-prob.
    results = []
    for cand, flag in zip(cands, kept):
        if flag:
            cand_ids = adapter.answer_ids(cand.text)
            full_ids = torch.tensor([prompt + cand_ids])
            logits = model(input_ids=full_ids, pixel_values=pixels).logits[0, start - 1 : start - 1 + len(cand_ids)]
            logp = torch.log_softmax(logits.float(), -1)[torch.arange(len(cand_ids)), torch.tensor(cand_ids)].sum()
            assert math.isfinite(float(logp))
        results.append((cand.text, flag))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--images", type=int, default=16, help="distinct images (samples share them)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64, help="64 px with 8 px patches gives 64 image tokens")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, processor = build_tiny_llava(TinySpec(image_size=args.image_size, patch_size=8))
    vlm = wrap_vlm(model, processor, name="tiny")
    embedder = get_embedder()
    config = GenerateConfig(batch_size=args.batch_size)
    samples = make_samples(args.samples, args.images, args.image_size)
    print(f"torch threads: {torch.get_num_threads()}, image tokens: {(args.image_size // 8) ** 2}, samples: {len(samples)}")

    # Warm up both paths once.
    process_batch(vlm, samples[:2], config, embedder)
    naive_sample(vlm, samples[0], config, embedder)

    start = time.perf_counter()
    fast_results = []
    for offset in range(0, len(samples), config.batch_size):
        fast_results.extend(process_batch(vlm, samples[offset : offset + config.batch_size], config, embedder))
    fast_seconds = time.perf_counter() - start

    start = time.perf_counter()
    naive_results = [naive_sample(vlm, sample, config, embedder) for sample in samples]
    naive_seconds = time.perf_counter() - start

    same = all(
        [(c["text"], c["kept"]) for c in fast["candidates"][1:]] == naive
        for fast, naive in zip(fast_results, naive_results)
    )
    fast_rate = len(samples) / fast_seconds
    naive_rate = len(samples) / naive_seconds
    print(f"batched pipeline: {fast_rate:8.2f} samples/s ({fast_seconds:.2f} s)")
    print(f"naive baseline:   {naive_rate:8.2f} samples/s ({naive_seconds:.2f} s)")
    print(f"same candidates and kept flags: {same}")
    print(f"speedup: {fast_rate / naive_rate:.2f}")


if __name__ == "__main__":
    main()
