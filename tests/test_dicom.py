"""DICOM decoding with pydicom's shipped test files: LUTs, windows, frames, errors, privacy."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from hscr.dicom import KEPT_FIELDS, load_dicom
from hscr.errors import DataError
from hscr.images import WINDOW_PRESETS, apply_window, load_any, render_window

PRIVATE_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName")


def _copy(name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copy(get_testdata_file(name), target)
    return target


def _edited(name: str, tmp_path: Path, **changes) -> Path:
    ds = pydicom.dcmread(get_testdata_file(name))
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    target = tmp_path / f"edited_{name}"
    ds.save_as(target)
    return target


class TestGrayscale:
    def test_ct_modality_lut_gives_hounsfield(self):
        loaded = load_any(get_testdata_file("CT_small.dcm"))
        stored = pydicom.dcmread(get_testdata_file("CT_small.dcm")).pixel_array
        # CT_small has RescaleSlope 1 and RescaleIntercept -1024.
        assert np.array_equal(loaded.pixels, stored.astype(np.float32) - 1024.0)
        assert loaded.modality == "CT"
        assert loaded.source_format == "dicom"
        assert loaded.meta["rescale_intercept"] == -1024.0

    def test_ct_without_window_uses_full_range(self):
        loaded = load_any(get_testdata_file("CT_small.dcm"))
        rendered = np.asarray(loaded.image)
        assert rendered[loaded.pixels == loaded.pixels.min()].max() == 0
        assert rendered[loaded.pixels == loaded.pixels.max()].min() == 255

    def test_mr_uses_file_window(self):
        loaded = load_any(get_testdata_file("MR_small.dcm"))
        assert (loaded.window_center, loaded.window_width) == (600.0, 1600.0)
        expected = apply_window(loaded.pixels, 600.0, 1600.0)
        assert np.array_equal(np.asarray(loaded.image), expected)
        assert loaded.meta["window_center"] == 600.0
        assert loaded.meta["rows"] == 64

    def test_preset_rewindow_differs(self):
        loaded = load_any(get_testdata_file("CT_small.dcm"))
        lung = np.asarray(render_window(loaded, *WINDOW_PRESETS["lung"]))
        bone = np.asarray(render_window(loaded, *WINDOW_PRESETS["bone"]))
        assert np.array_equal(lung, apply_window(loaded.pixels, -600.0, 1500.0))
        assert not np.array_equal(lung, bone)

    def test_monochrome1_inverted_after_window(self, tmp_path: Path):
        normal = load_any(get_testdata_file("MR_small.dcm"))
        inverted = load_any(_edited("MR_small.dcm", tmp_path, PhotometricInterpretation="MONOCHROME1"))
        assert inverted.invert is True
        assert np.array_equal(np.asarray(inverted.image), 255 - np.asarray(normal.image))
        # The toggle flips back to the MONOCHROME2 look.
        again = render_window(inverted, 600, 1600, invert=True)
        assert np.array_equal(np.asarray(again), np.asarray(normal.image))

    def test_voi_lut_sequence_preferred(self, tmp_path: Path):
        ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
        item = Dataset()
        # 4096 entries from 0, 8 bits: output = input // 16, so the rendering is value // 16.
        item.add_new("LUTDescriptor", "US", [4096, 0, 8])
        item.add_new("LUTData", "US", [value // 16 for value in range(4096)])
        ds.VOILUTSequence = Sequence([item])
        path = tmp_path / "voi.dcm"
        ds.save_as(path)
        loaded = load_any(path)
        expected = np.clip(loaded.pixels.astype(np.int64), 0, 4095) // 16
        assert np.array_equal(np.asarray(loaded.image), expected.astype(np.uint8))
        # The window stays available for re-windowing.
        assert loaded.window_center == 600.0

    def test_sigmoid_voi_function(self, tmp_path: Path):
        loaded = load_any(_edited("MR_small.dcm", tmp_path, VOILUTFunction="SIGMOID"))
        assert loaded.voi_function == "SIGMOID"
        assert np.array_equal(np.asarray(loaded.image), apply_window(loaded.pixels, 600, 1600, "SIGMOID"))


class TestFramesAndColour:
    def test_multiframe_frame_choice(self):
        path = get_testdata_file("rtdose.dcm")
        first, last = load_any(path, frame=0), load_any(path, frame=14)
        all_frames = pydicom.dcmread(path).pixel_array
        assert first.num_frames == 15
        assert last.frame == 14
        assert np.array_equal(last.pixels, all_frames[14].astype(np.float32))
        assert not np.array_equal(first.pixels, last.pixels)
        assert last.meta["frames"] == 15

    def test_frame_out_of_range(self):
        with pytest.raises(DataError, match="frame 15 is out of range.*15 frame"):
            load_any(get_testdata_file("rtdose.dcm"), frame=15)

    def test_jpeg_baseline_colour_decodes(self):
        loaded = load_any(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
        assert loaded.image.mode == "RGB"
        assert loaded.image.size == (100, 100)
        assert loaded.pixels is None
        assert loaded.meta["transfer_syntax"] == "JPEG Baseline (Process 1)"

    def test_multiframe_colour_jpeg(self):
        first = load_any(get_testdata_file("examples_ybr_color.dcm"), frame=0)
        later = load_any(get_testdata_file("examples_ybr_color.dcm"), frame=20)
        assert first.num_frames == 30
        assert first.image.size == later.image.size == (320, 240)
        assert first.image.tobytes() != later.image.tobytes()

    def test_16bit_rgb_scaled(self):
        loaded = load_any(get_testdata_file("SC_rgb_rle_16bit.dcm"))
        assert loaded.image.mode == "RGB"
        assert max(loaded.image.getextrema()[0]) == 255


class TestRejected:
    def test_truncated_file(self):
        with pytest.raises(DataError, match="truncated"):
            load_any(get_testdata_file("MR_truncated.dcm"))

    def test_jpeg_ls_names_package(self):
        with pytest.raises(DataError, match="no decoder is installed; install pylibjpeg pylibjpeg-libjpeg"):
            load_any(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))

    def test_12bit_jpeg_names_package(self):
        with pytest.raises(DataError, match="JPEG Extended.*install pylibjpeg pylibjpeg-libjpeg"):
            load_any(get_testdata_file("JPEG-lossy.dcm"))

    def test_no_pixel_data(self):
        with pytest.raises(DataError, match="has no image"):
            load_any(get_testdata_file("rtplan.dcm"))

    def test_text_with_dicom_suffix(self, tmp_path: Path):
        path = tmp_path / "fake.dcm"
        path.write_text("not a dicom file at all " * 20)
        with pytest.raises(DataError, match="not a DICOM image file"):
            load_any(path)

    def test_declared_bomb_rejected(self, tmp_path: Path):
        path = _edited("MR_small.dcm", tmp_path, Rows=60000, Columns=60000)
        with pytest.raises(DataError, match="decompression bomb"):
            load_any(path)


class TestPrivacy:
    def test_meta_has_only_kept_fields(self):
        allowed = set(KEPT_FIELDS.values()) | {
            "rows", "columns", "frames", "frame", "transfer_syntax", "sop_class",
            "window_center", "window_width", "voi_function",
        }
        for name in ("CT_small.dcm", "MR_small.dcm", "examples_overlay.dcm", "JPEG2000.dcm"):
            loaded = load_any(get_testdata_file(name))
            assert set(loaded.meta) <= allowed, name
            text = json.dumps(loaded.meta)
            ds = pydicom.dcmread(get_testdata_file(name))
            for keyword in PRIVATE_TAGS:
                value = str(ds.get(keyword) or "")
                if value:
                    assert value not in text, (name, keyword)

    def test_pydicom_log_records_dropped(self, caplog):
        caplog.set_level(logging.DEBUG)
        with pytest.raises(DataError):
            load_dicom(get_testdata_file("badVR.dcm"))
        assert not [record for record in caplog.records if record.name.startswith("pydicom")]
        assert "Lastname" not in caplog.text


def test_burned_in_annotation_rejected(tmp_path: Path):
    path = _edited("MR_small.dcm", tmp_path, BurnedInAnnotation="YES")
    with pytest.raises(DataError, match="BurnedInAnnotation YES"):
        load_any(path)


def test_functional_group_rescale_and_window(tmp_path: Path):
    # Enhanced multi-frame objects keep rescale and window in functional group sequences.
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    del ds.WindowCenter
    del ds.WindowWidth
    transform, voi = Dataset(), Dataset()
    transform.RescaleSlope = 2
    transform.RescaleIntercept = 10
    transform.RescaleType = "US"
    voi.WindowCenter = 700
    voi.WindowWidth = 900
    shared = Dataset()
    shared.PixelValueTransformationSequence = Sequence([transform])
    shared.FrameVOILUTSequence = Sequence([voi])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    path = tmp_path / "enhanced.dcm"
    ds.save_as(path)

    loaded = load_any(path)
    stored = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array.astype(np.float32)
    assert np.array_equal(loaded.pixels, stored * 2 + 10)
    assert (loaded.window_center, loaded.window_width) == (700.0, 900.0)
    assert np.array_equal(np.asarray(loaded.image), apply_window(loaded.pixels, 700, 900))
