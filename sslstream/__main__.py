"""`python -m sslstream train ...`: the same as the `sslstream` console script.

torchrun launches it this way too: `torchrun --nproc-per-node 8 -m sslstream train ...`.
"""

import sys

from sslstream.orchestration.cli import main

if __name__ == "__main__":
    sys.exit(main())
