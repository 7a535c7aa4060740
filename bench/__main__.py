"""`python -m bench [kernels | policies | attention] [flags]` (no sub-command: the study)."""
import sys

from .cli import main

sys.exit(main())
