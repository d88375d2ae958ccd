"""Where a run's batches are computed: in this process (`local`, the default) or on N Ray actors.

An extraction run is a list of batches (`extract.run`); each batch is one forward pass, independent
of every other. A pool takes the batches the store does not hold yet and yields each one's arrays and
catalog rows, in batch order, to the driver, which alone writes them as the run's staged chunks and
commits the run (`store.runs`). So the run id, the rows and the arrays are the same whatever the pool:
worker count and cluster address are execution settings, never hashed. Every stage evaluates through
`extract` (`analyze/common.py::evaluate`), so stage-1 rounds, stage-2 lockstep steps, set checks,
controls, costs and FM-sweep evaluations fan out with no change to the stage logic.

`local` computes the batches in this process with the model already loaded; it never imports Ray.
`ray` starts N actors; each loads the model (from its name or path, the driver's dtype) and the SAEs
(from their sources) once, on one GPU each where the cluster has GPUs, else on one CPU slot. A batch
whose actor dies (ray.kill, SIGKILL, a lost node) is sent again to another live actor, and a fresh actor
is started in the dead one's place (up to N replacements per pool); the driver stages a batch once, when
its result arrives, and a restaged chunk overwrites its own files, so nothing is duplicated or lost.

The active pool is execution context, not a setting: `using(pool)` makes it the one `extract` uses for
the duration of a command (a ContextVar), so stage signatures stay as they are.

Deviation from the issue's sketch: actors return a batch's arrays and rows to the driver, which writes
them; actors do not write Zarr regions themselves. Batches share Zarr chunks (256 rows each), so two
actors writing neighbouring batches would race on a chunk's read-modify-write; a driver that writes in
row order never does. bench/bench_workers.py measures the driver's share (its write + commit time).
"""

from __future__ import annotations

import os
import time
import uuid
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from store.errors import UsageError
from store.settings import Settings

PROJECT_ROOT = Path(__file__).resolve().parent.parent
IN_FLIGHT_PER_WORKER = 2          # batches queued on each actor: one computing, one waiting (no idle gap)
AHEAD_PER_WORKER = 4              # batches computed past the next one the driver writes (bounds memory)
SLOT_WAIT_S = 15.0                # how long a new pool waits for the cluster's slots to be free

Batch = tuple[int, list[int]]     # (chunk, item indices)
Computed = tuple[list[tuple[str, int, np.ndarray]], dict[str, Any]]   # `_run_batch`'s (arrays, tables)


@dataclass(frozen=True)
class WorkerSettings(Settings):
    n: int = 0                            # Ray actors computing batches (--workers); 0: this process, no Ray
    ray_address: str | None = None        # None: start a local Ray cluster for the job; "auto" or host:port: join one

    def __post_init__(self) -> None:
        if self.n < 0:
            raise UsageError(f"--workers must be >= 0, got {self.n}")
        if self.ray_address is not None and self.n == 0:
            raise UsageError("--ray-address needs --workers N (N >= 1 Ray actors)")


@dataclass(frozen=True)
class Job:
    """One run's batches: everything `_run_batch` reads besides the model."""

    run_id: str
    saes: tuple[Any, ...]                 # SaeRef
    settings: Any                         # ExtractSettings
    items: Sequence[Any]                  # Item
    row_start: np.ndarray                 # [n_items] each item's first row
    resid_np: type
    prefix: Any = None                    # main's PrefixSource (extract/prefix.py): shipped with the job as data

    def compute(self, model: Any, saes: Sequence[Any], batch: list[int]) -> Computed:
        from extract.run import _run_batch

        extra = () if self.prefix is None else (self.prefix,)
        return _run_batch(model, saes, self.settings, self.items, batch, self.row_start, self.run_id, self.resid_np,
                          *extra)


class LocalPool:
    """Today's path: every batch in this process, with the driver's model."""

    name = "local"

    def __init__(self, model: Any = None) -> None:
        self.model = model

    def compute(self, model: Any, job: Job, todo: Sequence[Batch]) -> Iterator[tuple[int, Computed]]:
        """Each batch's result, in order."""
        for chunk, batch in todo:
            yield chunk, job.compute(model, job.saes, batch)

    def status(self) -> str:
        return ""

    def close(self) -> None:
        pass


