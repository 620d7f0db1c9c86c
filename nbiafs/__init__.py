"""nbiafs: The Cancer Imaging Archive as a read-only folder (FUSE)."""

__version__ = "0.1.0"
