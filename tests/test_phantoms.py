"""The phantom generator: determinism, answers that follow the drawn attributes, visible lesions."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hscr.demo.phantoms import (
    COUNT_WORDS,
    LESION_RADIUS_AT_64,
    MODALITIES,
    all_questions,
    generate_split,
    make_phantom,
    question_corpus,
    stored_questions,
)

NUM_CHECKED = 60


@pytest.fixture(scope="module")
def phantoms():
    return generate_split("train", NUM_CHECKED, seed=3)


def test_same_arguments_same_phantom():
    first = make_phantom("test", 7, seed=1)
    second = make_phantom("test", 7, seed=1)
    assert np.array_equal(first.pixels, second.pixels)
    assert first.attributes() == second.attributes()
    assert [qa.question for qa in all_questions(first)] == [qa.question for qa in all_questions(second)]


def test_split_slices_match_single_draws():
    tail = generate_split("train", 3, seed=2, start=5)
    for offset, phantom in enumerate(tail):
        single = make_phantom("train", 5 + offset, seed=2)
        assert phantom.index == 5 + offset
        assert np.array_equal(phantom.pixels, single.pixels)


def test_seed_split_and_index_change_the_image():
    base = make_phantom("train", 0, seed=0).pixels
    assert not np.array_equal(base, make_phantom("train", 1, seed=0).pixels)
    assert not np.array_equal(base, make_phantom("test", 0, seed=0).pixels)
    assert not np.array_equal(base, make_phantom("train", 0, seed=1).pixels)


def test_invalid_split_and_size_rejected():
    with pytest.raises(ValueError, match="split"):
        make_phantom("validate", 0)
    with pytest.raises(ValueError, match="size"):
        make_phantom("train", 0, size=32)


def test_image_format(phantoms):
    for phantom in phantoms[:5]:
        assert phantom.pixels.dtype == np.uint8
        assert phantom.pixels.shape == (128, 128)
        assert phantom.image().mode == "L"


def test_all_modalities_and_counts_occur(phantoms):
    assert {p.modality for p in phantoms} == set(MODALITIES)
    counts = {p.count for p in phantoms}
    assert 0 in counts
    assert 1 in counts
    assert max(counts) >= 2


def _expected_answer(question: str, attrs: dict) -> str | None:
    """Answer a template question from the attribute dict alone, independently of the templates."""
    lesions = attrs["lesions"]
    sides = {l["side"] for l in lesions}
    regions = {l["region"] for l in lesions}
    yes_no = lambda value: "yes" if value else "no"
    q = question.lower().rstrip("?")
    if q in ("what modality is this image", "what imaging modality was used"):
        return attrs["modality"]
    if q == "is this an x-ray":
        return yes_no(attrs["modality"] == "x-ray")
    if q == "is this a ct scan":
        return yes_no(attrs["modality"] == "ct")
    if q == "is this an mri":
        return yes_no(attrs["modality"] == "mri")
    if q.startswith("is this an x-ray or") or q.startswith("is this a ct scan or"):
        return attrs["modality"]
    if q.startswith("does this image show the "):
        return yes_no(q.endswith(attrs["organ"]))
    if q == "which organ is shown":
        return attrs["organ"]
    if q == "which part of the body is this":
        return attrs["body_part"]
    if q == "is there a lesion in this image":
        return yes_no(bool(lesions))
    if q == "does this image look normal":
        return yes_no(not lesions)
    if q == "are there multiple lesions":
        return yes_no(len(lesions) > 1)
    if q == "how many lesions are there":
        return COUNT_WORDS[len(lesions)]
    if q == "what abnormality is seen":
        if not lesions:
            return "none"
        return "tumor" if attrs["organ"] == "brain" else "nodule"
    for side in ("left", "right"):
        if q in (f"is there a lesion in the {side} lung", f"is there a lesion in the {side} hemisphere"):
            return yes_no(side in sides)
    for region in ("upper", "lower", "frontal", "occipital"):
        if q == f"is there a lesion in the {region} lobe":
            return yes_no(region in regions)
    if q == "which side is the lesion on":
        return "both" if len(sides) == 2 else sides.pop()
    if q == "what size is the lesion":
        return attrs["size"]
    if q.startswith("is the lesion in the left or the right"):
        assert len(sides) == 1
        return sides.pop()
    if q == "where is the lesion located":
        assert len(lesions) == 1
        return f"{lesions[0]['side']} {lesions[0]['region']} lobe"
    return None


def test_answers_follow_attributes(phantoms):
    checked = 0
    for phantom in phantoms:
        attrs = phantom.attributes()
        assert attrs["count"] == len(attrs["lesions"])
        for qa in all_questions(phantom):
            expected = _expected_answer(qa.question, attrs)
            assert expected is not None, f"untested template: {qa.question!r}"
            assert qa.answer == expected, f"{phantom.name}: {qa.question!r} -> {qa.answer!r}, attributes {attrs}"
            checked += 1
    assert checked > NUM_CHECKED * 10


def test_answer_types(phantoms):
    for phantom in phantoms:
        for qa in all_questions(phantom):
            assert qa.answer_type in ("open", "closed")
            if qa.answer in ("yes", "no"):
                assert qa.answer_type == "closed"


def test_location_questions_only_when_unambiguous(phantoms):
    for phantom in phantoms:
        families = [qa.family for qa in all_questions(phantom)]
        assert ("location" in families) == (phantom.count == 1)
        assert ("side_choice" in families) == (phantom.count >= 1 and len({l.side for l in phantom.lesions}) == 1)
        assert ("size" in families) == phantom.has_lesion


def test_lesion_regions_by_organ(phantoms):
    for phantom in phantoms:
        for lesion in phantom.lesions:
            assert lesion.side in ("left", "right")
            if phantom.organ == "brain":
                assert lesion.region in ("frontal", "occipital")
            elif phantom.modality == "ct":
                assert lesion.region == phantom.level
            else:
                assert lesion.region in ("upper", "lower")


def test_radiological_side_convention(phantoms):
    # The patient's left is drawn on the image's right half.
    for phantom in phantoms:
        for lesion in phantom.lesions:
            if lesion.side == "left":
                assert lesion.x > 128 / 2 - 4
            else:
                assert lesion.x < 128 / 2 + 4


def _contrast(pixels: np.ndarray, x: float, y: float, radius: float) -> float:
    """Mean inside the lesion disc minus the mean of a ring around it."""
    yy, xx = np.mgrid[: pixels.shape[0], : pixels.shape[1]] + 0.5
    dist = np.hypot(xx - x, yy - y)
    inside = pixels[dist < radius * 0.6].mean()
    ring = pixels[(dist > radius * 1.6) & (dist < radius * 2.4)].mean()
    return float(inside - ring)


def test_lesions_visible_at_model_input(phantoms):
    # Downscale as the model's processor does (bicubic to 64 pixels); every lesion still stands
    # out from its surroundings by a clear margin of grey levels.
    smallest = min(LESION_RADIUS_AT_64.values())
    seen = 0
    for phantom in phantoms:
        small = np.asarray(phantom.image().resize((64, 64), Image.BICUBIC), dtype=np.float32)
        for lesion in phantom.lesions:
            contrast = _contrast(small, lesion.x / 2, lesion.y / 2, lesion.radius / 2)
            assert contrast > 25, f"{phantom.name}: lesion at ({lesion.x}, {lesion.y}) has contrast {contrast:.1f}"
            assert lesion.radius / 2 >= smallest * 0.9
            seen += 1
    assert seen >= 20


def test_lesions_do_not_overlap(phantoms):
    for phantom in phantoms:
        for i, first in enumerate(phantom.lesions):
            for second in phantom.lesions[i + 1 :]:
                assert np.hypot(first.x - second.x, first.y - second.y) > first.radius + second.radius


def test_stored_questions_selection(phantoms):
    for phantom in phantoms[:20]:
        chosen = stored_questions(phantom, seed=0)
        assert chosen == stored_questions(phantom, seed=0)
        families = [qa.family for qa in chosen]
        assert len(families) == len(set(families)) == 6
        assert sum(not qa.local for qa in chosen) == 2
        assert all(qa in all_questions(phantom) for qa in chosen)


def test_corpus_covers_every_question_word(phantoms):
    vocabulary = {word for text in question_corpus() for word in text.lower().replace("?", " ?").split()}
    for phantom in phantoms:
        for qa in all_questions(phantom):
            words = (qa.question + " " + qa.answer).lower().replace("?", " ?").split()
            assert set(words) <= vocabulary, set(words) - vocabulary
    assert len(vocabulary) < 80
