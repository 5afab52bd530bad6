"""Launch tools around the Flower app: sweeps, a private local SuperLink, a local federation.

They start and stop processes on the operator's machine and are not part of the Flower
app (the FAB carries ``flexmoe_core``, ``server_app``, ``client_app`` and ``conf``).
"""
