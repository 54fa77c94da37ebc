"""Prepare: the pure middle. Who sends, with which settings, and the message that goes out.

No I/O here (no sockets, files or processes): it imports only ``config``, ``transports``' size rules
and the shared modules, so every rewrite can be tested on bytes alone.
"""
