"""Commands: the admin's tools (``relay`` and its subcommands, ``relay-sendmail``, the demo).

The top layer: may import every package; nothing imports it.
"""
