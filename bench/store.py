"""bench/store: 1M pair rows through the run store vs plain pq.write_table / pq.read_table, side by side.

    .venv/bin/python bench/store.py [--rows 1000000] [--shard-rows 65536] [--repeats 3]

Prints a markdown table: median write and read seconds per path, their ratios (store / plain; goal ≤ 1.5x),
and the peak RSS of a streamed read vs a whole-table read, each measured in a fresh child process.
"""
from __future__ import annotations

import argparse
import datetime as dt
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.store import RunStore  # noqa: E402
from schemas import PAIRS, conform  # noqa: E402


def make_pairs(n: int) -> pa.Table:
    rng = np.random.default_rng(0)
    ids = np.arange(n)
    prompt_ids = pa.array([f"p{i // 4}" for i in ids])
    chosen = pa.array([f"Step 1: {a} + 3 = {a + 3}\nAnswer: {a + 3}" for a in rng.integers(0, 999, n)])
    rejected = pa.array([f"Step 1: {a} + 3 = {a + 4}\nAnswer: {a + 4}" for a in rng.integers(0, 999, n)])
    cs, rs = rng.random(n), rng.random(n)
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    t = pa.table({
        "pair_id": pa.array([f"{i:016x}" for i in ids]), "prompt_id": prompt_ids,
        "prompt": pa.array([f"Tom has {i % 97} apples. How many?" for i in ids]),
        "chosen": chosen, "rejected": rejected, "stage": pa.array(["tree"] * n), "method": pa.array(["tree_plv"] * n),
        "chosen_score": cs, "rejected_score": rs, "score_margin": cs - rs,
        "generator_model": pa.array(["tiny-policy"] * n), "created_at": pa.array([now] * n),
        "extra": pa.array(["{}"] * n), "row_key": pa.array([f"k{i:016x}" for i in ids]),
        "status": pa.array(["ok"] * n)})
    return conform(t, "pairs")


def store_write(table: pa.Table, root: Path, shard_rows: int) -> None:
    st = RunStore(root).stage("bench")
    m = st.begin(fingerprint="f", fingerprint_inputs={}, outputs={"main": "pairs"}, shard_size=shard_rows,
                 n_input_rows=table.num_rows, overwrite=True)
    for i, lo in enumerate(range(0, table.num_rows, shard_rows)):
        part = table.slice(lo, shard_rows)
        st.write_shard(m, i, {"main": part}, input_ids=[str(lo)])
    st.finish(m, {})


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


CHILD = """
import sys
sys.path.insert(0, {root!r})
from pipeline.store import RunStore
st = RunStore({run!r}).stage("bench")
n = 0
if {stream!r}:
    for b in st.iter_batches(batch_size=65536):
        n += b.num_rows
else:
    n = st.read().num_rows
# VmHWM, not ru_maxrss: ru_maxrss survives exec and would report the parent's peak
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(n, hwm)
"""


def child_rss(run: Path, stream: bool) -> tuple[int, float]:
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), run=str(run), stream=stream)],
                         capture_output=True, text=True, check=True).stdout.split()
    return int(out[0]), int(out[1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--shard-rows", type=int, default=65536)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    table = make_pairs(args.rows)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        plain = d / "plain.parquet"
        # alternate the two paths so machine noise hits both alike
        w_plain = timed(lambda: pq.write_table(table, plain, compression="zstd"), args.repeats)
        w_store = timed(lambda: store_write(table, d / "run", args.shard_rows), args.repeats)
        r_plain = timed(lambda: pq.read_table(plain), args.repeats)
        r_store = timed(lambda: RunStore(d / "run").stage("bench").read(), args.repeats)
        assert RunStore(d / "run").stage("bench").read().num_rows == args.rows
        n_s, rss_stream = child_rss(d / "run", True)
        n_w, rss_whole = child_rss(d / "run", False)
        assert n_s == n_w == args.rows
    print(f"rows: {args.rows:,}; shard rows: {args.shard_rows:,}; median of {args.repeats}\n")
    print("| path | write s | read s | write+read s |\n|---|---|---|---|")
    print(f"| plain pq.write_table/read_table | {w_plain:.2f} | {r_plain:.2f} | {w_plain + r_plain:.2f} |")
    print(f"| run store (atomic shards + manifest) | {w_store:.2f} | {r_store:.2f} | {w_store + r_store:.2f} |")
    print(f"| ratio store/plain | {w_store / w_plain:.2f}x | {r_store / r_plain:.2f}x | "
          f"{(w_store + r_store) / (w_plain + r_plain):.2f}x |")
    print(f"\npeak RSS, streamed read (64k-row batches): {rss_stream:.0f} MiB; whole-table read: {rss_whole:.0f} MiB")


if __name__ == "__main__":
    main()
