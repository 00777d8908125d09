"""``python -m pretraining`` (and ``torchrun -m pretraining``): see :mod:`pretraining.cli`."""

import sys

from pretraining.cli import main

sys.exit(main())
