"""Peak memory per process and step time of the trainer on 1, 2, ... processes, with and without
DeepSpeed ZeRO, and what the memory figures predict for SD 1.5 and SDXL on 8-24 GB cards.

Part 1, activation memory (measured). One training step of a U-Net, batch 1, gradient
checkpointing, bf16 autocast, at two picture sides, each after a warm-up step at that side, each
architecture and mode in its own process: the rise of the peak over the step above what was held
before it (CUDA: the allocator's peak; CPU: the peak resident set, reset through
/proc/self/clear_refs, with MALLOC_MMAP_THRESHOLD_ set so that freed tensors leave it). `lora`:
frozen bf16 base, LoRA (float32) on the attention projections; `full`: every weight trains, each
gradient dropped once accumulated (gradients are state, counted by the memory model). The figure
at another size is read off the line through the two measured ones, in pixels.

Part 2, the trainer (measured). For each model (`tiny`: the test preset; `sd15`: the SD 1.5
architecture with random weights, saved to a temporary folder), method and accelerate config:

    accelerate launch --config_file configs/accelerate/CONFIG.yaml --num_processes N -m trainers \\
        configs/tiny/METHOD.yaml model.path=... train.max_steps=S train.mixed_precision=bf16 \\
        train.gradient_checkpointing=true ...

on a few captioned noise pictures. The trainer's output_dir/run_stats.json gives the median step
time (first step excluded) and each rank's peak memory (CUDA: max_memory_allocated; CPU: the peak
resident set of the whole process, loading the model in float32 and the final checkpoint
included). On a CPU the script also samples each rank's resident set during the steps only
("steps GiB"). Beside both, what the memory model below predicts for that run. Each row is
compared with its model and method's baseline, config `single` on 1 process; images/s = batch x
processes / step time. A run is skipped, with the reason, when its predicted host memory
(processes x per process) exceeds /proc/meminfo's MemAvailable less --keep-free, and stopped if
its process tree grows past that anyway.

Part 3, the prediction (`--predict` alone, or after part 2): GiB per GPU for SD 1.5 at 512 px and
SDXL at 1024 px, batch 1 per GPU, bf16 mixed precision, gradient checkpointing, the VAE and text
encoder(s) on the card in float32 as trainers/loop.py keeps them: weights, gradients and optimizer
state as `state_bytes` counts them, plus part 1's activations. Every parameter count is taken from
the presets (`ldmcore.presets`: SD15, SDXL with its size conditioning, `add_embedding`), the
models built on the meta device; part 1 measures the same U-Nets, SDXL's called with its
`added_cond_kwargs`. A setup fits a card when it needs
at most 90% of it: the rest is for the CUDA context (which max_memory_allocated does not count) and
fragmentation. A cell "10.9 (12)" reads: 10.9 GiB, fits a 12 GB card and larger.

    python bench/scaling.py --model tiny --out tiny.json   # parts 1-3; every config on 1 and 2 processes
    python bench/scaling.py --model sd15 --methods lora,full,full-8bit --processes 2 --steps 4 \\
        --activations-from tiny.json                        # part 1 reused; what fits this machine
    python bench/scaling.py --predict                       # parts 1 and 3 only

On 2 CPU cores: part 1 about 6 min, the tiny runs 4 min, the SD 1.5 runs above 11 min.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adapters.lora import LoraSettings, add_lora  # noqa: E402
from bench.unet_step import MEMORY_ENV, spawn, unet_inputs  # noqa: E402
from ldmcore.checkpoints import _text_model_class  # noqa: E402
from ldmcore.family import get_family  # noqa: E402
from ldmcore.presets import get_preset  # noqa: E402
from ldmcore.unet import UNet  # noqa: E402
from ldmcore.vae import AutoencoderKL  # noqa: E402
from trainers.distributed import ZERO_BUFFERS  # noqa: E402

GIB = 2**30
CARDS = (8, 12, 16, 24)  # GiB: an "8 GB" card has 8 GiB
HEADROOM = 0.10  # of a card, for the CUDA context and fragmentation
PROCESS_GIB = 0.5  # a trainer process before any model (Python, torch, accelerate): the tiny runs' peak
POLL_S = 0.2
WORDS = "a red green blue circle square on white black background".split()

# -- the memory model -------------------------------------------------------------------------------

AUX_BYTES = 4  # trainers/loop.py keeps the VAE and text encoder(s) on the device in float32
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2}  # both moments, per trained parameter
# The ZeRO buffer sizes the trainer fills in where the DeepSpeed config leaves them out:
REDUCE_BUCKET = ZERO_BUFFERS["reduce_bucket_size"]  # elements: the gradient bucket each ZeRO-2/3 rank allocates, in bf16
MAX_LIVE = ZERO_BUFFERS["stage3_max_live_parameters"]  # elements ZeRO-3 may keep gathered
# bitsandbytes' 8-bit AdamW on a CPU (not its fused CUDA kernel) makes float32 temporaries while it
# steps a tensor: measured 20 B per element with bitsandbytes 0.50
BNB_CPU_STEP_BYTES = 20


@dataclasses.dataclass(frozen=True)
class Arch:
    unet: float  # parameters
    text: float  # text encoder(s)
    vae: float
    lora_per_rank: float  # LoRA parameters per unit of rank on the attention projections
    largest: float  # parameters of the U-Net's largest tensor


@dataclasses.dataclass(frozen=True)
class Method:
    trainer: str  # `method:` of the training config
    optimizer: str  # train.optimizer.name


@dataclasses.dataclass(frozen=True)
class Setup:
    zero: int  # DeepSpeed ZeRO stage; 0: none
    gpus: int
    offload: bool = False  # optimizer (master weights, fp32 gradients, state) in host memory
    ddp: bool = False  # DistributedDataParallel's gradient buckets


METHODS = {"lora": Method("lora", "adamw"), "full": Method("full", "adamw"), "full-8bit": Method("full", "adamw8bit")}
CONFIGS = ("single", "multi", "zero2", "zero2_offload", "zero3")
PREDICTED = {"sd15": 512, "sdxl": 1024}  # native side
ACTIVATION_SIDES = {"tiny": (64, 128), "sd15": (256, 512), "sdxl": (256, 512)}  # px, measured in part 1
PREDICTED_METHODS = {"LoRA r16": ("lora", 16), "LoRA r64": ("lora", 64), "full, AdamW": ("full", 0),
                     "full, 8-bit AdamW": ("full-8bit", 0)}
PREDICTED_SETUPS = {"1 GPU": Setup(0, 1), "DDP, any N": Setup(0, 2, ddp=True), "ZeRO-2 x2": Setup(2, 2),
                    "ZeRO-2 x4": Setup(2, 4), "ZeRO-2 x8": Setup(2, 8), "ZeRO-2 offload x1": Setup(2, 1, offload=True),
                    "ZeRO-3 x2": Setup(3, 2), "ZeRO-3 x4": Setup(3, 4), "ZeRO-3 x8": Setup(3, 8)}


def setup_of(config: str, processes: int) -> Setup:
    return {"single": Setup(0, 1), "multi": Setup(0, processes, ddp=True), "zero2": Setup(2, processes),
            "zero2_offload": Setup(2, processes, offload=True), "zero3": Setup(3, processes)}[config]


def refused(method: Method, setup: Setup) -> str | None:
    """What trainers.distributed.check_optimizer refuses at start."""
    if setup.offload and method.optimizer != "adamw":
        return f"{method.optimizer} with the optimizer offloaded is refused by the trainer"
    return None


def state_bytes(arch: Arch, method: Method, rank: int, setup: Setup, cpu: bool = False) -> tuple[float, float]:
    """(device, host) bytes per process for weights, gradients and optimizer state. `cpu`: the
    device is a CPU, which counts a page only once written (a bucket as far as gradients fill it)."""
    trained = trained_params(arch, method, rank)
    frozen = 0 if method.trainer == "full" else arch.unet  # LoRA: the U-Net base
    aux = AUX_BYTES * (arch.text + arch.vae)
    opt = OPTIMIZER_BYTES[method.optimizer]
    n = setup.gpus
    if setup.zero == 0:
        # accelerate + autocast, as trainers/loop.py: the frozen base in bf16 (2 B); the trained
        # weights (4 B), their gradients (4 B) and the optimizer state in float32; DDP's gradient
        # buckets hold a second copy of the gradients (4 B; gradient_as_bucket_view is off)
        return aux + 2 * frozen + (4 + 4 + opt + (4 if setup.ddp else 0)) * trained, 0.0
    # DeepSpeed bf16: the engine holds the prepared module (for LoRA the base too) in bf16 (2 B),
    # ZeRO-3 shards it but keeps up to MAX_LIVE gathered; each rank keeps 1/n of the fp32 master
    # weights (4 B), of the optimizer state, and of the gradients: bf16 (2 B) plus the fp32 copy
    # made at the step (4 B); plus one REDUCE_BUCKET gradient bucket in bf16.
    module = 2 * (frozen + trained) / (n if setup.zero == 3 else 1)
    gathered = 2 * min(frozen + trained, MAX_LIVE) if setup.zero == 3 else 0
    bucket = 2 * (min(REDUCE_BUCKET, trained) if cpu else REDUCE_BUCKET)
    on_device = aux + module + gathered + bucket + 2 * trained / n
    optimizer = (4 + opt + 4) * trained / n  # master weights, state, fp32 gradients
    return (on_device, optimizer) if setup.offload else (on_device + optimizer, 0.0)


def trained_params(arch: Arch, method: Method, rank: int) -> float:
    return arch.unet if method.trainer == "full" else arch.lora_per_rank * rank


def activation_gib(measured: dict, side: int) -> float:
    """Activation memory at `side` px, on the line through the two measured sizes (in pixels)."""
    (s1, s2), (a1, a2) = measured["sides"], measured["gib"]
    return max(a2 + (a2 - a1) / (s2**2 - s1**2) * (side**2 - s2**2), 0.0)


def predict_gib(arch: Arch, method: Method, rank: int, setup: Setup, act_gib: float,
                cpu: bool = False) -> tuple[float, float]:
    """(device, host) GiB per process: state plus activations."""
    device, host = state_bytes(arch, method, rank, setup, cpu)
    return device / GIB + act_gib, host / GIB


def run_prediction(arch: Arch, method: Method, rank: int, setup: Setup, act_gib: float) -> dict:
    """GiB per process of a measured run: during the steps and at the peak as run_stats.json
    reports it, and the host memory it needs. On a CPU the device is the host."""
    cpu = not torch.cuda.is_available()
    device, host = predict_gib(arch, method, rank, setup, act_gib, cpu)
    # trainers/loop.py loads the U-Net first, in float32, through ldmcore's from_pretrained, which
    # counts it twice in the resident set for a moment: the module, and the pages of the weights file
    # that safetensors maps and the copy reads (page cache, reclaimable, but counted by ru_maxrss)
    load = PROCESS_GIB + 2 * 4 * arch.unet / GIB
    if cpu:
        steps = PROCESS_GIB + device + host
        if method.optimizer == "adamw8bit":  # it steps one parameter at a time, or a ZeRO rank's flat partition
            trained = trained_params(arch, method, rank)
            steps += BNB_CPU_STEP_BYTES * (trained / setup.gpus if setup.zero else min(arch.largest, trained)) / GIB
        return {"steps": steps, "peak": max(load, steps), "host": max(load, steps)}
    return {"steps": device, "peak": device, "host": max(load, PROCESS_GIB + host)}


def smallest_card(gib: float) -> str:
    return next((str(c) for c in CARDS if gib <= (1 - HEADROOM) * c), "-")


def make_arch(unet_config: dict, unet: float, text: float, vae: float) -> Arch:
    """LoRA's size and the largest tensor are counted on the architecture, built on the meta device."""
    with torch.device("meta"):
        model = UNet.from_config(dict(unet_config))
    largest = max(p.numel() for p in model.parameters())
    add_lora(model, LoraSettings(rank=1, alpha=1, targets="attention"))
    per_rank = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Arch(unet, text, vae, per_rank, largest)


