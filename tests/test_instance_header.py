"""Reading a header: what is read straight from the bytes (the whole header
of a plain file, or the UIDs and image dimensions of any other) is what
pydicom decodes, on every file of pydicom's test data and on the synthetic
corpus, whether the file is accepted or refused and why."""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom.dsutils import split_dataset

from lightbox.dicom import fastheader, instance, uids
from lightbox.dicom.instance import InstanceRecord, read_instance
from lightbox.errors import InvalidInstance
from tests.corpus_report import corpus_files, name_of
from tests.dimse_peers import make_corpus
from tests.factories import ct_dataset, to_bytes, write


def _outcome(path: Path) -> InstanceRecord | str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return read_instance(path)
        except InvalidInstance as exc:
            return f"{type(exc).__name__}: {exc.message}"


def _through_pydicom(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_raw(_ds: Dataset, _keyword: str) -> Any:
        return None

    def no_direct(_fp: BinaryIO, _size: int) -> None:
        return None

    monkeypatch.setattr(instance, "_raw", no_raw)
    monkeypatch.setattr(instance, "_read_directly", no_direct)


def _read_directly(path: Path) -> bool:
    with open(path, "rb") as fp:
        return instance._read_directly(fp, path.stat().st_size) is not None


def test_file_meta_read_straight_is_what_pynetdicom_reads_on_every_test_file() -> None:
    # C-GET, C-MOVE and lightbox send find the data set and its UIDs this way;
    # pynetdicom would have pydicom read the File Meta Information.
    read = 0
    for path in corpus_files():
        meta = fastheader.file_meta(path)
        if meta is None:
            continue
        read += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected, offset = split_dataset(path)
        assert (meta.sop_class_uid, meta.sop_instance_uid, meta.transfer_syntax_uid,
                meta.data_set_offset) == (expected.MediaStorageSOPClassUID,
                                          expected.MediaStorageSOPInstanceUID,
                                          expected.TransferSyntaxUID, offset), name_of(path)
    assert read > 50


def test_unusual_file_meta_is_left_to_pydicom(tmp_path: Path) -> None:
    full = to_bytes(ct_dataset())
    bare = tmp_path / "bare.dcm"
    bare.write_bytes(full[128 + 4:])  # no preamble
    assert fastheader.file_meta(bare) is None
    no_class = bytearray(full)
    start = no_class.index(b"\x02\x00\x02\x00UI")  # Media Storage SOP Class UID
    no_class[start + 2:start + 4] = b"\x04\x00"  # now (0002,0004): no such element
    no_class_path = tmp_path / "no-class.dcm"
    no_class_path.write_bytes(bytes(no_class))
    assert fastheader.file_meta(no_class_path) is None


def test_direct_reads_match_pydicom_on_every_test_file(monkeypatch: pytest.MonkeyPatch) -> None:
    files = corpus_files()
    direct = {name_of(path): _outcome(path) for path in files}
    read_directly = [name_of(path) for path in files if _read_directly(path)]
    _through_pydicom(monkeypatch)
    decoded = {name_of(path): _outcome(path) for path in files}
    assert direct == decoded
    stored = [name for name, outcome in direct.items() if isinstance(outcome, InstanceRecord)]
    assert len(stored) > 50 and len(stored) < len(direct)  # both kinds were compared
    # Both readings of the header were compared on many files.
    assert 20 < len(read_directly) < len(stored), read_directly


@pytest.mark.parametrize("syntax", ["explicit", "implicit", "rle", "jpegls"])
def test_whole_header_read_directly_matches_pydicom_on_the_corpus(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, syntax: str
) -> None:
    files = make_corpus(tmp_path, "--slices", "2", "--size", "32", "--mr", "--syntax", syntax)
    assert len(files) == 3 and all(_read_directly(path) for path in files)  # CT 2 + MR 1
    direct = [_outcome(path) for path in files]
    _through_pydicom(monkeypatch)
    assert direct == [_outcome(path) for path in files]


def _with_sequences(tmp_path: Path, *, implicit: bool, undefined: bool) -> Path:
    ds = ct_dataset(size=16)
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "T-D3000", "SRT", "Chest"
    ds.AnatomicRegionSequence = Sequence([code])
    ds.ReferencedImageSequence = Sequence([])
    if not implicit:  # implicit VR Pixel Data is "OB or OW": pydicom decides
        icon = Dataset()
        icon.Rows, icon.Columns, icon.BitsAllocated, icon.SamplesPerPixel = 2, 2, 8, 1
        icon.PixelData = bytes(4)
        ds.IconImageSequence = Sequence([icon])
    ds.ProcedureCodeSequence = Sequence([code, code])
    path = tmp_path / f"sequences-{implicit}-{undefined}.dcm"
    if implicit:
        ds.file_meta.TransferSyntaxUID = uids.IMPLICIT_VR_LITTLE_ENDIAN
    for element in ds.iterall():
        if element.VR == "SQ":
            element.is_undefined_length = undefined
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize("undefined", [False, True])
def test_sequences_read_directly_match_pydicom(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, implicit: bool, undefined: bool
) -> None:
    path = _with_sequences(tmp_path, implicit=implicit, undefined=undefined)
    assert _read_directly(path)
    direct = _outcome(path)
    assert isinstance(direct, InstanceRecord) and b'"00082218"' in direct.metadata
    _through_pydicom(monkeypatch)
    assert direct == _outcome(path)


def test_uid_with_padding_and_odd_values(tmp_path: Path) -> None:
    padded = ct_dataset(size=16)
    padded.SOPInstanceUID = "1.2.3.4"  # written with a trailing NUL
    write(padded, tmp_path / "padded.dcm")
    assert read_instance(tmp_path / "padded.dcm").sop_instance_uid == "1.2.3.4"
    two = ct_dataset(size=16)
    two.SeriesInstanceUID = ["1.2.3", "1.2.4"]
    write(two, tmp_path / "two.dcm")
    with pytest.raises(InvalidInstance, match="SeriesInstanceUID is not a valid UID"):
        read_instance(tmp_path / "two.dcm")


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
def test_non_finite_floats_are_null_either_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # JSON has no NaN or Infinity (browsers refuse them): read directly or by
    # pydicom, such a value becomes null in the cached DICOM JSON.
    ds = ct_dataset(size=16, DiffusionGradientOrientation=[float("nan"), float("inf"), 1.0],
                    RecommendedDisplayFrameRateInFloat=float("-inf"))
    item = Dataset()
    item.DiffusionBValue = float("nan")
    ds.MRDiffusionSequence = Sequence([item])
    write(ds, tmp_path / "floats.dcm")
    decimal = ct_dataset(size=16)
    decimal.add_new(0x00180050, "DS", "NaN\\2.5")  # not a valid DS: pydicom decodes it
    write(decimal, tmp_path / "decimal.dcm")

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    direct = read_instance(tmp_path / "floats.dcm")
    assert _read_directly(tmp_path / "floats.dcm")
    _through_pydicom(monkeypatch)
    for record in (direct, read_instance(tmp_path / "floats.dcm")):
        obj = json.loads(record.metadata, parse_constant=refuse)
        assert obj["00189089"] == {"vr": "FD", "Value": [None, None, 1.0]}
        assert obj["00089459"] == {"vr": "FL", "Value": [None]}
        assert obj["00189117"]["Value"][0]["00189087"] == {"vr": "FD", "Value": [None]}
    obj = json.loads(read_instance(tmp_path / "decimal.dcm").metadata, parse_constant=refuse)
    assert obj["00180050"] == {"vr": "DS", "Value": [None, 2.5]}


def _nested(tmp_path: Path, depth: int) -> Path:
    """A CT whose Content Sequence nests ``depth`` levels deep (undefined lengths)."""
    base = to_bytes(ct_dataset(size=16))
    pixels = base.index(b"\xe0\x7f\x10\x00OW")
    body = struct.pack("<HH2sH", 0x0008, 0x0100, b"SH", 2) + b"X "
    for _ in range(depth):
        body = (struct.pack("<HH2sHL", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
                + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + body
                + struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
    path = tmp_path / f"nested-{depth}.dcm"
    path.write_bytes(base[:pixels] + body + base[pixels:])
    return path


def test_deeply_nested_sequences_are_refused_with_a_reason(tmp_path: Path) -> None:
    assert isinstance(_outcome(_nested(tmp_path, 8)), InstanceRecord)
    assert _read_directly(_nested(tmp_path, 8))
    assert isinstance(_outcome(_nested(tmp_path, 40)), InstanceRecord)  # read by pydicom
    assert not _read_directly(_nested(tmp_path, 40))
    outcome = _outcome(_nested(tmp_path, 2000))
    assert isinstance(outcome, str) and outcome.startswith("InvalidInstance: unreadable DICOM")
