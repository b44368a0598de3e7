"""Writers of small dataset fixtures in the public Med-VQA layouts, quirks included.

Each writer builds a folder under the given root and returns it. The record contents are chosen
so each test can state exact expected counts: see the comments on the records.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def jpeg_bytes(seed: int, size: int = 32, mode: str = "RGB") -> bytes:
    """A small JPEG of random noise; ``mode="CMYK"`` writes a CMYK JPEG."""
    rng = np.random.default_rng(seed)
    channels = 4 if mode == "CMYK" else 3
    pixels = (rng.random((size, size, channels)) * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.frombytes(mode, (size, size), pixels.tobytes()).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_jpeg(path: Path, seed: int, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(seed, mode=mode))
    return path


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


# -- VQA-RAD ---------------------------------------------------------------------------------------

# OSF release. Expected: train 4 (qid 2 merges into qid 1), test 2, one duplicate, one missing
# image (qid 5), synpic1 and synpic2 shared by test and train, one (image, question) pair in both.
VQA_RAD_OSF_RECORDS = [
    {"qid": 1, "phrase_type": "freeform", "qid_linked_id": "a1", "image_case_url": "https://example.org/1",
     "image_name": "synpic1.jpg", "image_organ": "CHEST", "evaluation": "given",
     "question": "Is there\ta fracture?", "question_rephrase": "NULL", "question_relation": "NULL",
     "question_frame": "NULL", "question_type": "PRES", "answer": "Yes", "answer_type": "CLOSED "},
    {"qid": 2, "phrase_type": "para", "qid_linked_id": "a1", "image_case_url": "https://example.org/1",
     "image_name": "synpic1.jpg", "image_organ": "CHEST", "evaluation": "given",
     "question": "is there a  fracture?", "question_rephrase": "NULL", "question_relation": "NULL",
     "question_frame": "NULL", "question_type": "PRES", "answer": "yes", "answer_type": "CLOSED"},
    {"qid": 3, "phrase_type": "freeform", "qid_linked_id": "a2", "image_case_url": "https://example.org/2",
     "image_name": "synpic2.jpg", "image_organ": "HEAD", "evaluation": "given",
     "question": "How many lesions are there?", "question_rephrase": "NULL", "question_relation": "NULL",
     "question_frame": "NULL", "question_type": "COUNT", "answer": 4, "answer_type": "OPEN"},
    {"qid": 4, "phrase_type": "test_freeform", "qid_linked_id": "a3", "image_case_url": "https://example.org/1",
     "image_name": "synpic1.jpg", "image_organ": "CHEST", "evaluation": "given",
     "question": " Is the lung normal?", "question_rephrase": "NULL", "question_relation": "NULL",
     "question_frame": "NULL", "question_type": "ABN, PRES", "answer": " no.", "answer_type": "CLOSED"},
    {"qid": 5, "phrase_type": "test_para", "qid_linked_id": "a4", "image_case_url": "https://example.org/9",
     "image_name": "synpic9.jpg", "image_organ": "ABD", "evaluation": "given",
     "question": "Is the liver enlarged?", "question_rephrase": "NULL", "question_relation": "NULL",
     "question_frame": "NULL", "question_type": "SIZE", "answer": "no", "answer_type": "CLOSED"},
    {"qid": 6, "phrase_type": "frame", "qid_linked_id": "a5", "image_case_url": "https://example.org/2",
     "image_name": "synpic2.jpg", "image_organ": "HEAD", "evaluation": "given",
     "question": "Which side is the lesion on?", "question_rephrase": "NULL", "question_relation": "NULL",
     "question_frame": "NULL", "question_type": "POS", "answer": "Left", "answer_type": "CLOSED"},
    {"qid": 7, "phrase_type": "test_freeform", "qid_linked_id": "a2", "image_case_url": "https://example.org/2",
     "image_name": "synpic2.jpg", "image_organ": "HEAD", "evaluation": "given",
     "question": "How many lesions are there?", "question_rephrase": "NULL", "question_relation": "NULL",
     "question_frame": "NULL", "question_type": "COUNT", "answer": 4, "answer_type": "OPEN"},
    {"qid": 8, "phrase_type": "para", "qid_linked_id": "a6", "image_case_url": "https://example.org/3",
     "image_name": "synpic3.jpg", "image_organ": "ABD", "evaluation": "given",
     "question": "What organ is shown?", "question_rephrase": "NULL", "question_relation": "NULL",
     "question_frame": "NULL", "question_type": "ORGAN", "answer": "liver, spleen", "answer_type": "OPEN"},
]


def write_vqa_rad_osf(root: Path) -> Path:
    folder = root / "vqa-rad-osf"
    images = folder / "VQA_RAD Image Folder"
    for seed, name in enumerate(("synpic1.jpg", "synpic2.jpg", "synpic3.jpg")):
        write_jpeg(images / name, seed)
    write_json(folder / "VQA_RAD Dataset Public.json", VQA_RAD_OSF_RECORDS)
    return folder


def write_vqa_rad_mevf(root: Path) -> Path:
    """MEVF split: 3 train rows, 2 test rows, no ``test_`` prefix; imgA shared by both splits."""
    folder = root / "vqa-rad-mevf"
    for seed, name in enumerate(("imgA.jpg", "imgB.jpg")):
        write_jpeg(folder / "images" / name, seed + 10)
    keys = ("qid", "image_name", "image_organ", "answer", "answer_type", "question_type", "question", "phrase_type")

    def record(*values):
        return dict(zip(keys, values))

    write_json(folder / "trainset.json", [
        record(11, "imgA.jpg", "CHEST", "Yes", "CLOSED ", "PRES", "Is there an effusion?", "freeform"),
        record(12, "imgA.jpg", "CHEST", "right", "CLOSED", "POS", "Which lung is affected?", "para"),
        record(13, "imgB.jpg", "HEAD", 2, "OPEN", "COUNT", "How many\tventricles are dilated?", "freeform"),
    ])
    write_json(folder / "testset.json", [
        record(21, "imgA.jpg", "CHEST", "no", "CLOSED", "ABN", "Is the heart enlarged?", "freeform"),
        record(22, "imgB.jpg", "HEAD", "T2 weighted", "OPEN", "MODALITY", "What sequence is this?", "para"),
    ])
    return folder


def write_vqa_rad_parquet(root: Path) -> Path:
    """Hugging Face copy: train 3 rows (one repeats), test 2 rows; text lowercased, no answer_type."""
    folder = root / "vqa-rad-hf"
    first, second = jpeg_bytes(20), jpeg_bytes(21)
    write_parquet(folder / "data" / "train-00000-of-00001.parquet", [
        (first, "is there a pneumothorax?", "yes"),
        (second, "what modality is this?", "ct"),
        (first, "is there a pneumothorax?", "yes"),
    ])
    write_parquet(folder / "data" / "test-00000-of-00001.parquet", [
        (first, "is the mediastinum shifted?", "no"),
        (second, "where is the mass?", "left lobe"),
    ])
    return folder


def write_parquet(path: Path, rows: list[tuple[bytes, str, str]]) -> Path:
    """Write a Hugging Face ``datasets`` style Parquet file: image struct (bytes, path), question, answer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "image": pa.array([{"bytes": data, "path": None} for data, _, _ in rows], type=image_type),
        "question": [question for _, question, _ in rows],
        "answer": [answer for _, _, answer in rows],
    })
    pq.write_table(table, path)
    return path


