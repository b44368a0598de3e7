import pytest

from hscr.rerank import cosine_to_reference, get_embedder, rank_and_select


def test_gap_selection_skips_close_neighbours():
    ranks, kept = rank_and_select([0.9, 0.85, 0.7, 0.5, 0.45], num_keep=3, min_gap=0.1)
    assert ranks == [1, 2, 3, 4, 5]
    assert kept == [True, False, True, True, False]


def test_gap_selection_sorts_descending():
    ranks, kept = rank_and_select([0.2, 0.95, 0.6], num_keep=3, min_gap=0.1)
    assert ranks == [3, 1, 2]
    assert kept == [True, True, True]


def test_fewer_candidates_than_j():
    assert rank_and_select([0.8], num_keep=3, min_gap=0.1) == ([1], [True])
    assert rank_and_select([], num_keep=3, min_gap=0.1) == ([], [])


def test_ties_keep_input_order():
    ranks, kept = rank_and_select([0.6, 0.6, 0.3], num_keep=3, min_gap=0.1)
    assert ranks == [1, 2, 3]
    assert kept == [True, False, True]


def test_gap_boundary_is_inclusive():
    assert rank_and_select([0.9, 0.8], num_keep=3, min_gap=0.1)[1] == [True, True]


def test_keep_at_most_j():
    _, kept = rank_and_select([0.9, 0.7, 0.5, 0.3, 0.1], num_keep=2, min_gap=0.1)
    assert kept == [True, True, False, False, False]


@pytest.fixture(scope="module")
def embedder():
    return get_embedder()


def test_minilm_loads_offline_and_ranks(embedder):
    vectors = embedder.encode(["the left lung", "the left lung", "the right lung", "a red bicycle"])
    assert vectors.shape == (4, 384)
    sims = cosine_to_reference(vectors[0], vectors[1:])
    assert sims[0] == pytest.approx(1.0, abs=1e-5)
    assert sims[0] > sims[1] > sims[2]
