"""Shared test helpers. Tests never touch the network and build every model from a tiny config."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["WANDB_MODE"] = "offline"  # a run that reports to Weights & Biases writes locally, never contacts it
# one thread per process: tests launch training subprocesses side by side on a 2-core machine, and
# oversubscribed OpenMP threads made each of them several times slower
os.environ.setdefault("OMP_NUM_THREADS", "1")

import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# One thread: tiny models gain nothing from two, and on a shared 2-core machine thread contention
# made small ops ~100x slower.
torch.set_num_threads(1)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Fill every parameter with seeded noise so that parity checks exercise every weight
    (zero-initialised output layers would otherwise hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def randomize_lora_(model: torch.nn.Module, seed: int, std: float = 0.3) -> None:
    """Random LoRA weights (B included, so an adapter changes the output at once); DoRA magnitudes are
    scaled around their initial value rather than replaced."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def unet_call_inputs(config, seed: int = 0, size: int = 16, channels: int | None = None):
    """(x, t, context, extra keyword inputs) for two samples through a U-Net of this config: SDXL's
    also take a pooled text embedding and six size ids per sample (`extra["added_cond_kwargs"]`)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, channels or config.in_channels, size, size, generator=g)
    t, ctx = torch.tensor([20, 850]), torch.randn(2, 77, config.cross_attention_dim, generator=g)
    if config.addition_embed_type != "text_time":
        return x, t, ctx, {}
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    ids = torch.tensor([[64.0, 64, 0, 0, 64, 64], [96, 64, 16, 0, 64, 64]])
    return x, t, ctx, {"added_cond_kwargs": {"text_embeds": torch.randn(2, pooled, generator=g), "time_ids": ids}}


@pytest.fixture
def seeded():
    torch.manual_seed(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launcher(config: str = "multi", processes: int = 2) -> tuple:
    """`accelerate launch -m trainers` with one of the shipped configs in configs/accelerate/ (multi:
    data parallel; zero2, zero2_offload, zero3: DeepSpeed), one thread per process, a free port."""
    return (sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "configs" / "accelerate" / f"{config}.yaml"), "--num_processes", str(processes),
            "--num_cpu_threads_per_process", "1", "--main_process_port", str(free_port()), "-m", "trainers")


TRAIN_WORDS = "a red green blue circle square on white black background".split()


def build_training_world(root: Path, model: str = "model", preset: str = "tiny") -> Path:
    """A tiny base model folder (root/<model>) of a family's tiny preset ("tiny": SD 1.x's layout,
    "tiny-sdxl": SDXL's) and four captioned 64x64 noise pictures (root/data): what the trainer tests
    run on."""
    import numpy as np
    from PIL import Image

    from ldmcore.checkpoints import Components
    from ldmcore.text import build_word_tokenizer

    parts = Components.from_preset(preset, build_word_tokenizer(TRAIN_WORDS))
    randomize_(parts.vae, seed=1, std=0.05)
    randomize_(parts.denoiser, seed=2, std=0.05)
    parts.save_pretrained(root / model)
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(data / f"p{i}.png")
        (data / f"p{i}.txt").write_text(f"a {TRAIN_WORDS[1 + i % 3]} circle")
    return root


def base_and_demo(root: Path, world) -> tuple[Path, Path, dict[str, int]]:
    """A world's base built under `root` by the project's own trainers, then its demo LoRA run through
    `python -m worlds.demo` (logging to root/demo.log): (root, the base folder, the demo's exit code)."""
    from worlds.build import build_base

    runs, data = root / "runs", root / "data"
    base = build_base(world, runs, data)
    common = ["--world", world.name, "--runs", str(runs), "--data", str(data)]
    codes = run_all({"demo": [sys.executable, "-m", "worlds.demo", *common, "--seeds", "4"]}, root, at_once=1)
    return root, base, codes


def run_all(jobs: dict[str, list[str]], logs: Path, at_once: int = 2, limit_s: float = 900) -> dict[str, int]:
    """Run the commands `at_once` at a time, in the order given (longest first), each logging to
    <logs>/<name>.log; their exit codes by name. A command still running after `limit_s` seconds
    is killed (its code is then negative), so that a hung run fails its test instead of the suite."""
    pending, running, codes = list(jobs.items()), {}, {}
    while pending or running:
        while pending and len(running) < at_once:
            name, cmd = pending.pop(0)
            log = open(logs / f"{name}.log", "w")
            running[name] = (subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log, time.monotonic())
        time.sleep(0.5)
        for name, (proc, log, started) in list(running.items()):
            if proc.poll() is None and time.monotonic() - started > limit_s:
                proc.kill()
                proc.wait()
            if proc.poll() is not None:
                log.close()
                codes[name] = proc.returncode
                del running[name]
    return codes
