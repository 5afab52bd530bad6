"""``python -m flexmoe_core.report``: the same as ``flexmoe-report``."""

from .cli import main

main()