def preset_arch(name: str) -> Arch:
    """The sizes of a preset's models, counted on the meta device: the U-Net (SDXL's with its
    `add_embedding`), the family's text encoders with the preset's full vocabulary, the VAE."""
    from transformers import CLIPTextConfig

    preset = get_preset(name)
    configs = {"text_encoder": preset.text_encoder, "text_encoder_2": preset.text_encoder_2}
    with torch.device("meta"):
        unet = UNet.from_config(dict(preset.denoiser))
        texts = [_text_model_class(kind)(CLIPTextConfig(**configs[part]))
                 for part, _, kind in get_family(preset.family).text_parts]
        vae = AutoencoderKL.from_config(dict(preset.vae))

    def count(*models) -> float:
        return float(sum(p.numel() for m in models for p in m.parameters()))

    return make_arch(preset.denoiser, count(unet), count(*texts), count(vae))


def predicted_arches() -> dict[str, Arch]:
    return {name: preset_arch(name) for name in PREDICTED}


# -- workers, one process each ------------------------------------------------------------------------


def activations_worker(args) -> dict:
    """Part 1 for one architecture and mode (see the module docstring)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = dict(get_preset(args.arch).denoiser)
    with torch.device("meta"):
        unet = UNet.from_config(config)
    unet.to(torch.bfloat16).to_empty(device=device)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.02)
    if args.mode == "lora":
        unet.requires_grad_(False)
        add_lora(unet, LoraSettings(rank=args.rank, alpha=args.rank, targets="attention"))
        for p in unet.parameters():
            p.data = p.data.to(device, torch.float32 if p.requires_grad else torch.bfloat16)
    else:
        for p in unet.parameters():
            p.register_post_accumulate_grad_hook(lambda q: setattr(q, "grad", None))
    unet.set_gradient_checkpointing(True)
    unet.train()
    g = torch.Generator().manual_seed(0)
    t = torch.full((1,), 500, device=device)

    def step(side: int) -> None:
        # encoder_hidden_states (1, 77, width); SDXL: added_cond_kwargs, pooled (1, 1280) and size ids (1, 6)
        inputs = unet_inputs(args.arch, 1, side, g, device, torch.float32)
        x = torch.randn(1, 4, side // 8, side // 8, generator=g).to(device)  # (1, 4, h, w) noisy latents
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = unet(x, t, **inputs)  # (1, 4, h, w)
        torch.nn.functional.mse_loss(out.float(), torch.zeros_like(x)).backward()

    rises = []
    for side in args.sides:
        step(side)  # one-off allocations (kernels, thread pools, per-shape caches) stay out of the figures
        before = _reset_peak(device)
        step(side)
        rises.append((_memory_peak(device) - before) / GIB)
    return {"sides": args.sides, "gib": rises}


def _reset_peak(device) -> int:
    """Reset the peak to what is held now, and return that."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to VmRSS
    except OSError as e:
        raise SystemExit(f"cannot reset the peak resident set through /proc/self/clear_refs ({e}); "
                         "part 1 needs it on a CPU") from None
    return _status_kib("VmRSS") * 1024


