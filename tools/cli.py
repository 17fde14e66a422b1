"""The `qwen25vl` console command: one dispatcher over the subcommands each package owns.

    qwen25vl conform ...     the conformance harness (conformance/cli.py)
    qwen25vl generate ...    the fast path's generation command (impl/cli.py)
    qwen25vl fixtures ...    golden model cases from your own checkpoint (tools/fixtures_from_checkpoint.py)

It lives in `tools`, the one package that may import all the others (docs/DESIGN.md): the harness
may not import `impl` (it reaches implementations only through adapters), and nothing imports
`tools`, so the dispatcher sits above both. `python -m qwen25vl` runs it too (qwen25vl/__main__.py).
"""

from __future__ import annotations

import sys

USAGE = (
    "usage: qwen25vl {conform,generate,fixtures} [options]   "
    "(qwen25vl conform --help, qwen25vl generate --help, qwen25vl fixtures --help)"
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "conform":
        from ..conformance.cli import conform

        return conform(rest)
    if cmd == "generate":
        try:
            from ..impl.cli import main as generate
        except ImportError as e:
            print(f"qwen25vl generate: not available ({e})", file=sys.stderr)
            return 2
        return generate(rest)
    if cmd == "fixtures":
        from .fixtures_from_checkpoint import main as fixtures

        return fixtures(rest)
    print(f"qwen25vl: unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
