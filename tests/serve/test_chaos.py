"""A short chaos run (the CI variant of ``memfit bench chaos``): two replicas of the tiny model
sharing a real redis-server, clients checking answers against the library, and a replica killed,
Redis restarted with its data and without it, and a stream dropped meanwhile. The history must
hold no violation."""

import os
import shutil

import pytest

from memfit.serve.chaos import run_chaos


def test_replicas_survive_kills_redis_restarts_and_losses_and_dropped_streams_with_every_answer_right(tiny_model_dir, tmp_path):
    if shutil.which("redis-server") is None:
        if os.environ.get("MEMFIT_REQUIRE_REDIS"):
            pytest.fail("redis-server is not installed (apt-get install -y redis-server)")
        pytest.skip("redis-server is not installed")
    result = run_chaos(str(tiny_model_dir), tmp_path, seconds=30, replicas=2, clients=3, fault_every=3,
                       faults=("kill_replica", "redis_restart", "redis_wipe", "dropped_stream"), min_faults=4)
    assert result["violations"] == {}, result["first_violations"]
    assert result["faults"] >= 4
    by_op = result["by_op"]
    assert by_op["ask"].get("200", 0) >= 5 and by_op["create"].get("200", 0) >= 1  # the clients got work done
    assert set(by_op["hostile"]) <= {"400", "404", "422", "None"}  # hostile requests: clear 4xx, never 5xx
    with pytest.raises(ValueError, match="unknown faults"):
        run_chaos(str(tiny_model_dir), tmp_path, faults=("disk_on_fire",))
