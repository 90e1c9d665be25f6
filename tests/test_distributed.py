"""torchrun with two CPU processes (gloo): each reads its shard, only rank 0 writes, and a
run stopped by SIGTERM resumes to the same result as one that never stopped."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import Forked, deterministic, forked_main, lock_held_elsewhere, subprocess_env

from fastres import rundir
from fastres.train import main as train_main

ITERS = 40


def torchrun(args: list[str], cache: Path) -> subprocess.Popen:
    """A real torchrun job: torchrun and its two workers each import torch (about 4
    core-seconds apiece on the 2-core machine of this project), so the suite starts one."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastres.train",
           *args]
    env = subprocess_env(cache) | {"OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def workers(args: list[str]) -> list[Forked]:
    """The two processes of `torchrun --standalone --nproc_per_node=2 -m fastres.train ARGS`,
    forked from this one: each with the environment torchrun gives a worker (its rank, the
    world size, the address of rank 0's rendezvous), both writing into one stdout and one
    stderr as torchrun's workers do, each with its own exit status. What torchrun itself
    does (start them, pass a signal on) is tested once, by `torchrun`, with its start-up cost."""
    with socket.socket() as probe:  # a free port for rank 0's store, as torchrun --standalone finds one
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "GROUP_RANK": "0", "OMP_NUM_THREADS": "1"}
    first = forked_main(train_main, args, env=env | {"RANK": "0", "LOCAL_RANK": "0"})
    second = forked_main(train_main, args, env=env | {"RANK": "1", "LOCAL_RANK": "1"}, share=first)
    return [first, second]


def finish(job: list[Forked]) -> tuple[list[int], str, str]:
    """Each worker's exit status, then their stdout and stderr."""
    codes = [w.wait(300) for w in job]
    return codes, job[0].stdout, job[0].stderr


def run_args(tree: Path, out: Path) -> list[str]:
    # batch 16, 8 per process: the paper's 128 would add 20 core-seconds a run for no check.
    # SIGTERM comes after 3 logged steps, with 37 to go at 0.06-0.08 s each (measured on the
    # 2-core machine, busy): over 2 s, a hundred times the 0.02 s poll that sees the 3 lines.
    return ["resnet8", "--data", str(tree), "--iters", str(ITERS), "--milestones", "20,30", "--batch-size", "16",
            "--log-every", "1", "--eval-every", "20", "--out", str(out), "--device", "cpu", "--progress", "plain"]


def test_two_processes_stop_together_and_resume_exactly(tiny_tree: Path, tmp_path: Path, _private_cache: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    full = tmp_path / "full"
    codes, out, err = finish(workers(run_args(tiny_tree, full)))
    assert codes == [0, 0], err[-2000:]
    results = json.loads((full / "results.json").read_text())
    assert results["world_size"] == 2 and results["test_error"] is not None
    assert [m["iter"] for m in rundir.MetricsLog(full).read()] == list(range(1, ITERS + 1))  # one writer
    assert out.count("final test error") == 1

    cut = tmp_path / "cut"
    proc = torchrun(run_args(tiny_tree, cut), _private_cache)
    deadline = time.monotonic() + 120
    while not (cut / "metrics.jsonl").exists() or len((cut / "metrics.jsonl").read_text().splitlines()) < 3:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both workers
    out, _ = proc.communicate(timeout=120)
    assert "stopped at iteration" in out
    step = rundir.read_checkpoint(cut).step
    assert 3 <= step < ITERS
    codes, _, err = finish(workers(["--resume", str(cut)]))
    assert codes == [0, 0], err[-2000:]
    assert deterministic(rundir.MetricsLog(cut).read()) == deterministic(rundir.MetricsLog(full).read())
    a, b = rundir.read_checkpoint(full).model, rundir.read_checkpoint(cut).model
    assert all(torch.equal(a[k], b[k]) for k in a)

    # finished: a no-op, decided from the checkpoint before any process group is joined (the
    # same code on every rank, so one process shows it)
    capsys.readouterr()
    assert train_main(["--resume", str(cut)]) == 0
    assert "already finished" in capsys.readouterr().out


def _window_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as tdist

    from fastres.distributed import DistInfo
    from fastres.metrics import Window

    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    dist, cpu = DistInfo(rank, world, torch.device("cpu")), torch.device("cpu")
    losses = torch.tensor([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]])[rank]
    wrongs = torch.tensor([[1, 2, 3], [4, 5, 6]])[rank]
    unbroken = Window(cpu, batch_size=8)
    for k in range(2):
        unbroken.add(losses[k], wrongs[k])
    saved = unbroken.state(dist)  # a periodic checkpoint between two log points
    unbroken.add(losses[2], wrongs[2])
    resumed = Window(cpu, batch_size=8)  # a new process group after a crash, from that checkpoint
    resumed.load(saved, dist)
    resumed.add(losses[2], wrongs[2])
    Path(out, f"{rank}.json").write_text(json.dumps([unbroken.read(dist), resumed.read(dist)]))
    tdist.destroy_process_group()


def test_a_checkpoint_between_log_points_keeps_every_ranks_sums(tmp_path: Path) -> None:
    # forked, not spawned: two fresh interpreters importing torch cost about 5 core-seconds, and
    # the workers need nothing from a clean one (their own process group, their own tensors).
    # Joined with a deadline, so a worker that hangs fails the test instead of the suite.
    workers = torch.multiprocessing.start_processes(_window_worker, args=(2, str(tmp_path / "init"), str(tmp_path)),
                                                    nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + 60
    try:
        while not workers.join(timeout=0.5):
            assert time.monotonic() < deadline, "the workers did not finish within 60 s"
    finally:
        for p in workers.processes:
            if p.is_alive():
                p.kill()
    for rank in (0, 1):
        unbroken, resumed = json.loads((tmp_path / f"{rank}.json").read_text())
        assert unbroken == resumed == [{"train_loss": 66.0 / 6, "train_error": 21 / 24}]


def test_a_refusal_on_rank_0_ends_every_process_in_one_line(tiny_tree: Path, tmp_path: Path) -> None:
    """The run directory is locked by another process: rank 0 is refused when it claims it,
    and rank 1, which writes nothing, learns it before its first collective and ends too."""
    run = tmp_path / "run"
    run.mkdir()
    with lock_held_elsewhere(run) as holder:
        codes, out, err = finish(workers(run_args(tiny_tree, run)))
    assert codes == [2, 2]
    lines = [line for line in (out + err).splitlines() if line.startswith("fastres: error: ")]
    assert sorted(lines) == sorted([f"fastres: error: {run} is in use by pid {holder.pid} on {os.uname().nodename}; "
                                    "wait for it to finish, or pass another --out",
                                    "fastres: error: rank 0 of this torchrun job could not claim the run directory "
                                    "(its error says why)"])
    assert sorted(p.name for p in run.iterdir()) == [".fastres.lock"]  # the holder's, as it was
