"""The fault matrix: each fault met at each stage of a real run (`python -m trainers`), and what is lost.

A fault is planted with `LDM_TUNE_FAULTS` (ldmcore/faults.py): the process sends itself a real signal,
or a write raises the OSError a full or read-only disk raises, at a named point (the cache build, a
step, a checkpoint write, validation, the export). After the fault the same command with
train.resume=latest must end with exactly the weights of a run that never met it (bitwise). Damaged
files (truncated, a flipped bit, a planted pickle) and a second run on the same folder are checked
through the same entry points. The README's fault table lists these rows.
"""
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import accelerate_launcher, build_training_world, run_all
from safetensors.torch import load_file

from data_tools.locks import FolderLock

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ["train.max_steps=6", "train.checkpoint_every=4", "validation.prompts=[a red circle]", "validation.every=3",
            "validation.steps=2", "data.cache.batch_size=2", "loss.caption_dropout=0.3"]
LAST = "step_00000006"

# name -> (LDM_TUNE_FAULTS, the first run's exit code, what its output must say)
# (checkpoints at steps 4 and 6, validation at 3 and 6; "@2": the second time the point is reached)
KILLED = -signal.SIGKILL
FAULTS = {
    "sigterm-cache": ("cache_build=sigterm", 75, "interrupted: SIGTERM"),
    "sigterm-step": ("step=sigterm@3", 75, "stopped after step 3"),
    "sigterm-checkpoint": ("checkpoint_write=sigterm", 75, "stopped after step 4"),
    "sigterm-validation": ("validation=sigterm", 75, "stopped after step 3"),
    "sigterm-export": ("export=sigterm", 0, "done:"),
    "sigint-twice-cache": ("cache_build=sigint2", 75, "interrupted: SIGINT"),  # the first one stops the cache build
    "sigint-twice-step": ("step=sigint2@5", 130, "stopped at once"),
    "sigint-twice-checkpoint": ("checkpoint_write=sigint2@2", 130, "stopped at once"),
    "sigint-twice-validation": ("validation=sigint2", 130, "stopped at once"),
    "sigint-twice-export": ("export=sigint2", 130, "stopped at once"),
    "sigkill-cache": ("cache_build=sigkill", KILLED, ""),
    "sigkill-step": ("step=sigkill@5", KILLED, ""),
    "sigkill-checkpoint": ("checkpoint_write=sigkill@2", KILLED, ""),
    "sigkill-validation": ("validation=sigkill@2", KILLED, ""),
    "sigkill-export": ("export=sigkill", KILLED, ""),
    "enospc-cache": ("cache_write=enospc", 1, "No space left on device"),
    "enospc-checkpoint": ("checkpoint_write=enospc@2", 1, "could not write checkpoint step_00000006: No space left"),
    "enospc-validation": ("samples_write=enospc", 1, "No space left on device"),
    "enospc-export": ("export=enospc", 1, "could not write the export: No space left on device"),
    "erofs-cache": ("cache_write=erofs", 1, "Read-only file system"),
    "erofs-checkpoint": ("checkpoint_write=erofs", 1, "could not write checkpoint step_00000004: Read-only file system"),
    "erofs-validation": ("samples_write=erofs", 1, "Read-only file system"),
    "erofs-export": ("export=erofs", 1, "could not write the export: Read-only file system"),
}


def command(world: Path, out: Path, *extra: str, faults: str | None = None, cache: Path | None = None) -> list[str]:
    env = ["env", f"LDM_TUNE_FAULTS={faults}"] if faults else ["env"]
    return [*env, sys.executable, "-m", "trainers", str(ROOT / "configs" / "tiny" / "lora.yaml"),
            f"model.path={world / 'model'}", f"data.path={world / 'data'}",
            f"data.cache.dir={cache or Path(str(out) + '_cache')}", f"output_dir={out}", *SETTINGS, *extra]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True)


def final(out: Path) -> dict:
    return load_file(out / "checkpoints" / LAST / "trained.safetensors")


