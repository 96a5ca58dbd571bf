"""De-identification on the fly: PS3.15 Annex E, Basic Application Level
Confidentiality Profile.

Each attribute of the profile's table gets its action: removed (X), emptied
(Z), given a dummy value (D), or its UIDs replaced (U). Where the table
allows a choice the stricter one that keeps the object valid is taken: X/Z
and X/Z/D empty the value, Z/D empties it, X/D gives a dummy, and X/Z/U*
sequences are kept with their UIDs replaced. Private attributes, curves and
overlays are removed everywhere, inside sequences too.

UIDs are replaced by ``2.25.<number>`` derived from a per-link secret, so the
same original UID always gets the same public UID within one link (series
and instance references, Frame of Reference UIDs stay consistent) and never
the same one across links. Pixel data bytes are left as they are; instances
with burned-in annotation are withheld by the caller (:func:`burned_in`).

The same rules work on pydicom datasets (retrieved instances) and on DICOM
JSON objects (metadata and search results).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID

REMOVE, EMPTY, DUMMY, REPLACE_UID, CLEAN_ITEMS = "X", "Z", "D", "U", "X/Z/U*"
PROFILE_NAME = "Basic Application Confidentiality Profile"
PROFILE_CODE = ("113100", "DCM", PROFILE_NAME)
DICOM_ROOT = "1.2.840.10008."
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1387.1.1"

# Table E.1-1, the Basic Profile column, by action as written in the standard.
_TABLE = {
    "X": """
        AcquisitionComments AcquisitionContextSequence AcquisitionProtocolDescription
        ActualHumanPerformersSequence AdditionalPatientHistory AddressTrial AdmissionID
        AdmittingDate AdmittingDiagnosesCodeSequence AdmittingDiagnosesDescription
        AdmittingTime Allergies Arbitrary AuthorObserverSequence BranchOfService CassetteID
        CommentsOnThePerformedProcedureStep ConfidentialityConstraintOnPatientDataDescription
        ConsultingPhysicianIdentificationSequence ContentCreatorIdentificationCodeSequence
        ContentSequence ContributionDescription CountryOfResidence CurrentPatientLocation
        CurveDate CurveTime CustodialOrganizationSequence DataSetTrailingPadding
        DateOfLastCalibration DateOfSecondaryCapture DerivationDescription
        DigitalSignatureUID DigitalSignaturesSequence DischargeDiagnosisDescription
        DistributionAddress DistributionName EthnicGroup ExpectedCompletionDateTime
        FrameComments GantryID GeneratorID HumanPerformerName HumanPerformerOrganization
        IconImageSequence IdentifyingComments ImageComments ImagePresentationComments
        ImagingServiceRequestComments Impressions InstitutionAddress
        InstitutionalDepartmentName InsurancePlanIdentification
        IntendedRecipientsOfResultsIdentificationSequence InterpretationApproverSequence
        InterpretationAuthor InterpretationDiagnosisDescription InterpretationIDIssuer
        InterpretationRecorder InterpretationText InterpretationTranscriber
        IssuerOfAdmissionID IssuerOfPatientID IssuerOfServiceEpisodeID LastMenstrualDate MAC
        MedicalAlerts MedicalRecordLocator MilitaryRank ModifiedAttributesSequence
        ModifiedImageDescription ModifyingDeviceID ModifyingDeviceManufacturer
        NameOfPhysiciansReadingStudy NamesOfIntendedRecipientsOfResults Occupation
        OrderCallbackPhoneNumber OrderCallbackTelecomInformation OrderEnteredBy
        OrderEntererLocation OriginalAttributesSequence OtherPatientIDs
        OtherPatientIDsSequence OtherPatientNames OverlayDate OverlayTime ParticipantSequence
        PatientAddress PatientAge PatientBirthName PatientBirthTime PatientComments
        PatientInstitutionResidence PatientInsurancePlanCodeSequence PatientMotherBirthName
        PatientPrimaryLanguageCodeSequence PatientPrimaryLanguageModifierCodeSequence
        PatientReligiousPreference PatientSize PatientState PatientTelephoneNumbers
        PatientTransportArrangements PatientWeight PerformedLocation
        PerformedProcedureStepEndDateTime PerformedProcedureStepStartDateTime
        PerformedStationAETitle PerformedStationGeographicLocationCodeSequence
        PerformedStationName PerformedStationNameCodeSequence
        PerformingPhysicianIdentificationSequence PerformingPhysicianName PersonAddress
        PersonTelephoneNumbers PhysicianApprovingInterpretation
        PhysiciansOfRecord PhysiciansOfRecordIdentificationSequence
        PhysiciansReadingStudyIdentificationSequence PlateID PreMedication PregnancyStatus
        ReasonForStudy ReasonForTheImagingServiceRequest ReferencedDigitalSignatureSequence
        ReferencedPatientAliasSequence ReferencedPatientPhotoSequence
        ReferencedPatientSequence ReferencedSOPInstanceMACSequence ReferringPhysicianAddress
        ReferringPhysicianIdentificationSequence ReferringPhysicianTelephoneNumbers
        RegionOfResidence RequestAttributesSequence RequestedContrastAgent
        RequestedProcedureComments RequestedProcedureID RequestedProcedureLocation
        RequestingPhysician RequestingPhysicianIdentificationSequence RequestingService
        ResponsibleOrganization ResponsiblePerson ResultsComments
        ResultsDistributionListSequence ResultsIDIssuer ScheduledHumanPerformersSequence
        ScheduledPatientInstitutionResidence ScheduledPerformingPhysicianIdentificationSequence
        ScheduledPerformingPhysicianName ScheduledProcedureStepDescription
        ScheduledProcedureStepLocation ScheduledStationAETitle
        ScheduledStationGeographicLocationCodeSequence ScheduledStationName
        ScheduledStationNameCodeSequence ScheduledStudyLocation ScheduledStudyLocationAETitle
        SeriesDescription ServiceEpisodeDescription ServiceEpisodeID SmokingStatus
        SoftwareVersions SpecialNeeds StorageMediaFileSetID StudyComments StudyDescription
        StudyIDIssuer TextComments TextString TimeOfLastCalibration TimeOfSecondaryCapture
        TimezoneOffsetFromUTC TopicAuthor TopicKeywords TopicSubject TopicTitle
        VerifyingOrganization VisitComments
    """,
    "Z": """
        AccessionNumber ConsultingPhysicianName ContentCreatorName
        FillerOrderNumberImagingServiceRequest PatientBirthDate PatientID PatientName
        PatientSex PlacerOrderNumberImagingServiceRequest ReferringPhysicianName StudyDate
        StudyID StudyTime VerifyingObserverIdentificationCodeSequence
    """,
    "D": """
        AcquisitionFieldOfViewLabel ContainerIdentifier Date DateTime
        GraphicAnnotationSequence PersonIdentificationCodeSequence PersonName
        PresentationCreationDate PresentationCreationTime SpecimenIdentifier Time
        VerifyingObserverName VerifyingObserverSequence
    """,
    "U": """
        AcquisitionUID ConcatenationUID ContextGroupExtensionCreatorUID CreatorVersionUID
        DeviceUID DimensionOrganizationUID DoseReferenceUID FailedSOPInstanceUIDList
        FiducialUID FrameOfReferenceUID InstanceCreatorUID IrradiationEventUID
        LargePaletteColorLookupTableUID MediaStorageSOPInstanceUID
        PresentationDisplayCollectionUID PresentationSequenceCollectionUID
        ReferencedFrameOfReferenceUID ReferencedGeneralPurposeScheduledProcedureStepTransactionUID
        ReferencedObservationUIDTrial ReferencedSOPInstanceUID ReferencedSOPInstanceUIDInFile
        RelatedFrameOfReferenceUID SOPInstanceUID SeriesInstanceUID SpecimenUID
        StorageMediaFileSetUID StudyInstanceUID SynchronizationFrameOfReferenceUID TargetUID
        TemplateExtensionCreatorUID TemplateExtensionOrganizationUID TrackingUID
        TransactionUID UID
    """,
    "X/Z": """
        AcquisitionDate AcquisitionTime PatientSexNeutered ReferencedStudySequence
        RequestedProcedureDescription ReviewerName StructureSetDate StructureSetTime
    """,
    "X/D": """
        AcquisitionDateTime AcquisitionDeviceProcessingDescription DecayCorrectionDateTime
        DetectorID EndAcquisitionDateTime FrameAcquisitionDateTime FrameReferenceDateTime
        InstanceCreationDate ObservationDateTime OperatorIdentificationSequence ProtocolName
        RadiopharmaceuticalStartDateTime RadiopharmaceuticalStartTime
        RadiopharmaceuticalStopDateTime RadiopharmaceuticalStopTime SeriesDate SeriesTime
        StartAcquisitionDateTime
    """,
    "Z/D": "ContentDate ContentTime ContrastBolusAgent",
    "X/Z/D": """
        DeviceSerialNumber InstanceCreationTime InstitutionCodeSequence InstitutionName
        OperatorsName ReferencedPerformedProcedureStepSequence SourceOfPreviousValues
        StationName
    """,
    "X/Z/U*": "ReferencedImageSequence SourceImageSequence",
}

# The choice taken where the table offers several (see the module docstring).
_RESOLVED = {"X": REMOVE, "Z": EMPTY, "D": DUMMY, "U": REPLACE_UID, "X/Z": EMPTY,
             "X/D": DUMMY, "Z/D": EMPTY, "X/Z/D": EMPTY, "X/Z/U*": CLEAN_ITEMS}


def _profile() -> dict[int, str]:
    table: dict[int, str] = {}
    for action, names in _TABLE.items():
        for keyword in names.split():
            tag = tag_for_keyword(keyword)
            assert tag is not None, keyword
            table[tag] = action
    return table


BASIC_PROFILE: dict[int, str] = _profile()
"""Tag → the action written in Table E.1-1 (e.g. ``"X/Z/D"``)."""


def action_of(tag: int) -> str | None:
    """The action applied to ``tag`` (one of X, Z, D, U, X/Z/U*), None to keep it.

    Private attributes, curve data (50xx) and overlay data and comments (60xx)
    are removed.
    """
    group = tag >> 16
    if group & 1 or 0x5000 <= group <= 0x501E or (
        0x6000 <= group <= 0x601E and tag & 0xFFFF in (0x3000, 0x4000)
    ):
        return REMOVE
    written = BASIC_PROFILE.get(tag)
    if written is not None:
        return _RESOLVED[written]
    if _is_instance_uid(tag):
        return REPLACE_UID
    return None


def _is_instance_uid(tag: int) -> bool:
    """A UI attribute outside the table that names an instance of something
    (not a class, transfer syntax or coding scheme)."""
    keyword = keyword_for_tag(tag)
    if not keyword.endswith("UID") or tag >> 16 == 0x0002:
        return False
    return not any(part in keyword for part in ("Class", "TransferSyntax", "CodingScheme"))


class UidMapper:
    """Original UID → public UID for one link: ``2.25.`` and 128 bits of
    SHA-256 over the link's secret and the UID (at most 44 characters)."""

    def __init__(self, secret: str) -> None:
        self._secret = secret.encode()

    def public(self, uid: str) -> str:
        uid = uid.strip().rstrip("\x00")
        if not uid or uid.startswith(DICOM_ROOT):
            return uid  # well-known UIDs defined by the standard identify nobody
        digest = hashlib.sha256(self._secret + b"|" + uid.encode()).digest()
        return f"2.25.{int.from_bytes(digest[:16], 'big')}"


