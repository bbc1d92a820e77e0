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
from workers.harvest import (  # noqa: E402
    Checkpoint,
    HarvestConfig,
    Harvester,
    harvest_shards,
    run_harvest,
)
from workers.ray_backend import RayBackend  # noqa: E402
from workers.runner import HarvestPlan  # noqa: E402

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
    got = harvest_shards(RayBackend(plan, ds.tokens, bos_first=True, n_workers=2),
                         harvester.shards, ckpt)
    assert harvester.n_shards == 10
    assert_states_equal(got, want)
    # a rerun finds every shard in the checkpoint: it starts no actor and runs no shard
    started, ran = [], []
    again = harvest_shards(RayBackend(plan, ds.tokens, bos_first=True, n_workers=2,
                                      on_start=started.extend),
                           harvester.shards, ckpt, after_shard=ran.append)
    assert started == [] and ran == []
    assert_states_equal(again, want)


def test_ray_backend_runs_only_the_shards_it_is_given(cluster, setup):
    plan, ds, harvester, want = setup
    started = []
    backend = RayBackend(plan, ds.tokens, bos_first=True, n_workers=2, on_start=started.extend)
    tokens = []
    got = dict(backend.run([7, 2, 9], tokens.append))
    assert sorted(got) == [2, 7, 9]
    assert len(started) == 2 and all(isinstance(a, ray.actor.ActorHandle) for a in started)
    assert sum(tokens) == harvester.shards.tokens([2, 7, 9])
    for shard, states in got.items():
        assert {s for st in states.values() for s in st.shards} == {shard}
        alone = {k: v.to("cpu") for k, v in harvester.run_shard(shard).items()}
        assert_states_equal(states, alone)


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
        got = harvest_shards(RayBackend(plan, ds.tokens, bos_first=True, n_workers=2,
                                        on_start=on_start), harvester.shards, progress=progress)
    assert killed and len(set(pids)) == 2
    assert "retrying on a new actor" in caplog.text
    assert_states_equal(got, want)
