"""Queue: the durable spool and what decides when mail leaves (workers, retries, limits, notices).

Imports ``prepare`` (a notice is a prepared message), ``transports`` (one attempt) and ``config``;
never ``intake`` or ``commands``.
"""