# -- SLAKE -----------------------------------------------------------------------------------------


def _slake(qid, img, question, answer, lang, answer_type, modality="CT", **extra):
    record = {
        "img_id": int(img[5:]), "img_name": f"{img}/source.jpg", "question": question, "answer": answer,
        "q_lang": lang, "location": "Lung", "modality": modality, "answer_type": answer_type,
        "base_type": "vqa", "content_type": "Position", "triple": ["vhead", "_", "_"], "qid": qid,
    }
    record.update(extra)
    # Key order varies between records in the real files.
    return dict(reversed(list(record.items()))) if qid % 2 else record


# Train: 3 en + 2 zh; validation: 1 en; test: 2 en + 1 zh. xmlab2 appears in the English test
# split and only in the Chinese train split, so importing English only still must warn about it.
SLAKE_SPLITS = {
    "train": [
        _slake(1, "xmlab0", "Is this a CT image?", "Yes", "en", "CLOSED"),
        _slake(2, "xmlab0", "Which organs appear in the image?", "Liver, Spleen, Kidney", "en", "OPEN"),
        _slake(3, "xmlab1", "What is abnormal in the lung?", "None", "en", "OPEN", modality="X-Ray"),
        _slake(4, "xmlab0", "这是CT图像吗?", "是的", "zh", "CLOSED"),
        _slake(5, "xmlab2", "图像中包含肝脏吗?", "不包含", "zh", "CLOSED"),
    ],
    "validation": [
        _slake(6, "xmlab1", "Which plane is this image taken in?", "Transverse Plane", "en", "CLOSED", modality="X-Ray"),
    ],
    "test": [
        _slake(7, "xmlab2", "Does the image contain the liver?", "No", "en", "CLOSED"),
        _slake(8, "xmlab3", "Where is the lesion?", "Left Lung", "en", "OPEN"),
        _slake(9, "xmlab3", "有病变吗?", "有", "zh", "CLOSED"),
    ],
}


