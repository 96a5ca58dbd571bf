"""Blob storage: where the bytes of stored DICOM objects live."""