def _memory_peak(device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _status_kib("VmHWM") * 1024


def _status_kib(field: str) -> int:
    line = next(s for s in Path("/proc/self/status").read_text().splitlines() if s.startswith(field + ":"))
    return int(line.split()[1])


def world_worker(args) -> dict:
    """A model folder of `args.arch` with random weights and captioned noise pictures, under `args.folder`."""
    import numpy as np
    from PIL import Image

    from ldmcore.checkpoints import Components
    from ldmcore.text import build_word_tokenizer

    folder = Path(args.folder)
    parts = Components.from_preset(args.arch, build_word_tokenizer(WORDS))
    parts.save_pretrained(folder / "model")
    (folder / "data").mkdir()
    rng = np.random.default_rng(0)
    side = args.resolution
    for i in range(args.pictures):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / "data" / f"p{i}.png")
        (folder / "data" / f"p{i}.txt").write_text(f"a {WORDS[1 + i % 3]} circle")
    return {name: sum(p.numel() for p in getattr(parts, name).parameters()) for name in ("unet", "text_encoder", "vae")}


# -- part 1: activations ----------------------------------------------------------------------------


def measure_activations(names: list[str], args) -> dict:
    found = {}
    for name in names:
        for mode in ("lora", "full"):
            argv = ["--worker", "activations", "--arch", name, "--mode", mode, "--rank", str(args.rank),
                    "--sides", *map(str, ACTIVATION_SIDES[name])]
            found.setdefault(name, {})[mode] = spawn(__file__, argv, f"activations {name} {mode}", _env())
    return found


