"""`python -m qwen25vl ...`: the same as the `qwen25vl` command."""

import sys

from .cli import main

sys.exit(main())
