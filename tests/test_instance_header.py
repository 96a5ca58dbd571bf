"""Reading a header: the values read straight from an element's bytes (UIDs,
image dimensions) are the ones pydicom decodes, on every file of pydicom's
test data, whether the file is accepted or refused and why."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset

from lightbox.dicom import instance
from lightbox.dicom.instance import InstanceRecord, read_instance
from lightbox.errors import InvalidInstance
from tests.corpus_report import corpus_files, name_of
from tests.factories import ct_dataset, write


def _outcome(path: Path) -> InstanceRecord | str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return read_instance(path)
        except InvalidInstance as exc:
            return f"{type(exc).__name__}: {exc.message}"


def test_direct_reads_match_pydicom_on_every_test_file(monkeypatch: pytest.MonkeyPatch) -> None:
    files = corpus_files()
    direct = {name_of(path): _outcome(path) for path in files}

    def through_pydicom(_ds: Dataset, _keyword: str) -> Any:
        return None

    monkeypatch.setattr(instance, "_raw", through_pydicom)
    decoded = {name_of(path): _outcome(path) for path in files}
    assert direct == decoded
    stored = [name for name, outcome in direct.items() if isinstance(outcome, InstanceRecord)]
    assert len(stored) > 50 and len(stored) < len(direct)  # both kinds were compared


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
