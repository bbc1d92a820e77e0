"""The Ray backend on a local cluster of 2 CPU workers: the same result as in-process, also
when a worker is killed mid-run."""

from __future__ import annotations

import logging
import os
import signal

import pytest
from support import assert_states_equal, skip_or_fail

try:
    import ray
except ImportError:
    skip_or_fail("the Ray backend needs the 'ray' extra", module=True)

from workers.corpus import load_dataset  # noqa: E402
from workers.harvest import Checkpoint, HarvestConfig, Harvester, run_harvest  # noqa: E402
from workers.plan import HarvestPlan  # noqa: E402
from workers.ray_backend import run_harvest_ray  # noqa: E402

CFG = HarvestConfig(top_k=5, n_ranges=2, per_range=3, window=16, batch_size=4,
                    shard_sequences=8)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                 [os.path.dirname(os.path.dirname(__file__))])}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def setup(tiny_llama_dir):
    plan = HarvestPlan(model=str(tiny_llama_dir), layers=[0, 1], cfg=CFG)
    lm, specs = plan.build()
    ds = load_dataset("pydoc", lm.tokenizer, seq_len=32, max_tokens=80 * 32)
    harvester = Harvester(lm, ds.tokens, specs, CFG, bos_first=True)
    return plan, ds, harvester, run_harvest(harvester)


def test_ray_harvest_equals_in_process(cluster, setup, tmp_path):
    plan, ds, harvester, want = setup
    ckpt = Checkpoint(tmp_path, "ray")
    got = run_harvest_ray(plan, ds.tokens, harvester.n_shards, bos_first=True, n_workers=2,
                          checkpoint=ckpt)
    assert harvester.n_shards == 10
    assert_states_equal(got, want)
    # a rerun finds every shard in the checkpoint and runs none
    ran = []
    again = run_harvest_ray(plan, ds.tokens, harvester.n_shards, bos_first=True, n_workers=2,
                            checkpoint=ckpt, on_start=ran.extend)
    assert ran and all(isinstance(a, ray.actor.ActorHandle) for a in ran)
    assert_states_equal(again, want)


def test_killing_a_worker_mid_run_gives_the_same_result(cluster, setup, caplog):
    plan, ds, harvester, want = setup
    pids = []
    killed = []

    def on_start(actors):
        pids.extend(ray.get([a.pid.remote() for a in actors]))

    def progress(_n):
        if not killed:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    with caplog.at_level(logging.WARNING, logger="workers.ray_backend"):
        got = run_harvest_ray(plan, ds.tokens, harvester.n_shards, bos_first=True, n_workers=2,
                              on_start=on_start, progress=progress)
    assert killed and len(set(pids)) == 2
    assert "retrying on a new actor" in caplog.text
    assert_states_equal(got, want)
