"""Both cores: a run's heavy work in `workers` processes side by side (the run config's `workers`).

The tiny policy is too small for torch's intra-op threads to pay off (two threads on one generation step are
slower than one; bench/stage_threads.py), so a 2-core machine is used by two single-threaded processes instead.
One pool per run: its processes load the model once each (`backend_cache.backend_for` caches per process) and take
  - stage shards: the engine's `runner` hook sends each pending shard to the pool and writes the results in
    this process as they come back (the engine stays the only writer of the stage folder; shard seeds come from
    the fingerprint and the index, so the rows equal a one-process run's);
  - training arms and evals: a whole `steps.train_step` / `steps.eval_step` call each.
The flow submits every step as soon as the steps it reads are done (`plan`), so a second arm trains while the
first one's eval runs. Spawned, not forked: the flow process holds threads (Prefect) that a fork would copy
mid-state.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

from flows.config import RunConfig, arm_ref, policy_arms

_LOCK = threading.Lock()
_POOLS: dict[tuple[int, int], ProcessPoolExecutor] = {}


def _init_worker(threads: int) -> None:
    from pipeline.threads import set_threads

    set_threads(threads)


def pool(cfg: RunConfig) -> ProcessPoolExecutor:
    """The process pool of this (workers, threads) shape, started on first use and kept for the process."""
    key = (cfg.workers, cfg.threads or 1)
    with _LOCK:
        if key not in _POOLS:
            _POOLS[key] = ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn"),
                                              initializer=_init_worker, initargs=(key[1],))
        return _POOLS[key]


def preload() -> None:
    """Import torch, transformers' model classes and every stage module here, before steps run in threads of
    this process: a module that two threads import at once is seen half-initialised by one of them ("partially
    initialized module 'torch'", "cannot import name AutoModelForCausalLM")."""
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    from stages.catalog import load_stage_modules

    load_stage_modules()


def shutdown() -> None:
    with _LOCK:
        for p in _POOLS.values():
            p.shutdown(cancel_futures=True)
        _POOLS.clear()


def _run_shard(stage: str, stage_cfg, rows, ctx_fields: dict, backend: tuple | None):
    from flows.backend_cache import backend_for
    from pipeline.stage import StageContext, get_stage
    from stages.catalog import load_stage_modules

    load_stage_modules()
    return get_stage(stage).run(rows, stage_cfg, backend_for(*backend) if backend else None,
                                StageContext(**ctx_fields))


def _picklable_ctx(ctx) -> dict:
    # the context's progress callback is a closure of this process; the worker's shard reports none
    return {f.name: getattr(ctx, f.name) for f in dataclasses.fields(ctx) if f.name != "progress"}


def shard_runner(cfg: RunConfig, backend: tuple | None):
    """The engine's `runner`: pending shards to the pool, (index, outputs) yielded as each one finishes.
    `backend` is backend_for's (kind, model, base_url), built once per worker process.

    At most `workers` shards of a stage wait in the pool at a time: the pool's queue is first come, first served,
    so a step that becomes ready meanwhile (a training arm whose data is done) starts after two shards instead of
    after the whole stage. Shard rows do not depend on which worker or when, so the output is unchanged."""
    def run(spec, stage_cfg, work):
        pending = iter(work)
        futures: dict[Future, int] = {}

        def submit_next() -> None:
            item = next(pending, None)
            if item is not None:
                index, rows, ctx = item
                futures[pool(cfg).submit(_run_shard, spec.name, stage_cfg, rows, _picklable_ctx(ctx),
                                         backend)] = index

        for _ in range(cfg.workers):
            submit_next()
        try:
            while futures:
                finished, _ = wait(futures, return_when=FIRST_COMPLETED)
                for fut in finished:
                    index = futures.pop(fut)
                    submit_next()   # keep the pool busy while this process writes the finished shard
                    yield index, fut.result()
        finally:
            for fut in futures:  # a failed shard stops the stage: drop the ones not started
                fut.cancel()
    return run


def in_worker(cfg: RunConfig, fn, *args) -> str:
    """Run `fn(*args)` (a module-level function, so it pickles; the flow passes steps.run_named) in a pool
    process and wait for its result (a path)."""
    return pool(cfg).submit(fn, *args).result()


def plan(cfg: RunConfig) -> list[tuple[str, list[str]]]:
    """Every step of the run as (key, keys it waits for), in the one-process order. Keys: inputs, eval:base,
    stage:<id>, train:<arm>, eval:<arm>, report, export.

    The order is inputs, base eval, generate-phase stages, arms, post_train stages, evals, except that a step
    waiting for a later one moves behind it: a stage valued by a reward arm (`value_model: "@rm"`) runs once that
    arm has trained, and the arm once its data stage is done (load checks that this has no cycle). Reward arms
    get no eval (they are not policies)."""
    def source(ref: str) -> str:
        root = ref.split("@")[0]
        return "inputs" if root == "inputs" else f"stage:{root}"

    def stage_deps(s) -> list[str]:
        deps = [source(s.input)] + (arms if s.phase == "post_train" else [])
        ref = arm_ref(s.config.get("value_model"))
        return deps + ([f"train:{ref}"] if ref and f"train:{ref}" not in deps else [])

    arms = [f"train:{a.name}" for a in cfg.train]
    wanted: list[tuple[str, list[str]]] = [("inputs", [])]
    if cfg.eval:
        wanted.append(("eval:base", []))
    for phase in ("generate", "post_train"):
        if phase == "post_train":
            wanted += [(f"train:{a.name}", [source(a.data)]) for a in cfg.train]
        wanted += [(f"stage:{s.folder}", stage_deps(s)) for s in cfg.stages if s.phase == phase]
    if cfg.eval:
        wanted += [(f"eval:{a.name}", [f"train:{a.name}"]) for a in policy_arms(cfg)]
    steps_: list[tuple[str, list[str]]] = []
    while wanted:  # the first step in the order above whose dependencies are all placed
        ready = {k for k, _ in steps_}
        step = next(x for x in wanted if set(x[1]) <= ready)
        wanted.remove(step)
        steps_.append(step)
    done = [k for k, _ in steps_]
    if cfg.report:
        steps_.append(("report", list(done)))
        done.append("report")
    if cfg.export:
        steps_.append(("export", list(done)))
    return steps_
