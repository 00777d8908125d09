"""``python -m layerprobe`` = the ``layerprobe`` command."""

import sys

from layerprobe.cli import main

sys.exit(main())
