"""bench/flow: the Prefect flow's wall time vs calling the same steps directly, on the same data.

    .venv/bin/python bench/flow.py [--config bench/flow.yaml] [--repeats 2]

Both paths run every step of the config into fresh output folders (no resume), alternating, in one process;
the loaded-model cache is cleared before each run so neither path inherits the other's model. The Prefect
path runs against a temporary local server started once before timing (its start-up is reported separately:
it is paid once per process, or never with a long-running server). Goal: flow / direct ≤ 1.15x.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFPIPE_NO_PROGRESS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def with_output(config: Path, out: Path) -> Path:
    raw = yaml.safe_load(config.read_text())
    raw["output_dir"] = str(out)
    p = out.parent / f"{out.name}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "bench/flow.yaml"))
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    from prefect.testing.utilities import prefect_test_harness

    from flows import steps
    from flows.flow import prefpipe_flow, run_local

    work = Path(tempfile.mkdtemp(prefix="bench-flow-"))
    t0 = time.perf_counter()
    with prefect_test_harness(server_startup_timeout=180):
        startup = time.perf_counter() - t0
        times: dict[str, list[float]] = {"direct": [], "flow": []}
        for r in range(args.repeats):
            for path, fn in (("direct", run_local), ("flow", prefpipe_flow)):
                cfg = with_output(Path(args.config), work / f"{path}-{r}")
                steps.backend_for.cache_clear()
                t = time.perf_counter()
                fn(str(cfg))
                times[path].append(time.perf_counter() - t)
    shutil.rmtree(work, ignore_errors=True)
    d, f = statistics.median(times["direct"]), statistics.median(times["flow"])
    print(f"config: {args.config}; repeats: {args.repeats}\n")
    print("| path | median wall s | runs |\n|---|---|---|")
    print(f"| direct step calls | {d:.2f} | {', '.join(f'{x:.2f}' for x in times['direct'])} |")
    print(f"| Prefect flow (warm local server) | {f:.2f} | {', '.join(f'{x:.2f}' for x in times['flow'])} |")
    print(f"| ratio flow/direct | {f / d:.2f}x | |")
    print(f"\ntemporary Prefect server start-up (once per process): {startup:.1f} s")


if __name__ == "__main__":
    main()