def assert_same_run(out: Path, ref: Path):
    """The run in `out` ended with the reference run's weights, bit for bit, and exported them."""
    got, want = final(out), final(ref)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), out.name
    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
        a, b = load_file(out / name), load_file(ref / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (out.name, name)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """Every row's first run (with its fault) and then the same command resumed, two at a time; and the
    reference run that met no fault."""
    root = tmp_path_factory.mktemp("faults")
    world = build_training_world(root)
    first = {"reference": command(world, root / "reference")}
    first.update({name: command(world, root / name, faults=f) for name, (f, _, _) in FAULTS.items()})
    codes = run_all(first, root, at_once=2, limit_s=600)
    logs = {name: (root / f"{name}.log").read_text() for name in first}
    # half-written files each first run left: temporary checkpoint folders, partial shards, the export's staging
    left = {name: [*(root / name).glob("checkpoints/.tmp_*"), *Path(f"{root / name}_cache").rglob("*.partial"),
                   *(root / name).glob(".export_partial")] for name in FAULTS}
    resumed = {f"{name}-resume": command(world, root / name, "train.resume=latest") for name in FAULTS}
    resumed_codes = run_all(resumed, root, at_once=2, limit_s=600)
    resumed_logs = {name: (root / f"{name}.log").read_text() for name in resumed}
    assert codes["reference"] == 0, logs["reference"][-3000:]
    return root, world, codes, logs, resumed_codes, resumed_logs, left


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_a_fault_loses_nothing_and_the_resumed_run_ends_as_one_that_met_none(matrix, name):
    root, _, codes, logs, resumed_codes, resumed_logs, left = matrix
    _, code, says = FAULTS[name]
    assert codes[name] == code, logs[name][-3000:]
    assert says in logs[name], logs[name][-3000:]
    out = root / name
    if code not in (KILLED, 130):  # a run stopped outright may leave temporary files, which nothing reads
        assert not left[name], left[name]  # an orderly stop removes what it half wrote
    assert resumed_codes[f"{name}-resume"] == 0, resumed_logs[f"{name}-resume"][-3000:]
    assert not list(out.glob("checkpoints/.tmp_*")) and not (out / ".export_partial").exists()  # the next run cleared them
    assert_same_run(out, root / "reference")


def test_a_signal_checkpoints_the_step_it_stopped_after(matrix):
    root, logs = matrix[0], matrix[3]
    for name, step in (("sigterm-step", 3), ("sigterm-validation", 3), ("sigterm-checkpoint", 4)):
        state = json.loads((root / name / "checkpoints" / f"step_{step:08d}" / "state.json").read_text())
        assert state["step"] == step, name
    # a full disk during the second checkpoint left the first one whole, and its own half removed
    assert "step_00000004, is intact" in logs["enospc-checkpoint"] and "partial files were removed" in logs["enospc-checkpoint"]


def flip_byte(path: Path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def test_damaged_checkpoints_are_found_and_latest_takes_the_newest_intact_one(matrix, tmp_path):
    root, world = matrix[0], matrix[1]
    out = copy_run(root / "reference", tmp_path / "flipped")
    flip_byte(out / "checkpoints" / LAST / "optimizer.safetensors")  # a bit flipped in the newest checkpoint
    proc = run(command(world, out, "train.resume=latest", cache=Path(str(root / "reference") + "_cache")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipping checkpoint {LAST}" in proc.stderr and "optimizer.safetensors" in proc.stderr
    assert "resuming from" in proc.stderr and "step_00000004" in proc.stderr
    assert_same_run(out, root / "reference")  # trained again from step 4: the same weights

    named = copy_run(root / "reference", tmp_path / "truncated")
    damaged = named / "checkpoints" / LAST / "trained.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-64])
    proc = run(command(world, named, f"train.resume={named / 'checkpoints' / LAST}",
                       cache=Path(str(root / "reference") + "_cache")))
    assert proc.returncode == 1 and "trained.safetensors" in proc.stderr and "truncated" in proc.stderr, proc.stderr[-2000:]


def test_a_damaged_cache_shard_is_encoded_again_not_trained_on(matrix, tmp_path):
    root, world = matrix[0], matrix[1]
    cache = copy_run(Path(str(root / "reference") + "_cache"), tmp_path / "cache")
    shard = sorted((cache / "latents").glob("shard-*.safetensors"))[0]
    flip_byte(shard)
    proc = run(command(world, tmp_path / "out", cache=cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert shard.name in proc.stderr and "moved aside" in proc.stderr
    assert (shard.parent / (shard.name + ".damaged")).is_file()
    assert_same_run(tmp_path / "out", root / "reference")


def test_a_damaged_export_is_named_when_read(matrix, tmp_path):
    root = matrix[0]
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes((root / "reference" / "pytorch_lora_weights.safetensors").read_bytes())
    flip_byte(lora)
    proc = run([sys.executable, "-m", "adapters", "inspect", str(lora)])
    assert proc.returncode != 0 and str(lora) in proc.stderr and "checksum" in proc.stderr, proc.stderr[-2000:]


class Planted:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant(path: Path, marker: Path, torch_format: bool = True) -> None:
    payload = {"weight": Planted(marker)}
    if torch_format:
        torch.save(payload, path)  # the zip format .bin/.ckpt/.pt files have
    else:
        path.write_bytes(pickle.dumps(payload))


def test_no_planted_pickle_runs_anywhere_a_file_is_read(matrix, tmp_path):
    from adapters.lora import load_lora_file
    from ldmcore.checkpoints import load_components
    from ldmcore.weights import CheckpointError, read_state_dict
    from trainers.statefile import StateFileError, load_state

    root, world = matrix[0], matrix[1]
    marker = tmp_path / "code_ran"
    # a single file, a .bin weights file in a model folder, a LoRA file
    for suffix, torch_format in ((".ckpt", True), (".bin", False), (".pt", True)):
        path = tmp_path / f"planted{suffix}"
        plant(path, marker, torch_format)
        with pytest.raises(CheckpointError, match=str(path)):
            read_state_dict(path)
    with pytest.raises(CheckpointError, match="planted.pt"):
        load_lora_file(tmp_path / "planted.pt")
    model = copy_run(world / "model", tmp_path / "model")
    (model / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    plant(model / "unet" / "diffusion_pytorch_model.bin", marker)
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.bin"):
        load_components(model)
    model = copy_run(world / "model", tmp_path / "model_te")  # the text encoder's, read by transformers
    for f in (model / "text_encoder").glob("*.safetensors"):
        f.unlink()
    torch.save({"text_model.embeddings.token_embedding.weight": Planted(marker)}, model / "text_encoder" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="text_encoder: refused to unpickle"):
        load_components(model)
    # a checkpoint's state files: only the safetensors ones are read; a pickle beside them is named, not read
    ckpt = copy_run(root / "reference" / "checkpoints" / LAST, tmp_path / "ckpt")
    (ckpt / "optimizer.safetensors").unlink()
    plant(ckpt / "optimizer.pt", marker)
    with pytest.raises(StateFileError, match="optimizer.pt.*pickle"):
        load_state(ckpt / "optimizer.safetensors")
    # ... and through the entry point: resuming that checkpoint by name stops naming the file; "latest"
    # passes over it to the newest intact one
    out = copy_run(root / "reference", tmp_path / "run")
    (out / "checkpoints" / LAST / "optimizer.safetensors").unlink()
    plant(out / "checkpoints" / LAST / "optimizer.pt", marker)
    cache = Path(str(root / "reference") + "_cache")
    proc = run(command(world, out, f"train.resume={out / 'checkpoints' / LAST}", cache=cache))
    assert proc.returncode == 1 and "optimizer.safetensors is missing" in proc.stderr, proc.stderr[-2000:]
    proc = run(command(world, out, "train.resume=latest", cache=cache))
    assert proc.returncode == 0 and f"skipping checkpoint {LAST}" in proc.stderr, proc.stderr[-2000:]
    assert not marker.exists()  # nothing anywhere ran the planted code


def test_a_second_run_on_a_folder_in_use_stops_naming_the_first_and_a_killed_one_blocks_nothing(matrix, tmp_path):
    world = matrix[1]
    out = tmp_path / "busy"
    with FolderLock(out, "output_dir"):  # this test process is the run in progress
        proc = run(command(world, out, "train.max_steps=1"))
    assert proc.returncode == 1 and f"process {os.getpid()}" in proc.stderr and str(out) in proc.stderr, proc.stderr
    with FolderLock(tmp_path / "cache", "cache"):
        proc = run(command(world, tmp_path / "other", "train.max_steps=1", cache=tmp_path / "cache"))
    assert proc.returncode == 1 and "cache" in proc.stderr and f"process {os.getpid()}" in proc.stderr, proc.stderr
    # a holder killed outright: the kernel drops its lock, the next run goes ahead
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from data_tools.locks import FolderLock; FolderLock(sys.argv[2], 'output_dir').__enter__(); "
                               "print('held', flush=True); time.sleep(600)", str(ROOT), str(out)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    proc = run(command(world, out, "train.max_steps=1", "validation.prompts=[]"))
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB file system (tmpfs), where the test machine lets the test mount one."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here; the injected ENOSPC rows of the matrix cover the writes")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(disk: Path, leave: int) -> None:
    import shutil

    (disk / "filler").write_bytes(b"\0" * (shutil.disk_usage(disk).free - leave))


def test_a_run_that_cannot_fit_stops_before_its_first_step_saying_what_it_needs_where(matrix, small_disk, tmp_path):
    root, world = matrix[0], matrix[1]
    fill(small_disk, 64 * 1024)  # room for the run's small files, not for a checkpoint and the export
    out = small_disk / "out"
    proc = run(command(world, out, cache=Path(str(root / "reference") + "_cache")))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "a checkpoint and the export needs about" in proc.stderr and f"in {out}, which has" in proc.stderr
    assert "training:" not in proc.stderr and not (out / "checkpoints").exists()

    (small_disk / "filler").unlink()
    fill(small_disk, 12 * 1024)
    proc = run(command(world, tmp_path / "out", cache=small_disk / "cache"))
    assert proc.returncode == 1 and "the cache needs about" in proc.stderr, proc.stderr[-2000:]
    assert "encoding images" not in proc.stderr


def test_a_signal_to_one_process_stops_every_process_after_the_same_step(matrix, tmp_path):
    """Two processes; only the second is sent SIGTERM (at its third step). Both finish that step, the
    checkpoint holds both processes' states, both exit 75, and the resumed run ends as the one that met
    no signal."""
    world = matrix[1]
    two = [*accelerate_launcher("multi"), *command(world, tmp_path / "ref")[4:], "train.batch_size=1"]
    assert run(two).returncode == 0
    out = tmp_path / "signalled"
    cmd = ["env", "LDM_TUNE_FAULTS=step=sigterm@3/1", *accelerate_launcher("multi"), *command(world, out)[4:],
           "train.batch_size=1"]
    proc = run(cmd)
    assert proc.returncode != 0 and proc.stderr.count("stopped after step 3 on a signal") == 2, proc.stderr[-3000:]
    last = out / "checkpoints" / "step_00000003"
    assert (last / "rng_0.safetensors").is_file() and (last / "rng_1.safetensors").is_file()
    resumed = [*accelerate_launcher("multi"), *command(world, out, "train.resume=latest")[4:], "train.batch_size=1"]
    proc = run(resumed)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(out, tmp_path / "ref")


def test_time_based_checkpoints_fall_on_step_boundaries_and_change_nothing(matrix, tmp_path):
    root, world = matrix[0], matrix[1]
    out = tmp_path / "timed"
    proc = run(command(world, out, "train.checkpoint_minutes=0.0001", "train.keep_checkpoints=10",
                       cache=Path(str(root / "reference") + "_cache")))
    assert proc.returncode == 0, proc.stderr[-2000:]
    # due after every step (a 6 ms period), beside the every-4-steps ones
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == [f"step_{i:08d}" for i in range(1, 7)]
    assert_same_run(out, root / "reference")
