"""How far a workflow's results move on another CPU: compare runs of the same config.

Another CPU is emulated on one machine by what differs between CPUs for torch: the vector ISA its
kernels dispatch to (``ATEN_CPU_CAPABILITY``), oneDNN's and MKL's (``ONEDNN_MAX_CPU_ISA``,
``MKL_ENABLE_INSTRUCTIONS``), and the thread count (how sums are split). Run the default workflow
once per setting into its own results folder, e.g.::

    workflow/scripts/stage_times.sh xcpu-base
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        workflow/scripts/stage_times.sh xcpu-avx2
    ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2 \\
        workflow/scripts/stage_times.sh xcpu-noavx
    workflow/scripts/stage_times.sh xcpu-threads2 threads=2   # (config keys, the same way)

then ``python workflow/scripts/cross_cpu.py results/xcpu-base results/xcpu-avx2 …`` prints, for
each folder against the first, what ``tokencache compare`` says (tokencache/compare.py, where
the logic lives): the deterministic files that differ, the runs whose images differ (and by how
much), the calibrations' largest tensor difference, and per table and column the largest
difference, also in units of that row's 95% interval half-width, and the paired verdicts that
changed. Exit 0 when every folder agrees with the first, 1 otherwise.
"""
from __future__ import annotations

import argparse
import sys

from tokencache.compare import DEFAULT_TOLERANCE, compare_results, summary_text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="results folder of the reference setting")
    parser.add_argument("others", nargs="+", help="results folders of the same config under other settings")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"in interval half-widths (default: {DEFAULT_TOLERANCE})")
    args = parser.parse_args(argv)
    agree = True
    for other in args.others:
        try:
            report = compare_results(args.base, other, tolerance=args.tolerance)
        except ValueError as exc:
            parser.error(str(exc))
        print(f"## {other} against {args.base}\n\n{summary_text(report)}\n")
        agree = agree and report["agree"]
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