def write_slake(root: Path, huggingface: bool = False) -> Path:
    """Original layout (validate.json, imgs/) or the Hugging Face one (validation.json, imgs.zip)."""
    folder = root / ("slake-hf" if huggingface else "slake")
    names = {"train": "train.json", "validation": "validation.json" if huggingface else "validate.json", "test": "test.json"}
    for split, records in SLAKE_SPLITS.items():
        write_json(folder / names[split], records)
    images = {f"xmlab{n}/source.jpg": jpeg_bytes(30 + n) for n in range(4)}
    if huggingface:
        with zipfile.ZipFile(folder / "imgs.zip", "w") as zipped:
            for name, data in images.items():
                zipped.writestr(f"imgs/{name}", data)
    else:
        for name, data in images.items():
            target = folder / "imgs" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            (target.parent / "detection.json").write_text("[]")
    return folder


# -- PathVQA ---------------------------------------------------------------------------------------


def write_pathvqa(root: Path) -> Path:
    """Original pickles: train 3 rows (train_0001 is a CMYK JPEG), val 1 row, test 2 rows.

    ``test_0000`` also is byte-identical to ``train_0000`` (a leak); ``test_0005`` is missing.
    """
    folder = root / "pvqa"
    train0 = jpeg_bytes(40)
    for split, stem, data in (
        ("train", "train_0000", train0),
        ("train", "train_0001", jpeg_bytes(41, mode="CMYK")),
        ("val", "val_0000", jpeg_bytes(42)),
        ("test", "test_0000", train0),
    ):
        target = folder / "images" / split / f"{stem}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    qas = {
        "train": [
            {"image": "train_0000", "question": "Is this tissue necrotic?", "answer": "yes"},
            {"image": "train_0001", "question": "What does this image show?", "answer": "granulomatous inflammation"},
            {"image": "train_0001", "question": "Are the cells stained?", "answer": "no"},
        ],
        "val": [{"image": "val_0000", "question": "What organ is this?", "answer": "kidney"}],
        "test": [
            {"image": "test_0000", "question": "Is there fibrosis?", "answer": "yes"},
            {"image": "test_0005", "question": "What is present?", "answer": "metaplasia"},
        ],
    }
    for split, records in qas.items():
        write_pickle(folder / "qas" / split / f"{split}_qa.pkl", records)
    write_pickle(folder / "qas" / "train_vqa.pkl", [
        {"answer_type": "yes/no", "img_id": "train_0000", "label": {"yes": 1}, "question_id": 100,
         "question_type": "is", "sent": "Is this tissue necrotic?"},
        {"answer_type": "other", "img_id": "train_0001", "label": {"granulomatous inflammation": 1},
         "question_id": 101, "question_type": "what", "sent": "What does this image show?"},
    ])
    return folder


