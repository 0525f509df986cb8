"""The package version: the single source, read by setup.py and by fused_conv."""

__version__ = "0.1.0"
