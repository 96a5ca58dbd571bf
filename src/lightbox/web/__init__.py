"""HTTP adapters: DICOMweb, WADO-URI, operations endpoints."""