# -- dummy values -------------------------------------------------------------------

_DUMMY_TEXT = {"DA": "19000101", "TM": "000000", "DT": "19000101000000", "AS": "000Y",
               "IS": "0", "DS": "0", "UR": ""}
_NUMBER_VRS = {"US", "SS", "UL", "SL", "FL", "FD", "SV", "UV"}
_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
DUMMY_NAME = "ANONYMIZED"


def _dummy(vr: str) -> Any:
    if vr in _NUMBER_VRS:
        return 0
    if vr in _BINARY_VRS:
        return b""
    return _DUMMY_TEXT.get(vr, DUMMY_NAME)


# -- pydicom datasets -----------------------------------------------------------------


def burned_in(ds: Dataset) -> bool:
    return str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES"


def clean_dataset(ds: Dataset, mapper: UidMapper) -> None:
    """Apply the profile to ``ds`` in place, inside sequences too."""
    for tag in list(ds.keys()):
        action = action_of(int(tag))
        if action is None and ds.get_item(tag) is not None and _vr_of(ds, tag) == "SQ":
            action = CLEAN_ITEMS  # kept sequences are cleaned inside
        if action is None:
            continue
        if action == REMOVE:
            del ds[tag]
            continue
        elem = ds[tag]
        if elem.VR == "SQ":
            _clean_sequence(elem.value, mapper, empty=action == EMPTY)
        elif action == EMPTY:
            elem.value = None
        elif action == DUMMY:
            elem.value = _dummy(elem.VR)
        elif action == REPLACE_UID and elem.VR == "UI" and elem.value:
            elem.value = _map_values(elem.value, mapper.public)


