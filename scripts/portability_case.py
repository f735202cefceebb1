"""Run one case of tests/portability_cases.py on one runtime, against ORT CPU's fused node (one cell's worth).

    python scripts/portability_case.py litert "windowed cache/sliding-window-cache"
    python scripts/portability_case.py litert sliding-window-cache --target primitives

A case is named by its id (group/name) or its name alone. Prints each phase's verdict and the max error;
the exit code is 1 when a phase fails. For a quick look at one runtime's failure without the whole table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from portability_cases import CASES, PRIMITIVES, failures, run_case  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runtime")
    parser.add_argument("case", help="a case's id (group/name) or name")
    parser.add_argument("--target", default=PRIMITIVES)
    parser.add_argument("--profile", default="portable")
    args = parser.parse_args()
    chosen = [c for c in CASES if args.case in (c.id, c.name)]
    if not chosen:
        parser.error(f"no case {args.case!r}; cases: {', '.join(c.id for c in CASES)}")
    result = run_case(chosen[0], args.runtime, args.target, args.profile)
    for phase in result.results:
        print(f"{phase.phase.name}: {'pass' if phase.passed else phase.failure}")
    problems = failures(result)
    print(f"{chosen[0].id} on {args.runtime}: {'FAIL' if problems else 'pass'}, max err {result.max_error}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
