"""Several machines, on one host: two `accelerate launch` commands with --num_machines 2 and one process
each (machine ranks 0 and 1, a rendezvous on 127.0.0.1), data parallel and DeepSpeed ZeRO-2.

Each machine has its own local rank 0, so any code that uses a machine-local rank where the run's global
one is meant (two "first" processes writing one checkpoint or cache file) would show up here: the
two-machine run must train, checkpoint and resume to exactly the weights of the one-machine run with two
processes. A machine that stalls stops the other within `train.collective_timeout_minutes`, and the
message names the process that stopped answering.
"""
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import accelerate_launcher, build_training_world, free_port
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ["train.max_steps=4", "train.checkpoint_every=2", "train.batch_size=2", "loss.caption_dropout=0.3"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_training_world(tmp_path_factory.mktemp("multinode"))


def args(world: Path, out: Path, *extra: str) -> list[str]:
    return [str(ROOT / "configs" / "tiny" / "lora.yaml"), f"model.path={world / 'model'}", f"data.path={world / 'data'}",
            f"data.cache.dir={out}_cache", f"output_dir={out}", *SETTINGS, *extra]


def two_machines(world: Path, out: Path, config: str, *extra: str, faults_on_1: str | None = None,
                 wait_s: float = 300) -> tuple[list[int | None], list[str]]:
    """Launch machine 0 and machine 1 (one process each) and wait for machine 0; machine 1 is killed if it
    is still running then (a stalled machine). Returns both exit codes (None: killed) and logs."""
    port, procs, files = free_port(), [], []
    for rank in (0, 1):
        env = ["env", f"LDM_TUNE_FAULTS={faults_on_1}"] if faults_on_1 and rank == 1 else []
        cmd = [*env, sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / f"{config}.yaml"), "--num_machines", "2", "--machine_rank", str(rank),
               "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
               "--num_cpu_threads_per_process", "1",
               # DeepSpeed: the same command on each machine (accelerate's default is the pdsh-based deepspeed runner)
               *(["--deepspeed_multinode_launcher", "standard"] if config != "multi" else []),
               "-m", "trainers", *args(world, out, *extra)]
        files.append(open(f"{out}_machine{rank}.log", "w"))
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=files[-1], stderr=subprocess.STDOUT, start_new_session=True))
    started, codes = time.monotonic(), [None, None]
    codes[0] = procs[0].wait(timeout=wait_s)
    try:
        codes[1] = procs[1].wait(timeout=max(5.0, wait_s - (time.monotonic() - started)) if faults_on_1 is None else 5)
    except subprocess.TimeoutExpired:
        import os
        import signal

        os.killpg(procs[1].pid, signal.SIGKILL)  # the stalled machine's launcher...
        procs[1].wait()
        kill_matching(f"output_dir={out}")  # ...and its worker, which torchrun starts in a session of its own
    for f in files:
        f.close()
    return codes, [Path(f"{out}_machine{rank}.log").read_text() for rank in (0, 1)]


def kill_matching(text: str) -> None:
    """SIGKILL every process whose command line contains `text`."""
    import os
    import signal

    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def trained(out: Path, step: int) -> dict:
    return load_file(out / "checkpoints" / f"step_{step:08d}" / "trained.safetensors")


def assert_equal(a: dict, b: dict):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("config", ["multi", "zero2"])
def test_two_machines_train_checkpoint_and_resume_as_one_machine_with_two_processes(world, tmp_path, config):
    one = tmp_path / "one"
    proc = subprocess.run([*accelerate_launcher(config), *args(world, one)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two"
    codes, logs = two_machines(world, two, config)
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert_equal(trained(two, 4), trained(one, 4))  # bit for bit: no machine-local rank took a global one's place
    assert (two / "checkpoints" / "step_00000004" / "rng_1.safetensors").is_file()  # the second machine's process
    resumed = tmp_path / "resumed"
    shutil.copytree(two / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    codes, logs = two_machines(world, resumed, config, "train.resume=latest")
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert_equal(trained(resumed, 4), trained(one, 4))


def test_a_stalled_machine_stops_the_other_within_the_timeout_naming_it(world, tmp_path):
    started = time.monotonic()
    codes, logs = two_machines(world, tmp_path / "stall", "multi", "train.collective_timeout_minutes=0.1",
                               "train.max_steps=6", faults_on_1="step=sigstop@3", wait_s=120)
    assert codes[0] == 1 and time.monotonic() - started < 100, logs[0][-3000:]
    assert "lost contact with the run's other processes" in logs[0]
    assert "Process(es) 1 stopped answering after step 2; the others finished step 3" in logs[0], logs[0][-3000:]
