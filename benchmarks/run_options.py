"""Checks of the benchmarks' common options, before any timing."""

import os


def check_run_options(parser, args):
    """`parser.error` for a non-positive `--repeats` or `--batch-sizes`, a
    negative `--threads`, or an `--out` that exists and is not a folder:
    found before a run, not after it."""
    if args.repeats <= 0:
        parser.error(f"--repeats must be a positive integer, got {args.repeats}")
    bad = [size for size in getattr(args, "batch_sizes", []) if size <= 0]
    if bad:
        parser.error(f"--batch-sizes must be positive integers, got {bad}")
    bad = [threads for threads in getattr(args, "threads", []) if threads < 0]
    if bad:
        parser.error(f"--threads must be 0 (all cores) or positive, got {bad}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out must be a folder, got the file {args.out!r}")
