"""Which query level an attribute belongs to, beyond the indexed ones.

QIDO-RS ``includefield=all`` at study or series level answers from a
representative instance's cached header; only the attributes of the
Patient, Study and (for series) Series and Equipment information entities
belong in such a result, not that instance's own (Image Position, Window
Center, ...). The modules are those of PS3.3 assigned to each entity:
Patient and Patient Demographic, Clinical Trial Subject; General Study,
Patient Study, Clinical Trial Study; General Series, Clinical Trial Series,
Frame of Reference, General Equipment.
"""

from __future__ import annotations

from pydicom.datadict import tag_for_keyword

from lightbox.dicom.attributes import ATTRIBUTES, LEVEL_ORDER, QueryLevel

_PATIENT = """
PatientName PatientID IssuerOfPatientID IssuerOfPatientIDQualifiersSequence TypeOfPatientID
PatientBirthDate PatientBirthTime PatientSex QualityControlSubject ReferencedPatientSequence
ReferencedPatientPhotoSequence OtherPatientIDsSequence OtherPatientNames EthnicGroup
PatientComments PatientSpeciesDescription PatientSpeciesCodeSequence PatientBreedDescription
PatientBreedCodeSequence BreedRegistrationSequence StrainDescription StrainNomenclature
StrainCodeSequence StrainAdditionalInformation StrainStockSequence
GeneticModificationsSequence ResponsiblePerson ResponsiblePersonRole ResponsibleOrganization
PatientIdentityRemoved DeidentificationMethod DeidentificationMethodCodeSequence
PatientBirthName PatientMotherBirthName PatientAddress PatientTelephoneNumbers
CountryOfResidence RegionOfResidence MilitaryRank BranchOfService
PatientReligiousPreference MedicalRecordLocator PatientInsurancePlanCodeSequence
PatientPrimaryLanguageCodeSequence ClinicalTrialSponsorName ClinicalTrialProtocolID
ClinicalTrialProtocolName ClinicalTrialSiteID ClinicalTrialSiteName ClinicalTrialSubjectID
ClinicalTrialSubjectReadingID ClinicalTrialProtocolEthicsCommitteeName
ClinicalTrialProtocolEthicsCommitteeApprovalNumber
"""

_STUDY = """
StudyInstanceUID StudyDate StudyTime ReferringPhysicianName
ReferringPhysicianIdentificationSequence ConsultingPhysicianName
ConsultingPhysicianIdentificationSequence StudyID AccessionNumber
IssuerOfAccessionNumberSequence StudyDescription PhysiciansOfRecord
PhysiciansOfRecordIdentificationSequence NameOfPhysiciansReadingStudy
PhysiciansReadingStudyIdentificationSequence RequestingServiceCodeSequence
ReferencedStudySequence ProcedureCodeSequence ReasonForPerformedProcedureCodeSequence
AdmittingDiagnosesDescription AdmittingDiagnosesCodeSequence PatientAge PatientSize
PatientWeight PatientBodyMassIndex MeasuredAPDimension MeasuredLateralDimension
PatientSizeCodeSequence MedicalAlerts Allergies SmokingStatus PregnancyStatus
LastMenstrualDate PatientState Occupation AdditionalPatientHistory AdmissionID
IssuerOfAdmissionIDSequence ServiceEpisodeID ServiceEpisodeDescription
IssuerOfServiceEpisodeIDSequence PatientSexNeutered ReasonForVisit ReasonForVisitCodeSequence
ClinicalTrialTimePointID ClinicalTrialTimePointDescription
ConsentForClinicalTrialUseSequence ModalitiesInStudy SOPClassesInStudy
"""

_SERIES = """
Modality SeriesInstanceUID SeriesNumber Laterality SeriesDate SeriesTime
PerformingPhysicianName PerformingPhysicianIdentificationSequence ProtocolName
SeriesDescription SeriesDescriptionCodeSequence OperatorsName OperatorIdentificationSequence
ReferencedPerformedProcedureStepSequence RelatedSeriesSequence BodyPartExamined
PatientPosition SmallestPixelValueInSeries LargestPixelValueInSeries
RequestAttributesSequence PerformedProcedureStepID PerformedProcedureStepStartDate
PerformedProcedureStepStartTime PerformedProcedureStepEndDate PerformedProcedureStepEndTime
PerformedProcedureStepDescription PerformedProtocolCodeSequence
CommentsOnThePerformedProcedureStep AnatomicalOrientationType
ClinicalTrialCoordinatingCenterName ClinicalTrialSeriesID ClinicalTrialSeriesDescription
FrameOfReferenceUID PositionReferenceIndicator Manufacturer InstitutionName
InstitutionAddress StationName InstitutionalDepartmentName
InstitutionalDepartmentTypeCodeSequence ManufacturerModelName DeviceSerialNumber
SoftwareVersions GantryID SpatialResolution DateOfLastCalibration TimeOfLastCalibration
PixelPaddingValue UDISequence DeviceUID ManufacturerDeviceClassUID
"""

# Attributes of the whole data set, at every level.
_EVERY_LEVEL = ("SpecificCharacterSet", "TimezoneOffsetFromUTC")


def _tags(keywords: str) -> set[str]:
    out = set()
    for keyword in keywords.split():
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise ValueError(f"{keyword} is not a DICOM keyword")
        out.add(f"{tag:08X}")
    return out


_LEVEL_OF: dict[str, QueryLevel] = {
    **dict.fromkeys(_tags(_SERIES), QueryLevel.SERIES),
    **dict.fromkeys(_tags(_STUDY), QueryLevel.STUDY),
    **dict.fromkeys(_tags(_PATIENT), QueryLevel.PATIENT),
    **{a.tag_hex: a.level for a in ATTRIBUTES},
}
_EVERYWHERE = _tags(" ".join(_EVERY_LEVEL))


def belongs_at(tag_hex: str, level: QueryLevel) -> bool:
    """Whether the attribute ``tag_hex`` belongs in a result at ``level``: it
    belongs to that level or one above it (every attribute does at instance
    level)."""
    if level is QueryLevel.INSTANCE or tag_hex in _EVERYWHERE:
        return True
    own = _LEVEL_OF.get(tag_hex)
    return own is not None and LEVEL_ORDER.index(own) <= LEVEL_ORDER.index(level)
