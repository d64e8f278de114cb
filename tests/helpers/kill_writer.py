"""Run the toy stage in a child process that SIGKILLs itself at a chosen point of the store's write path.

usage: kill_writer.py RUN_DIR N_ROWS SHARD_SIZE POINT K
POINT: none | mid_parquet | after_shard_rename | mid_manifest ; K: on the K-th occurrence (1-based).
"""
import os
import signal
import sys

import pyarrow.parquet as pq

import pipeline.store as store
from pipeline.engine import run_stage
from pipeline.stage import get_stage
from tests.helpers.toy_stage import ToyConfig, prompts

run_dir, n, shard_size, point, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
counter = {"n": 0}


def hit() -> bool:
    counter["n"] += 1
    return counter["n"] == k


def die():
    os.kill(os.getpid(), signal.SIGKILL)


if point == "mid_parquet":
    real = pq.write_table

    def write_table(table, where, **kw):
        if hit():  # leave a half-written temp file behind, as a crash during the write would
            with open(where, "wb") as f:
                f.write(b"PAR1" + b"\0" * 100)
            die()
        real(table, where, **kw)
    store.pq.write_table = write_table
elif point == "after_shard_rename":
    real_t = store.atomic_write_table

    def atomic_write_table(path, table, **kw):
        real_t(path, table, **kw)
        if hit():
            die()
    store.atomic_write_table = atomic_write_table
elif point == "mid_manifest":
    real_b = store.atomic_write_bytes

    def atomic_write_bytes(path, data):
        if hit():  # a torn temp manifest next to the real one
            (path.parent / f".{path.name}.torn.tmp").write_bytes(data[: len(data) // 2])
            die()
        real_b(path, data)
    store.atomic_write_bytes = atomic_write_bytes

run_stage(get_stage("toy-pairs"), prompts(n), ToyConfig(), None, store.RunStore(run_dir),
          shard_size=shard_size, progress=False)
