"""`python -m orchestration train ...` (same as the `sslstream` console script)."""

import sys

from orchestration.cli import main

sys.exit(main())
