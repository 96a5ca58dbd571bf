"""Classic DICOM networking (DIMSE): the SCP that serves the archive and the SCU
that talks to other nodes. Handlers translate between pynetdicom and the
services; they decide nothing themselves."""
