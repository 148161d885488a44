"""The benchmarks' common options: their help, `--quick`, and their checks
before any timing."""

import argparse
import fractions
import os
import platform


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless it is None (the option's help
    then says what it defaults to, with and without `--quick`) or a flag's."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def listed(values):
    """`values` as the help shows them: `1/16 3/4`, `1 50`."""
    return " ".join(
        str(fractions.Fraction(value).limit_denominator(1024)) if isinstance(value, float)
        else str(value)
        for value in values
    )


def add_sweep_options(parser, densities, batch_sizes, paths, quick):
    """`--densities`, `--batch-sizes`, `--paths` and `--threads`: what a run
    sweeps, with their defaults and `--quick`'s (`quick`) in the help."""
    parser.add_argument("--densities", nargs="+", type=float,
                        help=f"default: {listed(densities)}; --quick: {listed(quick['densities'])}")
    parser.add_argument("--batch-sizes", nargs="+", type=int,
                        help=f"default: {listed(batch_sizes)}; --quick: "
                             f"{listed(quick['batch_sizes'])}")
    parser.add_argument("--paths", nargs="+", choices=paths, default=list(paths),
                        help="execution paths timed (the masked reference, the tuned "
                             "stack and the bounds are timed always)")
    parser.add_argument("--threads", nargs="+", type=int,
                        help="thread settings to run, each in its own process (0: all cores); "
                             "default: 1 0; --quick: 1")


def fill_defaults(args, defaults, quick_defaults):
    """Gives each option left unset (None) its value from `quick_defaults`
    under `--quick`, else from `defaults`: an option given on the command
    line is kept either way."""
    for name, value in defaults.items():
        if getattr(args, name) is None:
            chosen = quick_defaults[name] if args.quick and name in quick_defaults else value
            setattr(args, name, list(chosen))


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


def cpu_description():
    """The processor as results record it: its model name and its widest
    vector extension (the native kernels' speed depends on both), e.g.
    `AMD EPYC (AVX2)`."""
    name, flags = None, set()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = (part.strip() for part in line.partition(":"))
                if key == "model name" and name is None:
                    name = value
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    name = name or platform.processor() or platform.machine()
    extension = next((label for flag, label in (("avx512f", "AVX-512"), ("avx2", "AVX2"),
                                                ("asimd", "NEON")) if flag in flags), None)
    return f"{name} ({extension})" if extension else name