def print_activations(found: dict) -> None:
    print("\nActivation memory per picture (batch 1, gradient checkpointing, bf16), measured:")
    print("| U-Net | mode | " + " | ".join(["side", "GiB"] * 2) + " | per megapixel, between the two |")
    print("|---|---|---|---|---|---|---|")
    for name, modes in found.items():
        for mode, m in modes.items():
            (s1, s2), (a1, a2) = m["sides"], m["gib"]
            per_megapixel = (a2 - a1) / (s2**2 - s1**2) * 1e6
            print(f"| {name} | {mode} | {s1} px | {a1:.3f} | {s2} px | {a2:.3f} | {per_megapixel:.3f} GiB |")


# -- part 2: the trainer ------------------------------------------------------------------------------


def measure_model(model: str, args, acts: dict, timings: dict) -> list[dict]:
    side = args.resolution or {"tiny": 64, "sd15": 128}[model]
    rows = []
    with tempfile.TemporaryDirectory(prefix=f"scaling-{model}-") as tmp:
        start = time.perf_counter()
        pictures = max(8, args.batch_size * max(args.processes))
        counts = spawn(__file__, ["--worker", "world", "--arch", model, "--folder", tmp, "--pictures", str(pictures),
                                  "--resolution", str(side)], f"building {model}", _env())
        arch = make_arch(get_preset(model).denoiser, counts["unet"], counts["text_encoder"], counts["vae"])
        timings[f"{model}: build the model folder"] = time.perf_counter() - start
        print(f"\n{model}: {counts['unet'] / 1e6:.1f}M U-Net parameters, {side} px, batch {args.batch_size} per "
              f"process, {args.steps} steps; model folder built in {timings[f'{model}: build the model folder']:.0f} s")
        print_runs_header()
        start = time.perf_counter()
        for method_name in args.methods:
            method = METHODS[method_name]
            act = activation_gib(acts[model][method.trainer], side) * args.batch_size
            baseline = None
            for config, n in [("single", 1)] + [(c, n) for c in args.configs if c != "single" for n in args.processes]:
                row = {"model": model, "method": method_name, "config": config, "processes": n}
                row.update(run_one(method, config, n, arch, act, side, Path(tmp), args))
                baseline = baseline or row
                rows.append(_with_ratios(row, baseline, args.batch_size))
                print(_row_line(rows[-1]))
        timings[f"{model}: runs"] = time.perf_counter() - start
    for r in rows:
        if "log_tail" in r:
            print(f"\n{r['model']} {r['method']} {r['config']} x{r['processes']}, the log's end:\n{r['log_tail']}")
    return rows


