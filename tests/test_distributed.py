"""torchrun with two CPU processes (gloo): each reads its shard, only rank 0 writes."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import subprocess_env

from fastres import checkpoint


def torchrun(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastres.train",
           *args]
    env = subprocess_env(cache) | {"OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_two_process_training_and_resume(tiny_tree: Path, tmp_path: Path, _private_cache: Path) -> None:
    run = tmp_path / "run"
    common = ["--data", str(tiny_tree), "--batch-size", "32", "--log-every", "2", "--eval-every", "4",
              "--checkpoint-every", "4", "--device", "cpu", "--progress", "plain"]
    proc = torchrun(["resnet8", "--iters", "8", "--out", str(run), *common], _private_cache)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2 and results["test_error"] is not None
    metrics = checkpoint.MetricsLog(run).read()
    assert [m["iter"] for m in metrics] == [2, 4, 6, 8]  # one writer: no duplicated lines
    assert proc.stdout.count("final test error") == 1
    # resuming a finished multi-process run is a no-op on every rank
    again = torchrun(["--resume", str(run)], _private_cache)
    assert again.returncode == 0 and "already finished" in again.stdout
