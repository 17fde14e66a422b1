"""python -m qwen25vl.conformance.mistakes > docs/mistakes.md"""

from . import markdown_table

print(markdown_table(), end="")