def run_one(method: Method, config: str, n: int, arch: Arch, act: float, side: int, tmp: Path, args) -> dict:
    setup = setup_of(config, n)
    predicted = run_prediction(arch, method, args.rank, setup, act)
    available = _mem_available_gib() - args.keep_free
    reason = refused(method, setup)
    if reason is None and n * predicted["host"] > available:
        reason = f"predicted {n} x {predicted['host']:.1f} GiB > {available:.1f} GiB available"
    if reason is None and torch.cuda.is_available() and n > torch.cuda.device_count():
        reason = f"needs {n} GPUs"
    if reason:
        return {"skipped": reason, "predicted_gib": predicted}
    out = tmp / "runs" / f"{method.trainer}-{method.optimizer}-{config}-{n}"
    log = tmp / "run.log"
    overrides = [f"model.path={tmp / 'model'}", f"data.path={tmp / 'data'}", f"data.cache.dir={tmp / 'cache'}",
                 f"output_dir={out}", f"data.resolution={side}", f"train.max_steps={args.steps}",
                 f"train.batch_size={args.batch_size}", f"train.checkpoint_every={args.steps + 1}",
                 f"train.log_every={args.steps}", "train.mixed_precision=bf16",
                 "train.gradient_checkpointing=true", f"train.optimizer.name={method.optimizer}"]
    overrides += ([f"lora.rank={args.rank}", f"lora.alpha={args.rank}"] if method.trainer == "lora"
                  else ["full.single_file=false"])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / f"{config}.yaml"), "--num_processes", str(n),
           "--main_process_port", str(_free_port())]
    cmd += [] if torch.cuda.is_available() else ["--num_cpu_threads_per_process", "1"]
    cmd += ["-m", "trainers", str(ROOT / "configs" / "tiny" / f"{method.trainer}.yaml"), *overrides]
    start = time.perf_counter()
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, env=_env(),
                                start_new_session=True)  # its own process group: the guard kills it whole
        watched = watch(proc, available, args.timeout, log, args.steps)
    result = {"predicted_gib": predicted, "wall_s": time.perf_counter() - start, **watched}
    stats = out / "run_stats.json"
    if "failed" not in watched and proc.returncode == 0 and stats.is_file():
        result.update(json.loads(stats.read_text()))
    else:
        result.setdefault("failed", f"exit code {proc.returncode}")
        result["log_tail"] = _log_tail(log)
    shutil.rmtree(out, ignore_errors=True)
    return result


