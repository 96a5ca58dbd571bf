"""The attributes Lightbox indexes, by query level (PS3.18 §10.6.1.3, PS3.4 C.6).

One table drives the database schema, what ingest extracts, what QIDO-RS and
C-FIND can match on, and what they return without touching stored files.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class QueryLevel(enum.Enum):
    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    INSTANCE = "IMAGE"


class Kind(enum.Enum):
    UID = "uid"
    STRING = "string"
    PERSON_NAME = "pn"
    DATE = "date"
    TIME = "time"
    INTEGER = "int"
    MULTI = "multi"  # multi-valued code string kept as "\A\B\" (ModalitiesInStudy)
    COUNT = "count"  # computed by the archive, never extracted


@dataclass(frozen=True)
class Attribute:
    keyword: str
    tag: int
    vr: str
    level: QueryLevel
    column: str
    kind: Kind
    length: int = 64

    @property
    def tag_hex(self) -> str:
        return f"{self.tag:08X}"

    @property
    def integer_range(self) -> tuple[int, int]:
        """The values an integer attribute's VR can hold (PS3.5 Table 6.2-1):
        US 0 to 2^16 - 1, IS (and SL) -2^31 to 2^31 - 1. The index's integer
        columns hold exactly these on every database."""
        return (0, 0xFFFF) if self.vr == "US" else (-(2**31), 2**31 - 1)


P, ST, SE, IN = QueryLevel.PATIENT, QueryLevel.STUDY, QueryLevel.SERIES, QueryLevel.INSTANCE

ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("PatientName", 0x00100010, "PN", P, "patient_name", Kind.PERSON_NAME, 324),
    Attribute("PatientID", 0x00100020, "LO", P, "patient_id", Kind.STRING),
    Attribute("IssuerOfPatientID", 0x00100021, "LO", P, "issuer_of_patient_id", Kind.STRING),
    Attribute("PatientBirthDate", 0x00100030, "DA", P, "patient_birth_date", Kind.DATE, 8),
    Attribute("PatientSex", 0x00100040, "CS", P, "patient_sex", Kind.STRING, 16),
    Attribute("StudyInstanceUID", 0x0020000D, "UI", ST, "study_instance_uid", Kind.UID),
    Attribute("StudyDate", 0x00080020, "DA", ST, "study_date", Kind.DATE, 8),
    Attribute("StudyTime", 0x00080030, "TM", ST, "study_time", Kind.TIME, 16),
    Attribute("AccessionNumber", 0x00080050, "SH", ST, "accession_number", Kind.STRING, 16),
    Attribute("StudyID", 0x00200010, "SH", ST, "study_id", Kind.STRING, 16),
    Attribute("StudyDescription", 0x00081030, "LO", ST, "study_description", Kind.STRING),
    Attribute(
        "ReferringPhysicianName",
        0x00080090,
        "PN",
        ST,
        "referring_physician_name",
        Kind.PERSON_NAME,
        324,
    ),
    Attribute("ModalitiesInStudy", 0x00080061, "CS", ST, "modalities_in_study", Kind.MULTI, 256),
    Attribute("NumberOfStudyRelatedSeries", 0x00201206, "IS", ST, "number_of_series", Kind.COUNT),
    Attribute(
        "NumberOfStudyRelatedInstances", 0x00201208, "IS", ST, "number_of_instances", Kind.COUNT
    ),
    Attribute("SeriesInstanceUID", 0x0020000E, "UI", SE, "series_instance_uid", Kind.UID),
    Attribute("Modality", 0x00080060, "CS", SE, "modality", Kind.STRING, 16),
    Attribute("SeriesNumber", 0x00200011, "IS", SE, "series_number", Kind.INTEGER),
    Attribute("SeriesDescription", 0x0008103E, "LO", SE, "series_description", Kind.STRING),
    Attribute("BodyPartExamined", 0x00180015, "CS", SE, "body_part_examined", Kind.STRING, 16),
    Attribute("SeriesDate", 0x00080021, "DA", SE, "series_date", Kind.DATE, 8),
    Attribute("SeriesTime", 0x00080031, "TM", SE, "series_time", Kind.TIME, 16),
    Attribute(
        "PerformedProcedureStepStartDate", 0x00400244, "DA", SE, "pps_start_date", Kind.DATE, 8
    ),
    Attribute(
        "PerformedProcedureStepStartTime", 0x00400245, "TM", SE, "pps_start_time", Kind.TIME, 16
    ),
    Attribute(
        "NumberOfSeriesRelatedInstances", 0x00201209, "IS", SE, "number_of_instances", Kind.COUNT
    ),
    Attribute("SOPInstanceUID", 0x00080018, "UI", IN, "sop_instance_uid", Kind.UID),
    Attribute("SOPClassUID", 0x00080016, "UI", IN, "sop_class_uid", Kind.UID),
    Attribute("InstanceNumber", 0x00200013, "IS", IN, "instance_number", Kind.INTEGER),
    Attribute("Rows", 0x00280010, "US", IN, "rows", Kind.INTEGER),
    Attribute("Columns", 0x00280011, "US", IN, "columns", Kind.INTEGER),
    Attribute("BitsAllocated", 0x00280100, "US", IN, "bits_allocated", Kind.INTEGER),
    Attribute("NumberOfFrames", 0x00280008, "IS", IN, "number_of_frames", Kind.INTEGER),
    Attribute("AvailableTransferSyntaxUID", 0x00083002, "UI", IN, "transfer_syntax_uid", Kind.UID),
)

# The Required Keys of the Study Root Query/Retrieve information model (PS3.4
# C.6.2.1), other than its Unique Keys. In the Patient Root model (C.6.1.1)
# PatientID is the patient's Unique Key instead.
STUDY_ROOT_REQUIRED_KEYS = frozenset({
    "PatientName", "PatientID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
    "Modality", "SeriesNumber", "InstanceNumber",
})
PATIENT_ROOT_REQUIRED_KEYS = STUDY_ROOT_REQUIRED_KEYS - {"PatientID"}

BY_KEYWORD: dict[str, Attribute] = {a.keyword: a for a in ATTRIBUTES}
BY_TAG: dict[int, Attribute] = {a.tag: a for a in ATTRIBUTES}

LEVEL_ORDER = (P, ST, SE, IN)


def at_level(level: QueryLevel) -> tuple[Attribute, ...]:
    """The attributes held at exactly ``level``."""
    return tuple(a for a in ATTRIBUTES if a.level is level)


def visible_at(level: QueryLevel) -> tuple[Attribute, ...]:
    """Attributes of ``level`` and every level above it (what a query there may match)."""
    upto = LEVEL_ORDER[: LEVEL_ORDER.index(level) + 1]
    return tuple(a for a in ATTRIBUTES if a.level in upto)


def lookup(key: str) -> Attribute | None:
    """Find an attribute by keyword or by 8-hex-digit tag (``0020000D``)."""
    found = BY_KEYWORD.get(key)
    if found is None and len(key) == 8:
        try:
            found = BY_TAG.get(int(key, 16))
        except ValueError:
            return None
    return found
