"""relay: a local SMTP relay for legacy business software."""

__version__ = "0.1.0"