def watch(proc: subprocess.Popen, budget_gib: float, timeout_s: float, log: Path, steps: int) -> dict:
    """Poll the launched process tree until it ends; kill it (its own process group) past
    `budget_gib` of resident memory in all or past `timeout_s`. Also records each trainer
    process's peak resident set during the steps: from the progress bar's start to its last step,
    so without the float32 load before and the final checkpoint after."""
    root, start, peaks, failed = psutil.Process(proc.pid), time.monotonic(), {}, None
    while proc.poll() is None:
        rss = {}
        for p in [root, *root.children(recursive=True)]:
            try:
                rss[p] = p.memory_info().rss / GIB
            except psutil.NoSuchProcess:
                continue
        text = log.read_text(errors="replace")
        training = text[text.find("training:"):] if "training:" in text else ""
        if training and f" {steps}/{steps} " not in training:
            for p, gib in rss.items():
                if p != root and "trainers" in _cmdline(p):
                    peaks[p.pid] = max(peaks.get(p.pid, 0.0), gib)
        if sum(rss.values()) > budget_gib:
            failed = f"stopped by the memory guard: {sum(rss.values()):.1f} GiB > {budget_gib:.1f} GiB"
        elif time.monotonic() - start > timeout_s:
            failed = f"stopped after {timeout_s:.0f} s"
        if failed:
            os.killpg(proc.pid, signal.SIGKILL)
            psutil.wait_procs(list(rss), timeout=60)  # the next run reads MemAvailable: let it come back
            proc.wait()
            break
        time.sleep(POLL_S)
    result = {"steps_rss_gib": sorted(peaks.values())} if peaks and not torch.cuda.is_available() else {}
    return {**result, "failed": failed} if failed else result


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.NoSuchProcess:
        return ""


def _with_ratios(row: dict, base: dict, batch: int) -> dict:
    if "step_time_s_median" not in row:
        return row
    row["images_per_s"] = batch * row["processes"] / row["step_time_s_median"]
    row["peak_gib"] = max(row["peak_memory_gib"])
    if "step_time_s_median" in base:
        row["ratios"] = {"step_time": row["step_time_s_median"] / base["step_time_s_median"],
                         "images_per_s": row["images_per_s"] / base["images_per_s"],
                         "peak_memory": row["peak_gib"] / base["peak_gib"]}
    return row


def _row_line(r: dict) -> str:
    head = f"| {r['model']} | {r['method']} | {r['config']} | {r['processes']} |"
    if "skipped" in r or "failed" in r:
        return f"{head} {'skipped' if 'skipped' in r else 'FAILED'}: {r.get('skipped') or r['failed']} |" + " |" * 8
    steps = f"{max(r['steps_rss_gib']):.2f}" if r.get("steps_rss_gib") else "-"
    q, pred = r.get("ratios", {}), r["predicted_gib"]
    ratios = " | ".join(f"{q[k]:.2f}x" if k in q else "-" for k in ("step_time", "images_per_s", "peak_memory"))
    return (f"{head} {r['step_time_s_median']:.3f} s | {r['images_per_s']:.2f} | {r['peak_gib']:.2f} "
            f"({min(r['peak_memory_gib']):.2f}) | {pred['peak']:.2f} | {steps} | {pred['steps']:.2f} | {ratios} |")


