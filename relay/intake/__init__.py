"""Intake: the SMTP face legacy programs talk to (listener, who may submit, which OS user is calling).

Imports ``prepare`` and ``queue`` (a message is prepared, then committed to the spool before the 250);
never ``commands``.
"""
