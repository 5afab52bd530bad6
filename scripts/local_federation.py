#!/usr/bin/env python3
"""``flexmoe-federation`` from a checkout: the same command without installing the package."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server_app.local_federation import main

if __name__ == "__main__":
    sys.exit(main())
