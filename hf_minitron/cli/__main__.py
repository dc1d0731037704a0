"""`python -m hf_minitron.cli ...`: the form `accelerate launch ... -m hf_minitron.cli build ...` needs."""

import sys

from . import main

sys.exit(main())
