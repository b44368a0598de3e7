import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests start child processes (jobs, the app) beside the test process; spinning OpenMP threads
# waiting for work would then slow the tiny matrix products of the other process.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny LLaVA saved with save_pretrained (64 image tokens, sub-word tokenizer)."""
    from support import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llava")


@pytest.fixture()
def folder_dataset(tmp_path):
    """A folder of three images with a samples.csv."""
    from support import write_image_folder

    rows = [
        {"image": "a.png", "question": "is there a lesion in the left lung ?", "answer": "yes"},
        {"image": "b.png", "question": "which organ is shown ?", "answer": "the left lung"},
        {"image": "c.png", "question": "where is the abnormality located ?", "answer": "right upper lobe"},
        {"image": "b.png", "question": "how many lesions are visible ?", "answer": "two"},
    ]
    return write_image_folder(tmp_path / "folder", rows)
