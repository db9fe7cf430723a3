"""sluicegate: a Linux API gateway and transparent traffic manager."""

__version__ = "0.1.0"
