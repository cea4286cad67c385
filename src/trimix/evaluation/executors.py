"""Where evaluation units run: in this process (the default and the reference), or on a Ray cluster.

An executor takes units of an :class:`~trimix.evaluation.plan.EvalPlan` and yields ``(unit, rows)`` as
results become available; only the driver writes files (predictions, selections, report), so resume,
run fingerprints and the folder lock keep their guarantees whatever runs the units.

Ray: workers are actors that build the same plan from the same config, load the sources once, and
are reused across units. Each unit's rows come back only when the unit is complete, so a worker that
dies mid-unit leaves nothing half-written: its unit is sent to another worker (a replacement actor is
started), and the driver drops any row it already holds (rows are keyed by method, cell and item).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator, Sequence
from typing import Any

from trimix.config import TrimixConfig
from trimix.errors import ConfigError
from trimix.evaluation.plan import EvalPlan, Unit

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with torch using ``threads`` intra-op threads (None: leave torch's setting), then restore.

    float32 results move in their last bits with the thread count (work is split differently), so the
    local executor and Ray workers given the same ``threads_per_worker`` compute comparable numbers.
    """
    import torch

    if not threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class LocalExecutor:
    """Runs every unit in this process, on the fused model loaded once; rows come back batch by batch.

    ``threads`` (``eval.executor.threads_per_worker``) sets torch's threads while units run, as on a
    Ray worker, so one config gives comparable numbers on either executor.
    """

    def __init__(self, plan: EvalPlan, lm: Any, progress: bool = False, threads: int | None = None) -> None:
        self.plan, self.lm, self.progress, self.threads = plan, lm, progress, threads

    def select(self, units: Sequence[Unit]) -> Iterator[tuple[Unit, Any]]:
        for unit in units:
            with torch_threads(self.threads):
                selection = self.plan.select(self.lm, unit, self.progress)
            yield unit, selection

    def run(self, units: Sequence[Unit]) -> Iterator[tuple[Unit, list[dict]]]:
        for unit in units:
            batches = self.plan.execute(self.lm, unit, self.progress)
            while True:
                with torch_threads(self.threads):
                    rows = next(batches, None)
                if rows is None:
                    break
                yield unit, rows

    def close(self) -> None:
        pass


def check_address(address: str, timeout: float = 5.0) -> None:
    """Fail at once, with a clear message, when a Ray head is not reachable (ray.init would wait minutes)."""
    if address in {"auto", "local"}:
        return
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--ray-address must be HOST:PORT (or ray://HOST:PORT, auto); got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(
            f"no Ray cluster answers at {address} ({exc.__class__.__name__}: {exc}); start one with "
            "`ray start --head` there, check the address, or leave --ray-address out for a local instance"
        ) from exc


class RayExecutor:
    """Runs units on a pool of Ray actors (see the module docstring).

    Args:
        config: the run config (workers rebuild the plan and load the sources from it).
        settings: the ``eval.executor`` section (workers, resources and threads per worker, address).
        address: a cluster to join (``--ray-address``); None starts a local Ray instance.
    """

    def __init__(self, config: TrimixConfig, settings: Any, address: str | None = None) -> None:
        try:
            import ray
        except ImportError as exc:
            raise ConfigError("the Ray executor needs Ray: pip install 'trimix[ray]'") from exc
        self.ray = ray
        address = address or settings.address
        if address:
            check_address(address)
        self.started_ray = not ray.is_initialized()
        if self.started_ray:
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address:
                kwargs["address"] = address
            else:
                kwargs["num_cpus"] = settings.cpus or os.cpu_count()
            ray.init(**kwargs)
        self.config, self.settings = config, settings
        options: dict[str, Any] = {"num_cpus": settings.cpus_per_worker, "num_gpus": settings.gpus_per_worker}
        faults = {k: v for k, v in os.environ.items() if k.startswith("TRIMIX_FAULTS")}
        if faults:  # interruption tests reach into the workers
            options["runtime_env"] = {"env_vars": faults}
        self.actor_class = ray.remote(**options)(_Worker)
        self.actors = [self._start() for _ in range(settings.workers)]
        logger.info("Ray executor: %d workers (%s each)", len(self.actors), options)

    def _start(self) -> Any:
        return self.actor_class.remote(self.config.model_dump(mode="json"), self.settings.threads_per_worker)

    def select(self, units: Sequence[Unit]) -> Iterator[tuple[Unit, Any]]:
        yield from self._map("select", units)

    def run(self, units: Sequence[Unit]) -> Iterator[tuple[Unit, list[dict]]]:
        yield from self._map("execute", units)

    def _map(self, method: str, units: Sequence[Unit]) -> Iterator[tuple[Unit, Any]]:
        """Keep every actor busy; a unit whose actor died goes to a fresh actor (at most ``retries`` times)."""
        ray = self.ray
        queue = list(units)
        attempts: dict[Unit, int] = {}
        running: dict[Any, tuple[Unit, int]] = {}
        idle = list(range(len(self.actors)))
        while queue or running:
            while queue and idle:
                slot = idle.pop()
                unit = queue.pop(0)
                running[getattr(self.actors[slot], method).remote(unit)] = (unit, slot)
            finished, _ = ray.wait(list(running), num_returns=1)
            ref = finished[0]
            unit, slot = running.pop(ref)
            try:
                result = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
                attempts[unit] = attempts.get(unit, 0) + 1
                if attempts[unit] > self.settings.retries:
                    raise ConfigError(
                        f"an evaluation unit failed {attempts[unit]} times on Ray workers: {exc}"
                    ) from exc
                logger.warning(
                    "a Ray worker died (%s); its unit goes to a new worker", exc.__class__.__name__
                )
                self.actors[slot] = self._start()
                queue.insert(0, unit)
            else:
                yield unit, result
            idle.append(slot)

    def close(self) -> None:
        """Stop the workers (and the local Ray instance this executor started)."""
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
        if self.started_ray:
            self.ray.shutdown()


class _Worker:
    """A Ray actor: the plan and the fused model, built once, then any number of units."""

    def __init__(self, config: dict[str, Any], threads: int | None) -> None:
        import torch

        from trimix.config import TrimixConfig
        from trimix.decoding import FusedLM

        if threads:  # the actor's process does nothing else: set once
            torch.set_num_threads(threads)
        run = TrimixConfig.model_validate(config)
        self.plan = EvalPlan(run)
        self.lm = FusedLM.from_config(run, load_all=True)
        self.pid = os.getpid()

    def execute(self, unit: Unit) -> list[dict]:
        from trimix.faults import fault_point

        rows = [row for batch in self.plan.execute(self.lm, unit) for row in batch]
        if fault_point("ray.unit"):
            os._exit(1)  # the worker process dies with its unit's rows unsent
        return rows

    def select(self, unit: Unit) -> Any:
        return self.plan.select(self.lm, unit)

    def process_id(self) -> int:
        return self.pid

    def ping(self) -> float:
        return time.time()
