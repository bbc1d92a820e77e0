"""The Ray backend: shards of a harvest on Ray actors (one GPU each where there are GPUs),
merged on the driver, which checkpoints after every shard and writes once.

A shard whose actor dies is run again on a fresh actor; a rerun of the same command skips the
shards already in the checkpoint. States merge exactly in any order, so the result equals the
in-process harvest of the same data. Imported only with `--backend ray`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import ray
import torch
from torch import Tensor

from workers.harvest import Checkpoint, Harvester, merge_states
from workers.plan import HarvestPlan
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


def run_harvest_ray(plan: HarvestPlan, tokens: Tensor, n_shards: int, *, bos_first: bool,
                    n_workers: int | None = None, address: str | None = None,
                    checkpoint: Checkpoint | None = None,
                    progress: Callable[[int], None] | None = None,
                    on_start: Callable[[list], None] | None = None,
                    max_retries: int = 3) -> dict[str, SourceState]:
    """Every shard not in the checkpoint, on a pool of actors; returns the merged states.

    on_start receives the actor handles once they are up (tests use it to kill one).
    """
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    if n_workers is None:
        n_workers = gpus or max(1, cpus)
    use_gpu = gpus > 0 and plan.device != "cpu"
    per_actor = {"num_gpus": 1} if use_gpu else {"num_cpus": 1}
    threads = None if use_gpu else max(1, cpus // n_workers)
    actor_cls = ray.remote(**per_actor)(ShardWorker)
    if not use_gpu:
        plan.device = "cpu"
    tokens_ref = ray.put(tokens.to(torch.int32))

    every_actor = []

    def spawn():
        actor = actor_cls.remote(plan, tokens_ref, bos_first, threads)
        every_actor.append(actor)
        return actor

    merged = checkpoint.load() if checkpoint else None
    done = next(iter(merged.values())).shards if merged else frozenset()
    todo = [s for s in range(n_shards) if s not in done]
    seq_per_shard = plan.cfg.batches_per_shard * plan.cfg.batch_size
    if done and progress is not None:
        progress(sum(min(seq_per_shard, len(tokens) - s * seq_per_shard) for s in done)
                 * tokens.shape[1])
    actors = [spawn() for _ in range(min(n_workers, max(len(todo), 1)))]
    if on_start is not None:
        on_start(actors)
    retries: dict[int, int] = {}
    running: dict = {}  # object ref -> (shard, actor)

    def submit(actor) -> None:
        if todo:
            shard = todo.pop(0)
            running[actor.run.remote(shard)] = (shard, actor)

    for actor in actors:
        submit(actor)
    while running:
        ready, _ = ray.wait(list(running), num_returns=1)
        ref = ready[0]
        shard, actor = running.pop(ref)
        try:
            states = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
            retries[shard] = retries.get(shard, 0) + 1
            if retries[shard] > max_retries:
                raise RuntimeError(f"shard {shard} failed {max_retries + 1} times") from exc
            log.warning("actor running shard %d died (%s); retrying on a new actor",
                        shard, type(exc).__name__)
            todo.insert(0, shard)
            submit(spawn())
            continue
        merged = merge_states(merged, states)
        if checkpoint is not None:
            checkpoint.save(merged)
        if progress is not None:
            lo = shard * seq_per_shard
            progress((min(lo + seq_per_shard, len(tokens)) - lo) * tokens.shape[1])
        submit(actor)
    for actor in every_actor:
        ray.kill(actor)
    return merged
