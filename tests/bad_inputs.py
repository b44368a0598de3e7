"""A corpus of bad (and awkward but valid) inputs, generated on the fly for the hardening tests.

Every case is a :class:`Case` whose ``build(folder)`` writes its files and returns the path to
import. Image cases become rows of one folder dataset (``samples.csv``), so a single import
exercises all of them. Dataset cases are whole datasets of one format each. ``expect`` is
``"import"`` when the input is valid and must be stored, otherwise ``"error"``, and ``match``
is a piece of the error message that tells the user what is wrong.

    python tests/bad_inputs.py /tmp/corpus      # write every case for manual runs
"""

from __future__ import annotations

import csv
import io
import json
import pickle
import shutil
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

GOOD_QUESTION = "is there a lesion ?"


@dataclass(frozen=True)
class Case:
    """One input: how to write it, where it goes, and what an import must do with it."""

    name: str
    kind: str                              # "image" (a row of the folder corpus) or a dataset format
    build: Callable[[Path], Path]          # writes the files under the folder, returns the path to import
    expect: str                            # "import" or "error"
    match: str = ""                        # part of the error message (case-insensitive)


# -- helpers --------------------------------------------------------------------------------------


def _good_png(path: Path, seed: int = 0, size: int = 16) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(path)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _zero_png(path: Path, width: int, height: int, bit_depth: int) -> Path:
    """Write a grayscale PNG of zeros row by row, so a huge image costs little memory or disk."""
    row_bytes = 1 + (width * bit_depth + 7) // 8                  # filter byte + packed pixels
    compressor = zlib.compressobj(9)
    row = bytes(row_bytes)
    parts = [compressor.compress(row) for _ in range(height)]
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    with open(path, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n")
        handle.write(_png_chunk(b"IHDR", header))
        handle.write(_png_chunk(b"IDAT", b"".join(parts)))
        handle.write(_png_chunk(b"IEND", b""))
    return path


def _testdata(name: str) -> Path:
    """Return a test DICOM that ships inside the pydicom package (never one it would download)."""
    import pydicom

    path = Path(pydicom.__file__).parent / "data" / "test_files" / name
    if not path.is_file():
        raise FileNotFoundError(f"pydicom test file {name} is not installed in {path.parent}")
    return path


# -- image files (rows of the folder corpus) -------------------------------------------------------


def truncated_dicom(folder: Path) -> Path:
    data = _testdata("CT_small.dcm").read_bytes()
    path = folder / "truncated.dcm"
    path.write_bytes(data[: len(data) // 2])
    return path


def dicom_without_pixels(folder: Path) -> Path:
    import pydicom

    ds = pydicom.dcmread(_testdata("CT_small.dcm"))
    del ds.PixelData
    path = folder / "no_pixels.dcm"
    ds.save_as(path)
    return path


def compressed_dicom(folder: Path) -> Path:
    # JPEG-LS: neither pydicom nor Pillow decodes it without pyjpegls or pylibjpeg-libjpeg.
    path = folder / "jpeg_ls.dcm"
    shutil.copyfile(_testdata("MR_small_jpeg_ls_lossless.dcm"), path)
    return path


def dicom_text_file(folder: Path) -> Path:
    path = folder / "notes.dcm"
    path.write_text("Patient notes, not an image.\n", encoding="utf-8")
    return path


def zero_byte_file(folder: Path) -> Path:
    path = folder / "empty.png"
    path.write_bytes(b"")
    return path


def text_named_png(folder: Path) -> Path:
    path = folder / "readme.png"
    path.write_text("this is a text file with a .png name\n", encoding="utf-8")
    return path


def truncated_png(folder: Path) -> Path:
    buffer = io.BytesIO()
    rng = np.random.default_rng(7)
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8")).save(buffer, format="PNG")
    path = folder / "truncated.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def decompression_bomb(folder: Path) -> Path:
    # About 30 KB on disk, 900 million pixels once decoded.
    return _zero_png(folder / "bomb.png", 30000, 30000, bit_depth=1)


def huge_image(folder: Path) -> Path:
    # 20000 x 20000 = 400 million pixels, over the 268 million pixel import limit.
    return _zero_png(folder / "huge.png", 20000, 20000, bit_depth=8)


def png_16bit(folder: Path) -> Path:
    ramp = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 61).astype(np.uint16)
    path = folder / "sixteen_bit.png"
    Image.fromarray(ramp).save(path)
    return path


def cmyk_jpeg(folder: Path) -> Path:
    path = folder / "cmyk.jpg"
    Image.new("CMYK", (24, 24), (0, 128, 255, 16)).save(path, format="JPEG")
    return path


def one_pixel(folder: Path) -> Path:
    path = folder / "pixel.png"
    Image.new("RGB", (1, 1), (200, 10, 10)).save(path)
    return path


def rgba_png(folder: Path) -> Path:
    path = folder / "alpha.png"
    Image.new("RGBA", (8, 8), (10, 20, 30, 128)).save(path)
    return path


def _jpeg_ls_decoder_installed() -> bool:
    from pydicom.pixels.decoders import JPEGLSLosslessDecoder

    return JPEGLSLosslessDecoder.is_available


IMAGE_CASES = [
    Case("truncated DICOM", "image", truncated_dicom, "error", "truncated"),
    Case("DICOM without pixel data", "image", dicom_without_pixels, "error", "has no image"),
    # With pylibjpeg-libjpeg or pyjpegls installed, the same file imports.
    Case("compressed DICOM without decoder", "image", compressed_dicom,
         "import" if _jpeg_ls_decoder_installed() else "error", "no decoder is installed"),
    Case("text file named .dcm", "image", dicom_text_file, "error", "not a dicom"),
    Case("zero-byte file", "image", zero_byte_file, "error", "not a readable image"),
    Case("text file named .png", "image", text_named_png, "error", "not a readable image"),
    Case("truncated PNG", "image", truncated_png, "error", "truncated or corrupt"),
    Case("decompression bomb", "image", decompression_bomb, "error", "decompression bomb"),
    Case("20000x20000 image", "image", huge_image, "error", "over the limit"),
    Case("16-bit PNG", "image", png_16bit, "import"),
    Case("CMYK JPEG", "image", cmyk_jpeg, "import"),
    Case("1x1 image", "image", one_pixel, "import"),
    Case("RGBA PNG", "image", rgba_png, "import"),
]


def write_image_corpus(folder: Path) -> tuple[Path, dict[str, Case]]:
    """Write every image case plus a good image as one folder dataset.

    Returns the folder and a map from the ``samples.csv`` line number (as the importer counts
    lines, the header being line 1) to the case on that line. Line 2 is a good control row.
    """
    folder.mkdir(parents=True, exist_ok=True)
    _good_png(folder / "good.png")
    rows = [{"image": "good.png", "question": GOOD_QUESTION, "answer": "yes"}]
    by_line: dict[str, Case] = {}
    for index, case in enumerate(IMAGE_CASES):
        path = case.build(folder)
        rows.append({"image": path.name, "question": f"what does image {index} show ?", "answer": "a lung"})
        by_line[f"samples.csv line {index + 3}"] = case
    _write_csv(folder / "samples.csv", rows)
    return folder, by_line


# -- row problems inside an otherwise valid folder dataset -----------------------------------------


def _write_csv(path: Path, rows: list[dict[str, str]], encoding: str = "utf-8") -> None:
    fields = list(rows[0].keys())
    with open(path, "w", newline="", encoding=encoding) as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _folder_with(folder: Path, rows: list[dict[str, str]], encoding: str = "utf-8") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _good_png(folder / "good.png")
    _write_csv(folder / "samples.csv", rows, encoding)
    return folder


def non_utf8_csv(folder: Path) -> Path:
    rows = [{"image": "good.png", "question": "quelle région est touchée ?", "answer": "poumon gauche"}]
    return _folder_with(folder, rows, encoding="latin-1")


def csv_missing_column(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _good_png(folder / "good.png")
    (folder / "samples.csv").write_text("image,question\ngood.png,is there a lesion ?\n", encoding="utf-8")
    return folder


def empty_answer(folder: Path) -> Path:
    return _folder_with(folder, [{"image": "good.png", "question": GOOD_QUESTION, "answer": "  "}])


def duplicate_ids(folder: Path) -> Path:
    row = {"id": "case-1", "image": "good.png", "question": GOOD_QUESTION, "answer": "yes"}
    return _folder_with(folder, [row, dict(row)])


def path_outside(folder: Path) -> Path:
    _good_png(folder.parent / "outside.png")
    return _folder_with(folder, [{"image": "../outside.png", "question": GOOD_QUESTION, "answer": "yes"}])


def absolute_path_outside(folder: Path) -> Path:
    outside = _good_png(folder.parent / "absolute.png")
    return _folder_with(folder, [{"image": str(outside.resolve()), "question": GOOD_QUESTION, "answer": "yes"}])


# -- whole dataset files ---------------------------------------------------------------------------


def _vqa_rad(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    _good_png(folder / "images" / "synpic1.jpg.png")
    (folder / "trainset.json").write_text(text, encoding="utf-8")
    return folder


def _vqa_record(**fields) -> dict:
    record = {"qid": 1, "image_name": "synpic1.jpg.png", "image_organ": "CHEST", "answer": "yes",
              "answer_type": "CLOSED", "question_type": "PRES", "question": GOOD_QUESTION, "phrase_type": "freeform"}
    record.update(fields)
    return {key: value for key, value in record.items() if value is not None}


def malformed_json(folder: Path) -> Path:
    text = json.dumps([_vqa_record()])
    return _vqa_rad(folder, text[:-10])


def wrong_field_types(folder: Path) -> Path:
    records = [_vqa_record(qid=1, question={"text": GOOD_QUESTION}), _vqa_record(qid=2, answer=["yes", "no"])]
    return _vqa_rad(folder, json.dumps(records))


def missing_fields(folder: Path) -> Path:
    # The second record has no answer, the third no image_name; the first is valid.
    records = [_vqa_record(qid=1), _vqa_record(qid=2, question="is the heart enlarged ?", answer=None),
               _vqa_record(qid=3, question="which organ ?", image_name=None)]
    # Detection reads the keys of the first record, so it must be complete.
    return _vqa_rad(folder, json.dumps(records))


def json_object_not_array(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "imgs" / "xmlab0").mkdir(parents=True)
    _good_png(folder / "imgs" / "xmlab0" / "source.jpg")
    (folder / "train.json").write_text(json.dumps({"img_name": "xmlab0/source.jpg", "q_lang": "en"}), encoding="utf-8")
    return folder


def malformed_jsonl(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _good_png(folder / "a.png")
    lines = [json.dumps({"question_id": 1, "image": "a.png", "text": GOOD_QUESTION}), '{"question_id": 2, "image": ']
    path = folder / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class _Dangerous:
    def __reduce__(self):
        return (print, ("a pickle ran code",))


def unsafe_pickle(folder: Path) -> Path:
    (folder / "qas" / "train").mkdir(parents=True)
    (folder / "images" / "train").mkdir(parents=True)
    _good_png(folder / "images" / "train" / "train_0001.jpg")
    payload = [{"image": "train_0001", "question": GOOD_QUESTION, "answer": "yes", "extra": _Dangerous()}]
    (folder / "qas" / "train" / "train_qa.pkl").write_bytes(pickle.dumps(payload))
    return folder


DATASET_CASES = [
    Case("non-UTF-8 CSV", "folder", non_utf8_csv, "error", "not valid utf-8"),
    Case("CSV without the answer column", "folder", csv_missing_column, "error", "missing the column(s) answer"),
    Case("empty answer", "folder", empty_answer, "error", "empty answer"),
    Case("duplicate ids", "folder", duplicate_ids, "import"),
    Case("relative path outside the folder", "folder", path_outside, "error", "points outside"),
    Case("absolute path outside the folder", "folder", absolute_path_outside, "error", "points outside"),
    Case("malformed JSON", "vqa-rad", malformed_json, "error", "not valid json"),
    Case("wrong field types", "vqa-rad", wrong_field_types, "error", "expected a string"),
    Case("missing fields", "vqa-rad", missing_fields, "error", "missing image_name"),
    Case("JSON object instead of an array", "slake", json_object_not_array, "error", "json array"),
    Case("malformed JSON Lines", "llava-med", malformed_jsonl, "error", "line 2 is not valid json"),
    Case("pickle with a class reference", "pathvqa", unsafe_pickle, "error", "refusing to load"),
]

# -- models and samples a model cannot take -------------------------------------------------------


def model_without_image_token(folder: Path, source_model: Path) -> Path:
    """Copy a saved model and point its image token id past the end of the vocabulary."""
    target = folder / "no-image-token"
    shutil.copytree(source_model, target)
    config = json.loads((target / "config.json").read_text(encoding="utf-8"))
    config.pop("image_token_id", None)
    config["image_token_index"] = 100_000
    (target / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return target


def long_question(folder: Path) -> Path:
    """A folder dataset with one normal row and one question of about 5,000 words."""
    rows = [{"image": "good.png", "question": GOOD_QUESTION, "answer": "yes"},
            {"image": "good.png", "question": "where is the lesion " * 1250 + "?", "answer": "left lung"}]
    return _folder_with(folder, rows)


# Model cases are checked by the tests that run `generate`: an unknown model id, a model whose
# image token is missing, and a question longer than the context window.
MODEL_CASES = ["unknown model id", "model without an image token", "question longer than the context window"]

ALL_CASES = IMAGE_CASES + DATASET_CASES


def write_all(root: Path) -> dict[str, Path]:
    """Write the image corpus and every dataset case under ``root``; returns name -> import path."""
    root.mkdir(parents=True, exist_ok=True)
    paths = {"image corpus": write_image_corpus(root / "images")[0]}
    for index, case in enumerate(DATASET_CASES):
        paths[case.name] = case.build(root / f"dataset-{index:02d}")
    return paths


if __name__ == "__main__":
    for name, path in write_all(Path(sys.argv[1])).items():
        print(f"{name}: {path}")