def print_runs_header() -> None:
    print(f"MEASURED on {'GPU' if torch.cuda.is_available() else 'CPU'}; baseline: config single, 1 process")
    print("| model | method | config | processes | step | images/s | peak GiB, max (min) over ranks | predicted "
          "| steps GiB | predicted | step time vs baseline | images/s vs baseline | peak vs baseline |")
    print("|---" * 13 + "|")


def _log_tail(log: Path, lines: int = 15) -> str:
    progress = ("training:", "scan:", "encoding")
    text = [s for s in log.read_text(errors="replace").replace("\r", "\n").splitlines()
            if s.strip() and not s.startswith(progress)]
    return "\n".join(text[-lines:])


def _mem_available_gib() -> float:
    line = next(s for s in Path("/proc/meminfo").read_text().splitlines() if s.startswith("MemAvailable:"))
    return int(line.split()[1]) / 2**20


def _free_port() -> int:
    with socket.socket() as s:  # the tests may hold accelerate's default port at the same time
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    threads = {} if torch.cuda.is_available() else {"OMP_NUM_THREADS": "1"}
    return {**os.environ, "HF_HUB_OFFLINE": "1", **MEMORY_ENV, **threads}


# -- part 3: the prediction -----------------------------------------------------------------------------


def prediction(arches: dict[str, Arch], acts: dict) -> list[dict]:
    rows = []
    for model, side in PREDICTED.items():
        for label, (method_name, rank) in PREDICTED_METHODS.items():
            method = METHODS[method_name]
            act = activation_gib(acts[model][method.trainer], side)
            for setup_name, setup in PREDICTED_SETUPS.items():
                row = {"model": model, "side": side, "method": label, "setup": setup_name}
                if refused(method, setup):
                    row["refused"] = refused(method, setup)
                else:
                    device, host = predict_gib(arches[model], method, rank, setup, act)
                    row.update(gib=device, host_gib=host, activations_gib=act,
                               fits={c: device <= (1 - HEADROOM) * c for c in CARDS})
                rows.append(row)
    return rows


def print_prediction(rows: list[dict]) -> None:
    print(f"\nPREDICTED GiB per GPU (batch 1, bf16 mixed precision, gradient checkpointing) and, in brackets, the "
          f"smallest card of {', '.join(map(str, CARDS))} GB it fits with {HEADROOM:.0%} headroom (-: none):")
    print("| model, method | " + " | ".join(PREDICTED_SETUPS) + " |")
    print("|---" * (len(PREDICTED_SETUPS) + 1) + "|")
    for i in range(0, len(rows), len(PREDICTED_SETUPS)):
        group = rows[i:i + len(PREDICTED_SETUPS)]
        cells = ["n/a" if "refused" in r else f"{r['gib']:.1f} ({smallest_card(r['gib'])})" for r in group]
        print(f"| {group[0]['model']} {group[0]['side']} px, {group[0]['method']} | " + " | ".join(cells) + " |")
    for r in rows:
        if r["setup"] == "ZeRO-2 offload x1" and r.get("host_gib"):
            print(f"- {r['model']}, {r['method']}, ZeRO-2 offload x1: {r['host_gib']:.1f} GiB of host memory "
                  f"(master weights, fp32 gradients, optimizer state); activations {r['activations_gib']:.2f} GiB")


# -- the driver --------------------------------------------------------------------------------------------

