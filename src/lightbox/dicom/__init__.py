"""DICOM domain: UIDs, instance records, the query model, DICOM JSON, pixel layout."""
