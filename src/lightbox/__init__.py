"""Lightbox: an open-source archive for storing, viewing and sharing medical images."""

__version__ = "0.1.0"
