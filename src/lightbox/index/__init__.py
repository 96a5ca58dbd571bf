"""The index: what is stored, searchable by DICOM attributes (SQLite or PostgreSQL)."""
