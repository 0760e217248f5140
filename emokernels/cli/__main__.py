"""``python -m emokernels.cli ...`` (and ``torchrun ... -m emokernels.cli directions ...``)."""
import sys

from . import main

sys.exit(main())
