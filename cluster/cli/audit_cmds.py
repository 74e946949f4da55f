"""`cave audit verify FILE...`: its arguments and handler (wired into `cluster.cli.main`).

The audit code (and pydantic, under its settings) loads when the command runs, not for --help."""

from __future__ import annotations

import argparse
from pathlib import Path

FAILED_EXIT_CODE = 1
KEY_VARIABLE = "CAVE_AUDIT_LOG_HMAC_KEY"  # cave.audit.settings.KEY_VARIABLE (tests/audit check)
VERIFY_HELP = "check the MACs, chain and sequence of audit log files"


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "files",
        nargs="+",
        type=Path,
        metavar="FILE",
        help="log files, or directories of them; one log's rotated files are put in chain order",
    )
    parser.add_argument(
        "--expect-last-seq",
        type=int,
        metavar="N",
        help="fail unless the log reaches seq N (an anchor kept elsewhere: catches a cut-off end)",
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        f"The HMAC key is read from {KEY_VARIABLE}.\n"
        "Exit status: 0 all lines good, 1 a bad line (printed), 2 an error (no key, no file)."
    )


def verify_command(args: argparse.Namespace) -> int:
    """Print `OK: N lines` (exit 0) or `FAIL: FILE:LINE: REASON` (exit 1)."""
    from cave.audit.files import log_files
    from cave.audit.settings import key_from_env
    from cave.audit.verify import verify

    key = key_from_env()  # a ConfigError: the CLI prints it and exits 2
    result = verify(log_files(args.files), key, expect_last_seq=args.expect_last_seq)
    print(result)
    return 0 if result.ok else FAILED_EXIT_CODE
