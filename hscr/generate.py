"""Turn (image, question, reference answer) samples into ranked preference data.

For each batch of samples: the vision tower runs once per unique image, the full and dropped
teacher-forced passes run in one forward call, graded dispreferred answers are built from the
coupling scores, all texts of the batch are embedded in one call, and the reference log-probs of
every kept answer come from one more batched forward that reuses the image features.

    python -m hscr generate --model data/demo/model --db data/hscr.duckdb --dataset demo
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from hscr.candidates import Candidate, decode_answer, graded_candidates, vocab_info
from hscr.config import GenerateConfig
from hscr.contrast import apply_dropout, contrast, draw_dropped_positions, sample_seed
from hscr.errors import DataError
from hscr.models.base import VLM
from hscr.rerank import cosine_to_reference, get_embedder, rank_and_select
from hscr.sequences import answer_logits, build_batch, encode_images, sequence_logps
from hscr.store import Store

logger = logging.getLogger(__name__)


@dataclass
class GenerationSample:
    """One sample ready for the pipeline."""

    sample_id: str
    image: Any                 # PIL image
    image_key: str             # samples sharing an image share its features
    question: str
    answer: str


def generation_run_id(model_name: str, config: GenerateConfig) -> str:
    """Runs with the same model and method settings share an id, so a re-run skips finished samples."""
    raw = json.dumps({"model": model_name, **config.method_key()}, sort_keys=True)
    return "gen-" + hashlib.sha256(raw.encode("utf-8")).hexdigest()[:12]


def _unique_images(samples: Sequence[GenerationSample]) -> tuple[list[Any], list[int]]:
    keys: dict[str, int] = {}
    images: list[Any] = []
    rows: list[int] = []
    for sample in samples:
        if sample.image_key not in keys:
            keys[sample.image_key] = len(images)
            images.append(sample.image)
        rows.append(keys[sample.image_key])
    return images, rows


@torch.no_grad()
def _greedy_under_dropout(
    vlm: VLM,
    prompt: list[int],
    prefixes: list[list[int]],
    features: torch.Tensor,
    image_row: int,
    seed: int,
    config: GenerateConfig,
) -> list[list[int]]:
    """Continue each prefix greedily under the dropped image until EOS (the ``redecode`` option)."""
    from hscr.decoding import eos_token_ids

    adapter, model = vlm.adapter, vlm.model
    stop_ids = eos_token_ids(vlm)  # the tokenizer's EOS plus turn ends such as Gemma's <end_of_turn>
    pad = adapter.tokenizer.pad_token_id or 0
    outputs = [list(p) for p in prefixes]
    active = [True] * len(outputs)
    for _ in range(config.max_new_tokens):
        rows = [i for i, a in enumerate(active) if a]
        if not rows:
            break
        # A placeholder token after the prefix makes the last answer logit predict the next token.
        batch = build_batch(adapter, model, [prompt] * len(rows), [outputs[i] + [pad] for i in rows],
                            features, [image_row] * len(rows))
        dropped = draw_dropped_positions(batch.image_token_mask, config.dropout_ratio, [seed] * len(rows))
        batch = apply_dropout(batch, dropped, config.dropout_mode)
        logits = answer_logits(adapter, model, batch)                     # (R, A, V)
        for slot, i in enumerate(rows):
            next_id = int(logits[slot, len(outputs[i])].argmax())
            outputs[i].append(next_id)
            if next_id in stop_ids:
                active[i] = False
    return outputs


def _redecode(vlm: VLM, cands: list[Candidate], prompt, features, image_row, seed, config) -> list[Candidate]:
    """Keep each candidate up to its last replaced word, then let the dropped-image model finish it."""
    if not cands:
        return cands
    prefixes = []
    for cand in cands:
        last = cand.token_positions[-1]
        prefixes.append(cand.token_ids[: last + 1])
    finished = _greedy_under_dropout(vlm, prompt, prefixes, features, image_row, seed, config)
    result, seen = [], set()
    for cand, ids in zip(cands, finished):
        text = decode_answer(vlm.tokenizer, ids)
        if not text or text in seen:
            continue
        seen.add(text)
        result.append(Candidate(text, ids, cand.num_replaced, cand.replaced_positions, cand.replaced_tokens,
                                cand.token_positions))
    return result


def process_batch(
    vlm: VLM,
    samples: Sequence[GenerationSample],
    config: GenerateConfig,
    embedder: Any | None = None,
) -> list[dict[str, Any]]:
    """Run method steps 1-8 on a batch; returns one result dict per sample (see ``Store.write_generation``)."""
    adapter, model, tokenizer = vlm.adapter, vlm.model, vlm.tokenizer
    images, image_rows = _unique_images(samples)
    features = encode_images(adapter, model, images)                        # (U, N, D)
    num_image_tokens = features.shape[1]

    answers = [s.answer for s in samples]
    model_answers: list[str | None] = [None] * len(samples)
    if config.preferred == "greedy":
        from hscr.decoding import greedy_generate

        model_answers = greedy_generate(vlm, [s.image for s in samples], [s.question for s in samples],
                                        max_new_tokens=config.max_new_tokens, batch_size=config.batch_size)
        answers = [a if a.strip() else s.answer for a, s in zip(model_answers, samples)]

    prompt_ids = adapter.prompt_ids([adapter.prompt(s.question) for s in samples], num_image_tokens)
    answer_ids = [adapter.answer_ids(a) for a in answers]
    limit = context_window(vlm)
    for sample, prompt, answer in zip(samples, prompt_ids, answer_ids):
        if limit is not None and len(prompt) + len(answer) > limit:
            raise DataError(
                f"sample {sample.sample_id} needs {len(prompt) + len(answer)} tokens with its image, over the "
                f"model's context window of {limit} tokens; shorten the question or remove the sample"
            )
    batch = build_batch(adapter, model, prompt_ids, answer_ids, features, image_rows)
    seeds = [sample_seed(s.sample_id, config.seed) for s in samples]
    result = contrast(adapter, model, batch, seeds, config.dropout_ratio, config.dropout_mode)
    scores = result.coupling_scores                                          # (B, A)
    info = vocab_info(tokenizer)

    per_sample: list[dict[str, Any]] = []
    all_texts: list[str] = []
    for row, sample in enumerate(samples):
        length = len(answer_ids[row])
        row_scores = scores[row, :length].tolist()
        cands, coupled, replacements = graded_candidates(
            answer_ids[row], row_scores, result.logits_full[row, :length], result.logits_drop[row, :length],
            tokenizer, info, config.num_coupled_tokens, config.beta, config.plausibility_alpha,
        )
        if config.replacement == "redecode":
            cands = _redecode(vlm, cands, prompt_ids[row], features, image_rows[row], seeds[row], config)
        coupled_positions = {i for span in coupled for i in range(span.start, span.end)}
        tokens = []
        for position in range(length):
            token_id = answer_ids[row][position]
            replacement = replacements.get(position)
            tokens.append({
                "position": position,
                "token": tokenizer.convert_ids_to_tokens(token_id),
                "text": tokenizer.decode([token_id]),
                "score": row_scores[position],
                "p_full": math.exp(float(result.logp_full[row, position])),
                "p_drop": math.exp(float(result.logp_drop[row, position])),
                "coupled": position in coupled_positions,
                "replacement": tokenizer.convert_ids_to_tokens(replacement) if replacement is not None else None,
            })
        reference_text = answers[row].strip()
        per_sample.append({"cands": cands, "tokens": tokens, "reference": reference_text,
                           "text_offset": len(all_texts)})
        all_texts.append(reference_text)
        all_texts.extend(c.text for c in cands)

    # Step 7: one embedding call for every text of the batch.
    embedder = embedder or get_embedder(config.embedder)
    vectors = embedder.encode(all_texts)

    # Step 8: reference log-probs of the kept answers in one batched forward; y_w's comes from the
    # full pass above.
    ref_rows: list[tuple[int, int]] = []
    for row, item in enumerate(per_sample):
        offset = item["text_offset"]
        sims = cosine_to_reference(vectors[offset], vectors[offset + 1 : offset + 1 + len(item["cands"])])
        ranks, kept = rank_and_select(sims, config.num_dispreferred, config.min_similarity_gap)
        item["sims"], item["ranks"], item["kept"] = sims, ranks, kept
        item["ref_logps"] = [None] * len(item["cands"])
        ref_rows.extend((row, k) for k, flag in enumerate(kept) if flag)
    for start in range(0, len(ref_rows), max(config.batch_size * 2, 1)):
        chunk = ref_rows[start : start + config.batch_size * 2]
        ref_batch = build_batch(
            adapter, model,
            [prompt_ids[row] for row, _ in chunk],
            [adapter.answer_ids(per_sample[row]["cands"][k].text) for row, k in chunk],
            features,
            [image_rows[row] for row, _ in chunk],
        )
        logps = sequence_logps(adapter, model, ref_batch).tolist()
        for (row, k), value in zip(chunk, logps):
            per_sample[row]["ref_logps"][k] = value

    chosen_logps = result.logp_full.sum(dim=-1).tolist()
    outputs = []
    for row, (sample, item) in enumerate(zip(samples, per_sample)):
        candidates = [{
            "text": item["reference"], "num_replaced": 0, "replaced_positions": [], "replaced_tokens": [],
            "similarity": 1.0, "rank": 0, "kept": True, "ref_logp": chosen_logps[row],
        }]
        for k, cand in enumerate(item["cands"]):
            candidates.append({
                "text": cand.text,
                "num_replaced": cand.num_replaced,
                "replaced_positions": cand.replaced_positions,
                "replaced_tokens": cand.replaced_tokens,
                "similarity": item["sims"][k],
                "rank": item["ranks"][k],
                "kept": item["kept"][k],
                "ref_logp": item["ref_logps"][k],
            })
        outputs.append({
            "sample_id": sample.sample_id,
            "flagged": sum(item["kept"]) < 2,
            "model_answer": model_answers[row],
            "candidates": candidates,
            "tokens": item["tokens"],
        })
    return outputs


def analyze_sample(vlm: VLM, image: Any, question: str, answer: str, config: GenerateConfig | None = None,
                   embedder: Any | None = None) -> dict[str, Any]:
    """Run the method on one sample without touching the database (the app's token view)."""
    config = config or GenerateConfig()
    _check_text(question, "question", "the sample")
    _check_text(answer, "answer", "the sample")
    check_length(vlm, question, answer, "the sample")
    sample = GenerationSample("inspect", image, "inspect", question, answer)
    result = process_batch(vlm, [sample], config, embedder)[0]
    return {"tokens": result["tokens"], "candidates": result["candidates"], "flagged": result["flagged"]}


def _check_text(value: str, field: str, where: str) -> None:
    if not value or not str(value).strip():
        raise DataError(f"{where} has an empty {field}; fill it in or remove the sample")


def context_window(vlm: VLM) -> int | None:
    """Return the language model's maximum sequence length in tokens, or None when the config has none."""
    config = getattr(vlm.model, "config", None)
    text_config = getattr(config, "text_config", None) or config
    value = getattr(text_config, "max_position_embeddings", None)
    return int(value) if value else None


def check_length(vlm: VLM, question: str, answer: str, where: str, num_image_tokens: int = 0) -> None:
    """Raise DataError when the prompt and answer do not fit the model's context window.

    Without ``num_image_tokens`` the image placeholder counts as one token, so the check is a
    lower bound until the image has been encoded.
    """
    limit = context_window(vlm)
    if limit is None:
        return
    prompt = vlm.adapter.prompt(question)
    length = len(vlm.tokenizer(prompt)["input_ids"]) + len(vlm.adapter.answer_ids(answer)) + max(num_image_tokens - 1, 0)
    if length > limit:
        raise DataError(
            f"{where} needs {length} tokens for the question and answer, over the model's context window "
            f"of {limit} tokens; shorten the question or remove the sample"
        )


def run_generation(
    vlm: VLM,
    store: Store,
    config: GenerateConfig,
    dataset: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    progress: bool | Callable[[int, int], None] = True,
) -> dict[str, Any]:
    """Generate and store preference data for a dataset; finished samples of the same run are skipped.

    Each batch is written in one transaction, so an interrupted run loses at most the batch in
    flight and a re-run continues where it stopped. Samples whose image cannot be read are
    reported in ``errors`` and skipped.
    """
    from hscr.images import open_stored

    run_id = generation_run_id(vlm.name, config)
    store.ensure_generation_run(run_id, vlm.name, json.dumps(config.method_key(), sort_keys=True))
    rows = store.samples(dataset=dataset, split=split, limit=limit)
    if dataset and not rows:
        known = sorted({d["dataset"] for d in store.datasets()})
        raise DataError(f"dataset {dataset!r} has no samples in {store.db_path}; known datasets: {', '.join(known) or 'none'}")
    done = store.done_sample_ids(run_id)
    todo = [r for r in rows if r["id"] not in done]
    summary: dict[str, Any] = {"run_id": run_id, "processed": 0, "skipped": len(rows) - len(todo),
                               "flagged": 0, "errors": []}

    bar = None
    if progress is True:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="generate", unit="sample")
    for start in range(0, len(todo), config.batch_size):
        chunk = todo[start : start + config.batch_size]
        ready: list[GenerationSample] = []
        for row in chunk:
            try:
                _check_text(row["question"], "question", f"sample {row['id']}")
                _check_text(row["answer"], "answer", f"sample {row['id']}")
                check_length(vlm, row["question"], row["answer"], "the sample")
                image = open_stored(store.data_dir / row["image_path"])
            except (DataError, OSError) as exc:
                summary["errors"].append(f"sample {row['id']}: {exc}")
                continue
            ready.append(GenerationSample(row["id"], image, row["image_id"], row["question"], row["answer"]))
        if ready:
            results = process_batch(vlm, ready, config)
            store.write_generation(run_id, results)
            summary["processed"] += len(results)
            summary["flagged"] += sum(r["flagged"] for r in results)
        if bar is not None:
            bar.update(len(chunk))
        elif callable(progress):
            progress(start + len(chunk), len(todo))
    if bar is not None:
        bar.close()
    return summary
