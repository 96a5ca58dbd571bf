"""The ``lightbox`` command."""
