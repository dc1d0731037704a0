"""`python -m hf_minitron ...`, the same as `hf-minitron ...` (and what `accelerate launch -m hf_minitron` runs)."""

import sys

from .cli import main

sys.exit(main())
