"""``python -m condconv.cli``: the same as the ``condconv`` command (torchrun launches it this way)."""

import sys

from condconv.cli import main

sys.exit(main())
