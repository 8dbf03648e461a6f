"""`python -m babyllama.cli ...` (and `torchrun -m babyllama.cli ...`): the same as `babyllama ...`."""

import sys

from babyllama.cli import main

sys.exit(main())
