"""
Run every benchmark: each C{bench/*_bench.py} module's C{main()}, in name
order, one after the other; a failing benchmark is reported and the others
still run.  The exit status is non-zero if any failed.
"""

from __future__ import annotations

import importlib
import pathlib
import sys
import time
import traceback


def discover() -> list[str]:
    """Module names of the benchmarks next to this file."""
    here = pathlib.Path(__file__).resolve().parent
    return sorted(f"bench.{path.stem}" for path in here.glob("*_bench.py"))


def main() -> int:
    failed = []
    names = discover()
    print(f"smtpplus benchmarks: {', '.join(n.split('.')[-1] for n in names) or 'none found'}", flush=True)
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        started = time.monotonic()
        try:
            importlib.import_module(name).main()
        except SystemExit as e:
            # Twisted's react() ends with sys.exit, on success too.
            if e.code not in (0, None):
                print(f"{name} exited with status {e.code}", flush=True)
                failed.append(name)
        except Exception:
            traceback.print_exc()
            failed.append(name)
        print(f"--- {name} took {time.monotonic() - started:.1f} s", flush=True)
    if failed:
        print(f"\nFAILED: {', '.join(failed)}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
