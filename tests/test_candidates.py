import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hscr.candidates import choose_replacement, graded_candidates, vocab_info, word_spans
from hscr.models.tiny import build_tokenizer

PIECES = ["<unk>", "<s>", "</s>", "<pad>", "▁the", "▁left", "▁right", "▁lung", "▁lu", "ng", "▁liver",
          ".", "▁a", "▁x", "-", "ray", "▁ct", "▁", "y", "es", "▁no", "▁yes"]


@pytest.fixture(scope="module")
def piece_tokenizer():
    """A Metaspace tokenizer whose ids the tests pick by hand, as Mistral's SentencePiece would split."""
    vocab = {piece: index for index, piece in enumerate(PIECES)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


def ids(tokenizer, pieces):
    return [tokenizer.convert_tokens_to_ids(p) for p in pieces]


def logits_favoring(tokenizer, favoured: dict[str, float], base: float = -10.0) -> torch.Tensor:
    row = torch.full((len(tokenizer),), base)
    for piece, value in favoured.items():
        row[tokenizer.convert_tokens_to_ids(piece)] = value
    return row


def test_replacement_lowest_p_diff_among_plausible():
    full = torch.tensor([0.0, 3.0, 1.0, 0.5, -5.0])
    drop = torch.tensor([0.0, 2.0, 2.0, 1.9, -5.0])
    allowed = torch.ones(5, dtype=torch.bool)
    # p_drop ~ [0.08, 0.35, 0.35, 0.32, 0.00]; with alpha 0.5 the plausible set is {1, 2, 3} minus y_t=1.
    # P_diff logits (beta 1): 2*full - drop = [0, 4, 0, -0.9, -5] -> lowest among {2, 3} is 3.
    assert choose_replacement(full, drop, original_id=1, beta=1.0, alpha=0.5, allowed=allowed) == 3
    # A stricter cutoff leaves only token 2 (p_drop equal to the maximum) next to y_t.
    assert choose_replacement(full, drop, original_id=1, beta=1.0, alpha=0.99, allowed=allowed) == 2


def test_replacement_skips_disallowed_tokens():
    full = torch.tensor([0.0, 3.0, 1.0, 0.5])
    drop = torch.tensor([5.0, 2.0, 2.0, 1.9])
    allowed = torch.tensor([False, True, True, True])
    # Token 0 dominates p_drop but is special; the cutoff is relative to max p_drop over all tokens,
    # so nothing allowed passes alpha 0.5 and the runner-up of p_drop among allowed tokens is taken.
    assert choose_replacement(full, drop, original_id=1, beta=0.9, alpha=0.5, allowed=allowed) == 2


def test_replacement_runner_up_without_candidates():
    full = torch.tensor([0.0, 1.0, 0.0, 0.0])
    drop = torch.tensor([0.0, 9.0, 1.0, 0.5])
    allowed = torch.ones(4, dtype=torch.bool)
    # Only y_t passes the cutoff, so the next most likely token without the image is used.
    assert choose_replacement(full, drop, original_id=1, beta=0.9, alpha=0.5, allowed=allowed) == 2


def test_graded_answers_in_coupling_order(piece_tokenizer):
    tok = piece_tokenizer
    info = vocab_info(tok)
    answer = ids(tok, ["▁the", "▁left", "▁lung", "</s>"])
    scores = [0.1, 2.0, 1.0, 5.0]          # EOS scores highest but is special
    full = torch.stack([
        logits_favoring(tok, {"▁the": 3, "▁a": 2}),
        logits_favoring(tok, {"▁left": 3, "▁right": 2}),
        logits_favoring(tok, {"▁lung": 3, "▁liver": 1}),
        logits_favoring(tok, {"</s>": 3}),
    ])
    drop = torch.stack([
        logits_favoring(tok, {"▁the": 3, "▁a": 3}),
        logits_favoring(tok, {"▁left": 3, "▁right": 3}),
        logits_favoring(tok, {"▁lung": 3, "▁liver": 3}),
        logits_favoring(tok, {"</s>": 3, "▁yes": 3}),
    ])
    cands, coupled, _ = graded_candidates(answer, scores, full, drop, tok, info, num_coupled=10, beta=0.9, alpha=0.1)
    assert [c.text for c in cands] == ["the right lung", "the right liver", "a right liver"]
    assert [c.num_replaced for c in cands] == [1, 2, 3]
    assert cands[1].replaced_positions == [1, 2]
    assert cands[1].replaced_tokens == ["▁right", "▁liver"]
    assert [s.start for s in coupled] == [1, 2, 0]
    # n smaller than the number of words caps the grading.
    capped, _, _ = graded_candidates(answer, scores, full, drop, tok, info, num_coupled=1)
    assert [c.text for c in capped] == ["the right lung"]


def test_one_token_answer(piece_tokenizer):
    tok = piece_tokenizer
    answer = ids(tok, ["▁yes", "</s>"])
    full = torch.stack([logits_favoring(tok, {"▁yes": 3, "▁no": 1}), logits_favoring(tok, {"</s>": 3})])
    drop = torch.stack([logits_favoring(tok, {"▁yes": 3, "▁no": 3}), logits_favoring(tok, {"</s>": 3})])
    cands, _, _ = graded_candidates(answer, [0.5, 0.9], full, drop, tok, vocab_info(tok), num_coupled=10)
    assert [c.text for c in cands] == ["no"]


def test_special_tokens_never_chosen(piece_tokenizer):
    tok = piece_tokenizer
    answer = ids(tok, ["▁left", "</s>"])
    # Special tokens and continuation pieces dominate p_drop; they must not be picked.
    full = torch.stack([logits_favoring(tok, {"▁left": 3, "▁right": 0}), logits_favoring(tok, {"</s>": 3})])
    drop = torch.stack([logits_favoring(tok, {"</s>": 8, "<pad>": 8, "ng": 8, "▁right": 1}), logits_favoring(tok, {"</s>": 3})])
    cands, _, replacements = graded_candidates(answer, [1.0, 9.0], full, drop, tok, vocab_info(tok))
    assert [c.text for c in cands] == ["right"]
    assert tok.convert_ids_to_tokens(replacements[0]) == "▁right"


def test_subword_word_replaced_whole(piece_tokenizer):
    tok = piece_tokenizer
    # "the x-ray" split as ▁the ▁x - ray: the continuation piece 'ray' is the most coupled.
    answer = ids(tok, ["▁the", "▁x", "-", "ray", ".", "</s>"])
    scores = [0.0, 0.2, 0.0, 3.0, 0.0, 0.0]
    rows = [logits_favoring(tok, {"▁the": 3}) for _ in answer]
    full = torch.stack(rows)
    drop = full.clone()
    drop[1] = logits_favoring(tok, {"▁x": 3, "▁ct": 3, "y": 4})
    cands, coupled, _ = graded_candidates(answer, scores, full, drop, tok, vocab_info(tok), num_coupled=1)
    assert (coupled[0].start, coupled[0].end) == (1, 4)
    assert [c.text for c in cands] == ["the ct."]


def test_merged_pieces_identical_text_merged(piece_tokenizer):
    tok = piece_tokenizer
    # 'lung' arrives as two pieces; its best replacement is the one-piece '▁lung', which decodes to
    # the same text as the reference, so that grade is merged away and only distinct texts remain.
    answer = ids(tok, ["▁left", "▁lu", "ng", "</s>"])
    scores = [0.5, 2.0, 0.1, 0.0]
    full = torch.stack([
        logits_favoring(tok, {"▁left": 3, "▁right": 1}),
        logits_favoring(tok, {"▁lu": 3, "▁lung": 0}),
        logits_favoring(tok, {"ng": 3}),
        logits_favoring(tok, {"</s>": 3}),
    ])
    drop = full.clone()
    drop[0] = logits_favoring(tok, {"▁left": 3, "▁right": 3})
    drop[1] = logits_favoring(tok, {"▁lu": 3, "▁lung": 3})
    cands, _, _ = graded_candidates(answer, scores, full, drop, tok, vocab_info(tok))
    assert [c.text for c in cands] == ["right lung"]
    assert cands[0].num_replaced == 2


def test_word_spans_punctuation_and_bare_marker(piece_tokenizer):
    tok = piece_tokenizer
    info = vocab_info(tok)
    # '▁' followed by 'y' 'es' is how SentencePiece writes a word with no merged first piece.
    answer = ids(tok, ["▁", "y", "es", ".", "</s>"])
    spans = word_spans(answer, [0.1, 0.9, 0.3, 2.0, 3.0], info)
    assert [(s.start, s.end, s.score) for s in spans] == [(0, 3, 0.9)]


def test_word_level_tokenizer_spans():
    tok = build_tokenizer("word", "the left lung is normal .")
    info = vocab_info(tok)
    answer = tok("the left lung .", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    spans = word_spans(answer, [0.0, 1.0, 2.0, 3.0, 4.0], info)
    assert [(s.start, s.end) for s in spans] == [(0, 1), (1, 2), (2, 3)]