CPU_NOTES = [
    ("Step times on a CPU are noisy (the cores are shared with whatever else runs; MALLOC_MMAP_THRESHOLD_ "
     "gives every large tensor fresh pages, which slows steps) and say nothing of GPU speed."),
    ("CPU peak memory (run_stats.json) is the process's whole peak resident set: Python and torch (~0.5 GiB, "
     "all of the tiny model's figure), loading, training and the final checkpoint. 'steps GiB' samples the "
     "resident set every 0.2 s during the steps only. On a CPU, 'offload' moves state within the same memory."),
]
NOTES = [
    ("Loading counts the U-Net twice in the resident set for a moment (8 B per U-Net parameter), but only "
     "once in memory: ldmcore's from_pretrained copies the weights file, which safetensors maps, into the "
     "module, and the mapped pages are the file's page cache, which the kernel can reclaim (SD 1.5, measured "
     "at that moment: 3.38 GiB anonymous, 3.28 GiB file-backed)."),
    ("The prediction is a model, not a measurement on a GPU: weights, gradients and optimizer state as "
     "bench/scaling.py's state_bytes counts them, plus the activations of part 1. ZeRO's buffers are "
     f"counted as the trainer sets them (trainers.distributed.ZERO_BUFFERS): a gradient bucket of "
     f"{REDUCE_BUCKET:.0e} elements ({2 * REDUCE_BUCKET / GIB:.2f} GiB per rank in bf16) and, under ZeRO-3, up to "
     f"{MAX_LIVE:.0e} parameters kept gathered. An EMA "
     "(train.ema_decay) adds 4 B per trained parameter; a batch of b multiplies the activations by b."),
    ("The VAE and text encoder(s) are counted on the card in float32, as trainers/loop.py keeps them after "
     "building the cache (SD 1.5: 0.77 GiB, SDXL: 3.4 GiB); in bf16 they would take half, moved off the card none."),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=["tiny", "sd15", "both"])
    p.add_argument("--methods", default="lora,full", help=f"of {', '.join(METHODS)}")
    p.add_argument("--configs", default=",".join(CONFIGS), help="accelerate configs; `single` (1 process) always runs")
    p.add_argument("--processes", default="1,2", help="process counts for every config but `single`")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--resolution", type=int, default=None, help="picture side (default: tiny 64, sd15 128)")
    p.add_argument("--batch-size", type=int, default=1, help="per process")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of the measured runs")
    p.add_argument("--keep-free", type=float, default=2.0, help="GiB of host memory never planned for")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run")
    p.add_argument("--predict", action="store_true", help="parts 1 and 3 only")
    p.add_argument("--activations-from", help="a results JSON of this script: its part 1, not measured again")
    p.add_argument("--out", default="scaling_results.json")
    for hidden in ("worker", "arch", "mode", "folder"):
        p.add_argument(f"--{hidden}", help=argparse.SUPPRESS)
    p.add_argument("--sides", type=int, nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--pictures", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps({"activations": activations_worker, "world": world_worker}[args.worker](args)))
        return
    args.methods, args.configs = args.methods.split(","), args.configs.split(",")
    args.processes = [int(n) for n in args.processes.split(",")]
    unknown = sorted(set(args.methods) - set(METHODS)) + sorted(set(args.configs) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"unknown --methods/--configs {unknown}; methods: {list(METHODS)}, configs: {list(CONFIGS)}")
    sys.stdout.reconfigure(line_buffering=True)  # rows appear as they are measured, also in a log file

    models = [] if args.predict else (["tiny", "sd15"] if args.model == "both" else [args.model])
    arches = predicted_arches()
    needed, timings, start = list(dict.fromkeys([*models, *PREDICTED])), {}, time.perf_counter()
    if args.activations_from:
        acts = json.loads(Path(args.activations_from).read_text())["activations"]
        if set(needed) - set(acts):
            raise SystemExit(f"{args.activations_from} has no activations of {sorted(set(needed) - set(acts))}; "
                             "measure them (leave out --activations-from)")
    else:
        acts = measure_activations(needed, args)
        timings["activations"] = time.perf_counter() - start
    print_activations(acts)
    runs = []
    for model in models:
        runs += measure_model(model, args, acts, timings)
    predicted = prediction(arches, acts)
    print_prediction(predicted)
    notes = NOTES if torch.cuda.is_available() else CPU_NOTES + NOTES
    print("\nNotes:\n" + "\n".join(f"- {n}" for n in notes))
    if timings:
        print("\nTime: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()))
    settings = {k: v for k, v in vars(args).items() if v is not None}  # the workers' own arguments are None here
    results = {"settings": settings, "activations": acts, "runs": runs, "prediction": predicted, "timings_s": timings,
               "notes": notes}
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