LOCAL = LocalPool()
_ACTIVE: ContextVar[Any] = ContextVar("refusalscope_pool", default=None)


def active() -> Any:
    """The pool `extract` computes batches with: the one set by `using`, else local."""
    return _ACTIVE.get() or LOCAL


@contextmanager
def using(pool: Any) -> Iterator[Any]:
    """Make `pool` the active one inside the block."""
    token = _ACTIVE.set(pool)
    try:
        yield pool
    finally:
        _ACTIVE.reset(token)


@contextmanager
def started(settings: WorkerSettings, model: Any, log: Any = None) -> Iterator[Any]:
    """The pool these settings ask for, active inside the block and closed after it."""
    if settings.n == 0:
        yield LOCAL
        return
    pool = RayPool.start(settings, model, log=log)
    try:
        with using(pool):
            yield pool
    finally:
        pool.close()


# ---- Ray ------------------------------------------------------------------------------------------

def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


class _Worker:
    """One Ray actor: the model and SAEs loaded once, then batches of any run of that model."""

    def __init__(self, model_name: str, dtype: str, device: str, n_threads: int) -> None:
        import torch

        from extract.models import load_model

        torch.set_num_threads(n_threads)
        self.model = load_model(model_name, device=device, dtype=dtype)
        self.saes: dict[tuple[int, str], Any] = {}
        self.job_key: str | None = None
        self.job: Job | None = None

    def pid(self) -> int:
        return os.getpid()

    def run_batch(self, job_key: str, job_ref: list[Any], batch: list[int]) -> Computed:
        import ray

        if job_key != self.job_key:                   # one run at a time: its items are fetched once
            self.job, self.job_key = ray.get(job_ref[0]), job_key
        return self.job.compute(self.model, [self._sae(layer, source) for layer, source in self.job.saes], batch)

    def _sae(self, layer: int, source: str) -> Any:
        from extract.saes import SaeRef, load_sae

        if (layer, source) not in self.saes:
            self.saes[layer, source] = SaeRef(layer, source, load_sae(source, layer=layer, device=self.model.device))
        return self.saes[layer, source]


