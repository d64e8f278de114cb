"""Stage shards on Ray actors: one backend replica per actor, the driver writes every shard.

    with RayShardPool(RayConfig(address="local", replicas=2), "transformers", "tiny-policy") as pool:
        result = pool.run_stage(spec, rows, cfg, RunStore("runs/r1"))

The engine still splits the input into its fixed shards and skips the ones the manifest lists; the pool only
computes the pending ones (`runner` hook of `run_stage`). Seeds come from the fingerprint and the shard index, so
an actor computes exactly the rows one process would. The driver stays the only writer of the stage folder: no
manifest race, and a shard is written once, by index, whichever actor computed it. When an actor dies its shard
goes back to the queue and runs on another actor (a replacement actor is started while the budget lasts).
"""
from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import BackendError, InputError

# Environment the actors need to behave like the driver (offline Hub, no tokenizer thread pools per actor).
_FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME",
                  "TOKENIZERS_PARALLELISM", "PREFPIPE_MODELS")


class RayConfig(BaseModel):
    """Where the actors run and how many there are."""
    model_config = ConfigDict(extra="forbid")

    address: str = Field("local", description="'local' starts a Ray instance in this process; otherwise a cluster "
                         "address for ray.init ('auto', 'HOST:6379', 'ray://HOST:10001')")
    replicas: int = Field(2, ge=1, description="actors, each holding one backend replica")
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per actor (also its torch thread count)")
    num_gpus: float | None = Field(None, ge=0, description="GPUs per actor; None = 1 when the cluster has GPUs")
    local_num_cpus: int | None = Field(None, ge=1, description="CPUs of a 'local' instance (None: the machine's, "
                                       "or replicas x num_cpus when that is more)")
    replace_dead: int = Field(2, ge=0, description="replacement actors started, in total, when actors die")
    max_shard_attempts: int = Field(3, ge=1, description="tries per shard across actor deaths before failing")
    start_timeout_s: float = Field(600.0, gt=0, description="wait for an actor's backend to load, then fail "
                                   "(an actor that cannot be placed waits forever otherwise)")


