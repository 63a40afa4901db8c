"""``python -m lightning_paged``: the same as the ``lightning-paged`` command."""

import sys

from lightning_paged.commands.main import main

sys.exit(main())
