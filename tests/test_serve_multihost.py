"""Multi-host start-up of the server on CPU processes: `--coordinator-address/--num-processes/
--process-id` join the JAX distributed runtime before anything touches a device (JAX itself
refuses the join once a backend is up, so a successful join proves the order), and a job
of more than one process whose model would not span every device is refused with a message
(serving such a job in lockstep: test_multihost_lockstep.py). No weights are loaded: the
runs end at the join or at a model dir that does not exist."""

from __future__ import annotations

import subprocess
import sys

from serve_fixtures import REPO, free_port

SERVE = [sys.executable, "-m", "ferrum_jax.serve"]


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([*SERVE, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_one_process_job_joins_first_then_loads():
    address = f"127.0.0.1:{free_port()}"
    proc = _start("--coordinator-address", address, "--num-processes", "1", "--process-id", "0", "--model", "/nonexistent/model")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out
    assert "joined the JAX distributed runtime: process 0 of 1" in out, out
    # It got as far as the model, after the join.
    assert out.index("joined the JAX distributed runtime") < out.index("/nonexistent/model"), out


def test_several_processes_need_the_model_over_every_device():
    address = f"127.0.0.1:{free_port()}"
    procs = [_start("--preset", "tiny", "--coordinator-address", address, "--num-processes", "2", "--process-id", str(i)) for i in range(2)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 1, out
        assert f"process {i} of 2" in out, out
        assert "serving across 2 processes shards the model over all" in out, out
        assert "pass --tensor-parallel-size" in out, out


def test_bad_process_id_is_refused_before_joining():
    proc = _start("--num-processes", "2", "--process-id", "2")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "process_id=2: must be in [0, num_processes=2)" in out, out