class ShardWorker:
    """One backend replica. Ray runs it as an actor; it computes shards and returns their tables."""

    def __init__(self, backend_kind: str | None, model: str | None, backend_opts: dict, env: dict[str, str]):
        os.environ.update(env)
        self.backend = None
        if backend_kind is not None:
            from pipeline.backends import make_backend
            self.backend = make_backend(backend_kind, model, **backend_opts)

    def info(self) -> dict:
        import ray
        return {"model_id": getattr(self.backend, "model_id", None),
                "weights_hash": getattr(self.backend, "weights_hash", None),
                "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def run_shard(self, spec, cfg, rows: pa.Table, ctx) -> dict[str, pa.Table]:
        return spec.run(rows, cfg, self.backend, ctx)

    def close(self) -> None:
        if self.backend is not None and hasattr(self.backend, "close"):
            self.backend.close()


@dataclass
class _Task:
    index: int
    rows: pa.Table
    ctx: Any
    attempts: int = 0


class RayShardPool:
    """A set of `ShardWorker` actors and the dispatch loop that feeds them shards."""

    def __init__(self, config: RayConfig, backend_kind: str | None, model: str | None = None,
                 backend_opts: dict | None = None):
        self.config = config
        self.backend_kind, self.model = backend_kind, model
        self.backend_opts = {k: v for k, v in (backend_opts or {}).items() if v is not None}
        self.actors: list = []            # slot -> actor handle (None once dead)
        self.computed_by: dict[int, int] = {}   # shard index -> actor slot that produced it
        self.on_dispatch: Callable[[int, int], None] | None = None  # (shard index, slot); tests kill actors here
        self._replacements_left = config.replace_dead
        self._started_ray = False
        self.info: dict | None = None

    # ------------------------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> "RayShardPool":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def start(self) -> None:
        import ray
        if not ray.is_initialized():
            if self.config.address == "local":
                # Enough CPU slots for every replica: an actor Ray cannot place would wait forever.
                cpus = self.config.local_num_cpus or max(os.cpu_count() or 1,
                                                         math.ceil(self.config.replicas * self.config.num_cpus))
                ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=self.config.address, log_to_driver=False)
            self._started_ray = True
        refs = [self._start_actor() for _ in range(self.config.replicas)]
        infos = self._wait_ready(refs)
        self.info = self._check_same_model(infos)

    def shutdown(self) -> None:
        import ray
        for actor in self.actors:
            if actor is not None:
                ray.kill(actor)
        self.actors = []
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    def _num_gpus(self) -> float:
        import ray
        if self.config.num_gpus is not None:
            return self.config.num_gpus
        return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0

    def _start_actor(self):
        """Start one actor in a new slot; returns the ref of its `info()` (ready once the backend loaded)."""
        import ray
        env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
        # Ray sets OMP_NUM_THREADS from num_cpus, so torch in the actor uses exactly its reserved CPUs.
        actor_cls = ray.remote(ShardWorker).options(num_cpus=self.config.num_cpus, num_gpus=self._num_gpus(),
                                                    max_restarts=0)
        actor = actor_cls.remote(self.backend_kind, self.model, self.backend_opts, env)
        self.actors.append(actor)
        return actor.info.remote()

    def _wait_ready(self, refs: list) -> list[dict]:
        import ray
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=self.config.start_timeout_s)
        if pending:
            raise BackendError(
                f"{len(pending)} of {len(refs)} Ray actors were not ready after {self.config.start_timeout_s:.0f} s "
                f"(each asks for {self.config.num_cpus} CPU and {self._num_gpus()} GPU; cluster has "
                f"{ray.cluster_resources()})")
        return ray.get(refs)

    def _check_same_model(self, infos: list[dict]) -> dict:
        # The fingerprint names one model; replicas that loaded different weights would mix outputs silently.
        ids = {(i["model_id"], i["weights_hash"]) for i in infos}
        if len(ids) != 1:
            raise BackendError(f"the Ray actors loaded different models: {sorted(ids, key=str)}")
        return infos[0]

    def backend_info(self) -> SimpleNamespace:
        """What the engine reads off a backend for the fingerprint (model id, weights hash)."""
        assert self.info is not None, "start() the pool first"
        return SimpleNamespace(model_id=self.info["model_id"], weights_hash=self.info["weights_hash"])

    # ------------------------------------------------------------------------------------------- dispatch
    def runner(self, spec, cfg, work: list[tuple[int, pa.Table, Any]]) -> Iterator[tuple[int, dict]]:
        """The engine's `runner` hook: yields (shard index, outputs) as actors finish them."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        queue = deque(_Task(i, rows, ctx) for i, rows, ctx in work)
        idle = deque(slot for slot, a in enumerate(self.actors) if a is not None)
        inflight: dict = {}  # ObjectRef -> (slot, task)
        cfg_ref = ray.put(cfg)
        while queue or inflight:
            while queue and idle:
                slot, task = idle.popleft(), queue.popleft()
                task.attempts += 1
                if self.on_dispatch is not None:
                    self.on_dispatch(task.index, slot)
                inflight[self.actors[slot].run_shard.remote(spec, cfg_ref, task.rows, task.ctx)] = (slot, task)
            if not inflight:
                raise BackendError(f"no live Ray actor left for {len(queue)} pending shard(s)")
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            slot, task = inflight.pop(ref)
            try:
                outputs = ray.get(ref)
            except (RayActorError, ActorDiedError, ActorUnavailableError) as e:
                idle.extend(self._replace(slot))
                if task.attempts >= self.config.max_shard_attempts:
                    raise BackendError(f"shard {task.index} failed on {task.attempts} actors; last: {e}") from e
                queue.appendleft(task)  # redo it first: the rest of the queue is not waiting on it
                continue
            idle.append(slot)
            self.computed_by[task.index] = slot
            yield task.index, outputs

    def _replace(self, slot: int) -> list[int]:
        """Forget a dead actor; start a replacement while the budget lasts. Returns new idle slots."""
        self.actors[slot] = None
        if self._replacements_left <= 0:
            return []
        self._replacements_left -= 1
        ref = self._start_actor()
        self._check_same_model([self.info, *self._wait_ready([ref])])
        return [len(self.actors) - 1]

    def run_stage(self, spec, rows: pa.Table, cfg, store, **kwargs):
        """`run_stage` with the pending shards computed by the actors."""
        from pipeline.engine import run_stage
        backend = self.backend_info() if spec.needs_backend else None
        return run_stage(spec, rows, cfg, backend, store, runner=self.runner, **kwargs)


def ray_stage_runner(address: str, replicas: int, backend_kind: str, model: str, **backend_opts) -> Callable:
    """A drop-in for `run_stage(spec, rows, cfg, backend, store, **kw)` that runs on Ray (the CLI's --ray).

    The `backend` argument is ignored: every actor builds its own replica from (backend_kind, model, opts).
    """
    if replicas < 1:
        raise InputError(f"--replicas must be >= 1, got {replicas}", column="--replicas")

    def run(spec, rows, cfg, backend, store, **kwargs):
        config = RayConfig(address=address, replicas=replicas)
        with RayShardPool(config, backend_kind if spec.needs_backend else None, model, backend_opts) as pool:
            return pool.run_stage(spec, rows, cfg, store, **kwargs)
    return run

