"""Config: the one file an admin edits. Types, models, loading, checks, ``relay check``'s warnings, the
JSON schema, and where secrets live (files, environment, systemd credentials, ``relay passwd``'s store).

Imports only the shared modules (``envelope``, ``errors``, ``memo``): every stage may import it.
"""
