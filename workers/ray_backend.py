"""The Ray backend: shards of a harvest on Ray actors (one GPU each where there are GPUs).

It runs the shards it is given and hands back each one's states as it finishes; the runner
merges, checkpoints and writes (workers/harvest.py `harvest_shards`). A shard whose actor dies
is run again on a fresh actor. States merge exactly in any order, so the result equals the
in-process harvest of the same data. Imported only with `--backend ray`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import replace

import ray
import torch
from torch import Tensor

from workers.harvest import Harvester, Shards
from workers.runner import HarvestPlan
from workers.state import SourceState

log = logging.getLogger(__name__)


class ShardWorker:
    """One model replica: runs whole shards and returns their finished states."""

    def __init__(self, plan: HarvestPlan, tokens: Tensor, bos_first: bool, threads: int | None):
        if threads:
            torch.set_num_threads(threads)
        torch.set_grad_enabled(False)
        lm, specs = plan.build()
        self.harvester = Harvester(lm, tokens.long(), specs, plan.cfg, bos_first=bos_first)

    def pid(self) -> int:
        import os

        return os.getpid()

    def run(self, shard: int) -> dict[str, SourceState]:
        with torch.inference_mode():
            states = self.harvester.run_shard(shard)
        return {k: v.to("cpu") for k, v in states.items()}


class RayBackend:
    """Runs shards on a pool of actors that rebuild the model and sources from `plan`.

    n_workers: actors to start (default: one per GPU, else one per CPU); address: the cluster
    to join (default: start a local one); on_start receives the actor handles once they are
    up (tests use it to kill one); a shard is retried on a new actor up to max_retries times.
    """

    def __init__(self, plan: HarvestPlan, tokens: Tensor, *, bos_first: bool,
                 n_workers: int | None = None, address: str | None = None,
                 on_start: Callable[[list], None] | None = None, max_retries: int = 3):
        self.plan = plan
        self.tokens = tokens
        self.shards = Shards.of(tokens, plan.cfg)
        self.bos_first = bos_first
        self.n_workers = n_workers
        self.address = address
        self.on_start = on_start
        self.max_retries = max_retries

    def run(self, shards: list[int], progress: Callable[[int], None] | None = None
            ) -> Iterator[tuple[int, dict[str, SourceState]]]:
        """(shard, its states) for each shard as it finishes, in any order; `progress` gets
        each finished shard's tokens."""
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        cpus = int(ray.cluster_resources().get("CPU", 1))
        n_workers = self.n_workers or gpus or max(1, cpus)
        use_gpu = gpus > 0 and self.plan.device != "cpu"
        per_actor = {"num_gpus": 1} if use_gpu else {"num_cpus": 1}
        threads = None if use_gpu else max(1, cpus // n_workers)
        actor_cls = ray.remote(**per_actor)(ShardWorker)
        plan = self.plan if use_gpu else replace(self.plan, device="cpu")
        tokens_ref = ray.put(self.tokens.to(torch.int32))
        every_actor = []

        def spawn():
            actor = actor_cls.remote(plan, tokens_ref, self.bos_first, threads)
            every_actor.append(actor)
            return actor

        todo = list(shards)
        retries: dict[int, int] = {}
        running: dict = {}  # object ref -> (shard, actor)

        def submit(actor) -> None:
            if todo:
                shard = todo.pop(0)
                running[actor.run.remote(shard)] = (shard, actor)

        try:
            actors = [spawn() for _ in range(min(n_workers, len(todo)))]
            if self.on_start is not None:
                self.on_start(actors)
            for actor in actors:
                submit(actor)
            while running:
                ready, _ = ray.wait(list(running), num_returns=1)
                shard, actor = running.pop(ready[0])
                try:
                    states = ray.get(ready[0])
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
                    retries[shard] = retries.get(shard, 0) + 1
                    if retries[shard] > self.max_retries:
                        raise RuntimeError(
                            f"shard {shard} failed {self.max_retries + 1} times") from exc
                    log.warning("actor running shard %d died (%s); retrying on a new actor",
                                shard, type(exc).__name__)
                    todo.insert(0, shard)
                    submit(spawn())
                    continue
                submit(actor)  # the next shard runs while the driver merges this one
                if progress is not None:
                    progress(self.shards.tokens(shard))
                yield shard, states
        finally:
            for actor in every_actor:
                ray.kill(actor)