def write_pickle(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump(data, handle)
    return path


def write_pathvqa_parquet(root: Path) -> Path:
    """Hugging Face copy with train 2, validation 1, test 1 rows; one train image is CMYK."""
    folder = root / "pathvqa-hf"
    write_parquet(folder / "data" / "train-00000-of-00001.parquet", [
        (jpeg_bytes(50, mode="CMYK"), "is this an inflammatory lesion?", "yes"),
        (jpeg_bytes(51), "what is shown?", "adenocarcinoma"),
    ])
    write_parquet(folder / "data" / "validation-00000-of-00001.parquet", [
        (jpeg_bytes(52), "are the nuclei enlarged?", "no"),
    ])
    write_parquet(folder / "data" / "test-00000-of-00001.parquet", [
        (jpeg_bytes(53), "what stain was used?", "h&e"),
    ])
    return folder


# -- LLaVA-Med -------------------------------------------------------------------------------------


def write_llava_med(root: Path) -> Path:
    """Instruction data (2 records, 3 turn pairs), eval ground truth with the ``conversatons`` key
    (2 records), a question file (2 lines: one matches an eval id, one has no answer) and a model
    answer file, which must be skipped."""
    folder = root / "llava-med"
    for seed, name in enumerate(("PMC1_F1.jpg", "PMC2_F3.jpg", "synpic100.jpg")):
        write_jpeg(folder / "images" / name, 60 + seed)
    write_json(folder / "llava_med_instruct_fixture.json", [
        {"id": "PMC1_F1", "image": "PMC1_F1.jpg",
         "domain": {"chest_xray": True, "mri": False, "histology": False, "gross": False, "ct_scan": False},
         "conversations": [
             {"from": "human", "value": "<image>\nWhat does the chest X-ray show?"},
             {"from": "gpt", "value": "The chest X-ray shows a right-sided pleural effusion."},
             {"from": "human", "value": "Is the heart enlarged?"},
             {"from": "gpt", "value": "No, the cardiac silhouette is within normal limits."},
         ]},
        {"id": "PMC2_F3", "image": "PMC2_F3.jpg",
         "domain": {"chest_xray": False, "mri": False, "histology": True, "gross": False, "ct_scan": False},
         "conversations": [
             {"from": "human", "value": "What type of tissue is seen here?\n<image>"},
             {"from": "gpt", "value": "Glandular tissue with atypical cells."},
         ]},
    ])
    write_json(folder / "vqa_gt_fixture.json", [
        {"id": "q1", "image": "synpic100.jpg", "answer_type": "CLOSED",
         "conversatons": [{"from": "human", "value": "<image>\nIs there a mass?"}, {"from": "gpt", "value": "yes"}]},
        {"id": "q2", "image": "synpic100.jpg", "answer_type": "OPEN",
         "conversations": [{"from": "human", "value": "<image>\nWhere is the mass?"}, {"from": "gpt", "value": "left upper lobe"}]},
    ])
    (folder / "questions.jsonl").write_text(
        json.dumps({"question_id": "q1", "image": "synpic100.jpg", "text": "Is there a mass?"}) + "\n"
        + json.dumps({"question_id": "q9", "image": "PMC2_F3.jpg", "text": "Describe the staining."}) + "\n",
        encoding="utf-8",
    )
    (folder / "answers.jsonl").write_text(
        json.dumps({"question_id": "q1", "prompt": "Is there a mass?", "text": "Yes.", "answer_id": "x",
                    "model_id": "llava-med", "metadata": {}}) + "\n",
        encoding="utf-8",
    )
    return folder


# -- folder with DICOM -----------------------------------------------------------------------------


def write_dicom_folder(root: Path, dicom_names: list[str], frames: dict[str, int] | None = None) -> Path:
    """A folder with pydicom test DICOMs, one PNG, and a samples.csv asking one question per file.

    ``frames`` picks the frame of multi-frame files (column ``frame``).
    """
    from pydicom.data import get_testdata_file

    frames = frames or {}
    folder = root / "dicom-folder"
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["image,question,answer,split,frame"]
    for index, name in enumerate(dicom_names):
        shutil.copy(get_testdata_file(name), folder / name)
        lines.append(f"{name},What modality is image {index}?,answer {index},train,{frames.get(name, 0)}")
    Image.fromarray(np.full((16, 16), 7, dtype=np.uint8)).save(folder / "plain.png")
    lines.append("plain.png,Is this plain?,Yes,test,")
    (folder / "samples.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def run_import(*argv: str) -> tuple[int, dict, str, str]:
    """Run ``python -m hscr import ...`` in this process; return (exit code, JSON report, stdout, stderr)."""
    import contextlib

    from hscr.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["import", *argv, "--json"])
    lines = out.getvalue().strip().splitlines()
    report = json.loads(lines[-1]) if lines else {}
    return code, report, out.getvalue(), err.getvalue()
