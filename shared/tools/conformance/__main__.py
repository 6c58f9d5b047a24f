"""``python -m shared.tools.conformance broker|serve ...``: the kit without the ``workerbus`` CLI."""

from __future__ import annotations

import sys

from shared.tools.cliargs import Parser
from shared.tools.conformance.cli import add_parser


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m shared.tools.conformance")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    # Let "python -m shared.tools.conformance broker ..." work without the "conformance" word.
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] != ["conformance"]:
        args_in = ["conformance", *args_in]
    args = parser.parse_args(args_in)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