def _vr_of(ds: Dataset, tag: Any) -> str:
    item = ds.get_item(tag)
    vr = getattr(item, "VR", None)
    return str(vr) if vr else str(ds[tag].VR)


def _clean_sequence(items: DicomSequence, mapper: UidMapper, *, empty: bool) -> None:
    if empty:
        del items[:]
        return
    for item in items:
        clean_dataset(item, mapper)


def _map_values(value: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return fn(value)
    return [fn(str(v)) for v in value]


def mark_identity_removed(ds: Dataset) -> None:
    """Patient Identity Removed, and which profile removed it."""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = PROFILE_NAME
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = PROFILE_CODE
    ds.DeidentificationMethodCodeSequence = DicomSequence([code])


def deidentify_file(source: BinaryIO, mapper: UidMapper) -> bytes:
    """A de-identified copy of a Part 10 file, in its own transfer syntax.

    The preamble is zeroed and the file meta rebuilt (no source AE title or
    private information); pixel data bytes are copied unchanged.
    """
    ds = dcmread(source, force=True)
    syntax = ds.file_meta.get("TransferSyntaxUID")
    clean_dataset(ds, mapper)
    mark_identity_removed(ds)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(str(syntax))
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = "LIGHTBOX_01"
    ds.file_meta = meta
    ds.preamble = bytes(128)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


# -- DICOM JSON -------------------------------------------------------------------------


def _json_dummy(vr: str) -> dict[str, Any]:
    if vr == "PN":
        return {"vr": vr, "Value": [{"Alphabetic": DUMMY_NAME}]}
    if vr in _BINARY_VRS or vr == "UR":
        return {"vr": vr}
    value = _dummy(vr)
    if vr in ("IS", "DS"):
        value = 0
    return {"vr": vr, "Value": [value]}


def clean_json(obj: dict[str, Any], mapper: UidMapper) -> dict[str, Any]:
    """A DICOM JSON object with the profile applied (a new object).

    UR values (Retrieve URL, BulkDataURIs) get their UID path segments mapped,
    so that they point at the public UIDs of the same link.
    """
    out: dict[str, Any] = {}
    for key, element in obj.items():
        cleaned = _clean_element(int(key, 16), element, mapper)
        if cleaned is not None:
            out[key] = cleaned
    return out


def _clean_element(tag: int, element: dict[str, Any], mapper: UidMapper) -> dict[str, Any] | None:
    action = action_of(tag)
    vr = str(element.get("vr", "UN"))
    if action == REMOVE:
        return None
    if vr == "SQ":
        if action == EMPTY:
            return {"vr": vr}
        items = [clean_json(item, mapper) for item in element.get("Value", [])]
        return {"vr": vr, "Value": items} if items else {"vr": vr}
    if action == EMPTY:
        return {"vr": vr}
    if action == DUMMY:
        return _json_dummy(vr)
    result = dict(element)
    if action == REPLACE_UID and vr == "UI" and "Value" in element:
        result["Value"] = [mapper.public(str(v)) if v else v for v in element["Value"]]
    if "BulkDataURI" in element:
        result["BulkDataURI"] = map_url(str(element["BulkDataURI"]), mapper)
    if vr == "UR" and "Value" in element:
        result["Value"] = [map_url(str(v), mapper) if v else v for v in element["Value"]]
    return result


def map_url(url: str, mapper: UidMapper) -> str:
    """``url`` with every path segment after studies/series/instances mapped."""
    parts = url.split("/")
    for i in range(1, len(parts)):
        if parts[i - 1] in ("studies", "series", "instances") and parts[i]:
            parts[i] = mapper.public(parts[i])
    return "/".join(parts)


def identity_removed_json() -> dict[str, Any]:
    """The elements :func:`mark_identity_removed` adds, as DICOM JSON."""
    value, scheme, meaning = PROFILE_CODE
    return {
        "00120062": {"vr": "CS", "Value": ["YES"]},
        "00120063": {"vr": "LO", "Value": [PROFILE_NAME]},
        "00120064": {"vr": "SQ", "Value": [{
            "00080100": {"vr": "SH", "Value": [value]},
            "00080102": {"vr": "SH", "Value": [scheme]},
            "00080104": {"vr": "LO", "Value": [meaning]},
        }]},
    }


def deidentify_json(obj: dict[str, Any], mapper: UidMapper) -> dict[str, Any]:
    """An instance's (or search result's) DICOM JSON, de-identified and marked."""
    cleaned = clean_json(obj, mapper)
    cleaned.update(identity_removed_json())
    return dict(sorted(cleaned.items()))


def json_burned_in(obj: dict[str, Any]) -> bool:
    values = obj.get("00280301", {}).get("Value") or [""]
    return str(values[0]).strip().upper() == "YES"
