"""A short chaos run (the CI variant of ``memfit bench chaos``): two replicas of the tiny model
sharing a real redis-server, each with its own disk tier, clients checking answers against the
library, and one fault of each kind meanwhile (a replica killed, Redis restarted with its data and
without it, a stream dropped, a disk tier full, read-only, slow). The history must hold no
violation."""

import os
import shutil

import pytest

from memfit.serve.chaos import FAULTS, MOUNTED, run_chaos
from memfit.store.faults import can_mount


def test_replicas_survive_one_fault_of_each_kind_with_every_answer_right(tiny_model_dir, tmp_path):
    if shutil.which("redis-server") is None:
        if os.environ.get("MEMFIT_REQUIRE_REDIS"):
            pytest.fail("redis-server is not installed (apt-get install -y redis-server)")
        pytest.skip("redis-server is not installed")
    faults = FAULTS if can_mount(tmp_path / "check") else tuple(f for f in FAULTS if f not in MOUNTED)
    result = run_chaos(str(tiny_model_dir), tmp_path / "run", seconds=30, replicas=2, clients=3, fault_every=3,
                       hold=1.5, faults=faults, min_faults=len(faults))
    assert result["violations"] == {}, result["first_violations"]
    assert set(result["by_op"]["fault"]) == set(faults)  # one of each kind at least
    by_op = result["by_op"]
    assert by_op["ask"].get("200", 0) >= 5 and by_op["create"].get("200", 0) >= 1  # the clients got work done
    assert set(by_op["hostile"]) <= {"400", "404", "413", "422", "None"}  # hostile requests: clear 4xx, never 5xx
    assert result["chat_latency"]["before"]["n"] + result["chat_latency"]["during"]["n"] > 0
    with pytest.raises(ValueError, match="unknown faults"):
        run_chaos(str(tiny_model_dir), tmp_path, faults=("disk_on_fire",))
