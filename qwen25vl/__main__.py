"""`python -m qwen25vl ...`: the same as the `qwen25vl` command (its dispatcher is tools/cli.py).

Run by module name rather than imported, so the root package holds no import that a static tool
would have to follow through the install's folder mapping.
"""

import runpy

runpy.run_module("qwen25vl.tools.cli", run_name="__main__", alter_sys=True)