class RayPool:
    """N actors of `_Worker`; batches go to the least-loaded live actor, lost ones to another."""

    name = "ray"

    def __init__(self, spawn: Any, n: int, owns_cluster: bool) -> None:
        self._spawn = spawn               # () -> a new actor (the model loads in the background)
        self.actors = [spawn() for _ in range(n)]
        self.n_started = n
        self.owns_cluster = owns_cluster
        self.n_retried = 0                # batches sent again after their actor died
        self.n_replaced = 0               # actors started in place of dead ones
        self.max_replacements = n         # then the pool carries on with the actors it has left

    @classmethod
    def start(cls, settings: WorkerSettings, model: Any, log: Any = None) -> "RayPool":
        """Connect to (or start) a Ray cluster and start `settings.n` actors of this model."""
        try:
            import ray
        except ImportError:
            raise UsageError("--workers needs Ray: pip install 'refusalscope[ray]' (or pip install ray)") from None
        owns = False
        if not ray.is_initialized():
            # the workers import this checkout, not whatever copy of the package is installed
            env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT),
                                                                             os.environ.get("PYTHONPATH")]))}}
            try:
                if settings.ray_address is None:
                    ray.init(include_dashboard=False, runtime_env=env, log_to_driver=False)
                else:
                    ray.init(address=settings.ray_address, runtime_env=env, log_to_driver=False)
            except ConnectionError as err:
                raise UsageError(f"cannot reach the Ray cluster at {settings.ray_address}: {err}; start one "
                                 f"with `ray start --head` or leave out --ray-address") from None
            owns = True
        resources = ray.cluster_resources()
        gpu = resources.get("GPU", 0) >= 1      # the driver may sit on the CPU (--device cpu) and leave them free
        n_threads = 1 if gpu else max(1, int(resources.get("CPU", 1)) // settings.n)
        options = {"num_gpus": 1, "num_cpus": 0} if gpu else {"num_cpus": 1}
        kind = "GPU" if gpu else "CPU"
        free = _free_slots(ray, kind, settings.n)
        if free < settings.n:                    # fail now rather than wait forever for slots
            if owns:
                ray.shutdown()
            raise UsageError(f"--workers {settings.n} needs {settings.n} free {kind} slots; the Ray cluster has "
                             f"{free}: ask for fewer workers or add machines (`ray start --address ...`)")
        actor_cls = ray.remote(max_restarts=0, max_task_retries=0)(_Worker)

        def spawn() -> Any:
            return actor_cls.options(**options).remote(model.name, _dtype_name(model.dtype),
                                                       "cuda" if gpu else "cpu", n_threads)
        pool = cls(spawn, settings.n, owns)
        try:
            ray.get([a.pid.remote() for a in pool.actors])   # every model loaded (or its error raised) before work
        except Exception as err:
            pool.close()
            raise _cause(err) from None
        if log:
            log(f"ray: {settings.n} workers ({'1 GPU' if gpu else f'1 CPU slot, {n_threads} threads'} each)")
        return pool

    def status(self) -> str:
        return f"{len(self.actors)}/{self.n_started} workers alive" + (
            f", {self.n_replaced} replaced" if self.n_replaced else "")

    def compute(self, model: Any, job: Job, todo: Sequence[Batch]) -> Iterator[tuple[int, Computed]]:
        """Each batch's result in batch order, computed on the actors; a dead actor's batches go to another."""
        import ray
        from ray.exceptions import RayActorError

        shipped = replace(job, saes=tuple((s.layer, s.source) for s in job.saes))
        job_ref, key = ray.put(shipped), f"{job.run_id}-{uuid.uuid4().hex[:8]}"
        order = [chunk for chunk, _ in todo]
        position = {chunk: k for k, chunk in enumerate(order)}
        waiting: deque[Batch] = deque(todo)
        inflight: dict[Any, tuple[Any, Batch]] = {}
        ready: dict[int, Computed] = {}
        load = {id(a): 0 for a in self.actors}
        next_k = 0
        while next_k < len(order):
            while waiting and self.actors and position[waiting[0][0]] < next_k + AHEAD_PER_WORKER * len(self.actors):
                actor = min(self.actors, key=lambda a: load[id(a)])
                if load[id(actor)] >= IN_FLIGHT_PER_WORKER:
                    break
                chunk, batch = waiting.popleft()
                inflight[actor.run_batch.remote(key, [job_ref], batch)] = (actor, (chunk, batch))
                load[id(actor)] += 1
            if not inflight:
                raise UsageError(f"every Ray worker died ({self.n_started} started); the run is resumable: "
                                 f"rerun the same command")
            finished, _ = ray.wait(list(inflight), num_returns=1)
            for ref in finished:
                actor, (chunk, batch) = inflight.pop(ref)
                load[id(actor)] -= 1
                try:
                    ready[chunk] = ray.get(ref)
                except RayActorError:
                    self._replace(actor, load)
                    waiting.appendleft((chunk, batch))
                    self.n_retried += 1
                except ray.exceptions.RayTaskError as err:
                    raise _cause(err) from None
            while next_k < len(order) and order[next_k] in ready:
                yield order[next_k], ready.pop(order[next_k])
                next_k += 1

    def _replace(self, actor: Any, load: dict[int, int]) -> None:
        """Drop a dead actor; start another in its place while replacements are left."""
        if actor not in self.actors:
            return
        self.actors.remove(actor)
        if self.n_replaced < self.max_replacements:
            fresh = self._spawn()
            self.actors.append(fresh)
            load[id(fresh)] = 0
            self.n_replaced += 1

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self.owns_cluster and ray.is_initialized():
            ray.shutdown()


def _free_slots(ray: Any, kind: str, wanted: int) -> int:
    """Free CPU or GPU slots, waiting up to SLOT_WAIT_S for them: a killed actor's slot comes back late."""
    deadline = time.monotonic() + SLOT_WAIT_S
    while True:
        free = int(ray.available_resources().get(kind, 0))
        if free >= wanted or time.monotonic() > deadline:
            return free
        time.sleep(0.2)


def _cause(err: BaseException) -> BaseException:
    """The error raised inside an actor (a UsageError stays one line), else the Ray error."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err
