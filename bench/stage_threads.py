"""bench/stage_threads: one stage run on its own (`prefpipe stage ...`) vs the same stage inside a flow, and the
torch thread count that decides the difference.

    .venv/bin/python bench/stage_threads.py [--prompts 40] [--threads 1 2] [--out bench/results/stage_threads.json]

Each variant is a fresh process on the same prompts (the bundled task's first N training problems) into a fresh
folder, so every number includes start-up and the model load, as a user sees it:
  - stage-alone, threads T: `prefpipe --threads T stage tree-search ...` (T = each of --threads, and the
    default: no --threads, no OMP_NUM_THREADS, i.e. pipeline/threads.py's DEFAULT_THREADS);
  - in-flow: `prefpipe run --no-prefect` of a one-stage run config with `threads: 1` (the flow's setting).
The search is the main job's (flows/configs/demo.yaml's tree stage). Reported per variant: wall seconds, CPU
seconds (user + sys of the process and its children) and CPU / wall (cores used); ratios are stage-alone /
in-flow wall. Rows must be identical in every variant but their write times (seeds come from the fingerprint, not the threads).
Goal: the default stage-alone within 1.1x of in-flow. On a shared machine wall times drift with the other
load; the CPU seconds are the steadier figure.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PREFPIPE = str(ROOT / ".venv" / "bin" / "prefpipe")


def _search_config() -> dict:
    demo = yaml.safe_load((ROOT / "flows" / "configs" / "demo.yaml").read_text())
    return next(s for s in demo["stages"] if s["stage"] == "tree-search")


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _timed(cmd: list[str], env: dict) -> tuple[float, float]:
    c0, t0 = _children_cpu(), time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t0, _children_cpu() - c0


def _rows(folder: Path):
    sys.path.insert(0, str(ROOT))
    from pipeline.store import RunStore

    table = RunStore(folder.parent).stage(folder.name).read()
    return table.drop_columns(["created_at"])  # the wall-clock time a row was written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "stage_threads.json"))
    a = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PREFPIPE_NO_PROGRESS="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    search = _search_config()
    tmp = Path(tempfile.mkdtemp(prefix="stage-threads-"))
    run_cfg = {"name": "bench", "output_dir": str(tmp / "flow"), "threads": 1,
               "inputs": {"task": {"preset": "tiny", "split": "train", "n": a.prompts}},
               "stages": [{"id": "tree-search", "stage": "tree-search", "shard_size": search["shard_size"],
                           "config": search["config"]}], "report": False}
    (tmp / "run.yaml").write_text(yaml.safe_dump(run_cfg))
    (tmp / "search.yaml").write_text(yaml.safe_dump(search["config"]))
    results = {}
    wall, cpu = _timed([PREFPIPE, "run", str(tmp / "run.yaml"), "--no-prefect"], env)
    results["in-flow (threads 1)"] = {"wall_s": wall, "cpu_s": cpu, "folder": tmp / "flow" / "tree-search"}
    prompts = tmp / "flow" / "inputs" / "prompts.parquet"
    for t in [None, *a.threads]:
        out = tmp / f"alone-{t or 'default'}"
        cmd = [PREFPIPE, *(["--threads", str(t)] if t else []), "stage", "tree-search", "-i", str(prompts),
               "-o", str(out), "-c", str(tmp / "search.yaml"), "--shard-size", str(search["shard_size"])]
        wall, cpu = _timed(cmd, env)
        results[f"stage-alone (threads {t or 'default'})"] = {"wall_s": wall, "cpu_s": cpu,
                                                              "folder": out / "tree-search"}
    ref = _rows(results["in-flow (threads 1)"]["folder"])
    base = results["in-flow (threads 1)"]["wall_s"]
    from pipeline.threads import DEFAULT_THREADS

    report = {"prompts": a.prompts, "cores": os.cpu_count(), "default_threads": DEFAULT_THREADS,
              "load_avg_1min_at_end": os.getloadavg()[0], "python": platform.python_version(), "variants": {}}
    for name, r in results.items():
        same = _rows(r.pop("folder")).equals(ref)
        report["variants"][name] = {**{k: round(v, 1) for k, v in r.items()}, "cores_used": round(r["cpu_s"] /
                                    r["wall_s"], 2), "wall_vs_in_flow": round(r["wall_s"] / base, 2),
                                    "rows_equal_in_flow": same}
    Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    for name, r in report["variants"].items():
        print(f"{name:32s} {r['wall_s']:6.1f} s wall  {r['cpu_s']:6.1f} s CPU  {r['cores_used']:.2f} cores  "
              f"{r['wall_vs_in_flow']:.2f}x in-flow  rows equal: {r['rows_equal_in_flow']}")


if __name__ == "__main__":
    main()
