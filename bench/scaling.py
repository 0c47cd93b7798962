"""Peak memory per process and step time of the trainer on 1, 2, ... processes, with and without
DeepSpeed ZeRO, and what the memory figures predict for SD 1.5, SDXL and Flux.1-dev on 8-24 GB cards.

Part 1, activation memory (measured). One training step of a denoiser, batch 1, gradient
checkpointing, bf16 autocast, at two picture sides, each after a warm-up step at that side, each
architecture and mode in its own process: the rise of the peak over the step above what was held
before it (CUDA: the allocator's peak; CPU: the peak resident set, reset through
/proc/self/clear_refs, with MALLOC_MMAP_THRESHOLD_ set so that freed tensors leave it). `lora`:
frozen bf16 base, LoRA (float32) on the attention projections; `lora-nf4`, `lora-int8`: the same
on a base quantised as train.base_quantization does it (its layers dequantise their weights for each
matmul and return their input's dtype, so its activations are its own); `full`: every weight trains,
each gradient dropped once accumulated (gradients are state, counted by the memory model). The
figure at another size is read off the line through the two measured ones, in pixels. Flux.1-dev
(its three LoRA modes) is measured at its real widths with 1 + 2 and 2 + 4 (double + single-stream) blocks, and the
figure at its 19 + 38 read off the line through the two depths: gradient checkpointing keeps each
block's input, the same size for every block.

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
encoder(s) off the card during the steps (trainers/loop.py moves them off once the cache is built):
weights, gradients and optimizer state as `state_bytes` counts them, plus part 1's activations.
Every parameter count is taken from the presets (`ldmcore.presets`: SD15, SDXL with its size
conditioning, `add_embedding`, FLUX_DEV with CLIP-L and T5-XXL), the models built on the meta device;
part 1 measures the same denoisers, SDXL's called with its `added_cond_kwargs`, Flux's with T5 states
of its 512 tokens. A setup fits a card when it needs at most 90% of it: the rest is for the CUDA
context (which max_memory_allocated does not count) and fragmentation. A cell "10.9 (12)" reads:
10.9 GiB, fits a 12 GB card and larger.

Then Flux.1-dev LoRA r16 at 1024 px on one GPU, by the base's precision: bf16, NF4 and int8
(train.base_quantization; `base_bytes`: NF4 0.516 B per Linear weight with bitsandbytes' double
quantization, int8 1 B and a float32 scale per row, the rest in bf16; each base's own activations),
with its parts, fits / does not fit on 12, 16 and 24 GB cards, and
what building the cache and validation sampling hold (the encoders on the card in float32). And
its check on this machine (`flux_check`, measured): the same model and a real step (quantised
base, LoRA, checkpointing, AdamW) of flux-dev's widths with 2 + 4 blocks at 384 px, a side part 1
did not measure, predicted against measured, weights (`ldmcore.quantize.quantized_bytes`) and peak.

    python bench/scaling.py --model tiny --out tiny.json   # parts 1-3; every config on 1 and 2 processes
    python bench/scaling.py --model sd15 --methods lora,full,full-8bit --processes 2 --steps 4 \\
        --activations-from tiny.json                        # part 1 reused; what fits this machine
    python bench/scaling.py --predict                       # parts 1 and 3 only

On 2 CPU cores: part 1 about 5 min for the U-Nets and 14 min for Flux (three bases at two depths),
the Flux check 4.5 min, the tiny runs 4 min, the SD 1.5 runs above 11 min.
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
from bench.unet_step import (MEMORY_ENV, bench_preset, bench_timestep, call_denoiser, denoiser_inputs,  # noqa: E402
                             family_of, latent_shape, seeded_lora_model, seeded_model, spawn,
                             with_blocks)
from ldmcore.checkpoints import _text_config, _text_model_class  # noqa: E402
from ldmcore.quantize import quantized_bytes  # noqa: E402
from ldmcore.vae import AutoencoderKL  # noqa: E402
from trainers.config import TrainConfig  # noqa: E402
from trainers.distributed import ZERO_BUFFERS  # noqa: E402
from trainers.optim import make_optimizer  # noqa: E402

GIB = 2**30
CARDS = (8, 12, 16, 24)  # GiB: an "8 GB" card has 8 GiB
HEADROOM = 0.10  # of a card, for the CUDA context and fragmentation
PROCESS_GIB = 0.5  # a trainer process before any model (Python, torch, accelerate): the tiny runs' peak
POLL_S = 0.2
WORDS = "a red green blue circle square on white black background".split()

# -- the memory model -------------------------------------------------------------------------------

# trainers/loop.py loads the VAE and text encoder(s) in float32, and once the cache is built moves them
# off the device (methods that read the cache: all modelled here); they come back for validation sampling
AUX_BYTES = 4
# A frozen base in 4 or 8 bits (train.base_quantization; bitsandbytes, as ldmcore.quantize builds it): its
# Linear weights. NF4: 4-bit codes, an absmax per block of 64 weights, itself quantised to 8 bits with a
# float32 scale per 256 blocks (bitsandbytes' double quantization, Params4bit's default); int8: 1 B a
# weight and a float32 scale per output row. Everything else of the base (biases, norms) stays in bf16.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
INT8_BYTES, INT8_ROW_BYTES = 1, 4
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2}  # both moments, per trained parameter
# The ZeRO buffer sizes the trainer fills in where the DeepSpeed config leaves them out:
REDUCE_BUCKET = ZERO_BUFFERS["reduce_bucket_size"]  # elements: the gradient bucket each ZeRO-2/3 rank allocates, in bf16
MAX_LIVE = ZERO_BUFFERS["stage3_max_live_parameters"]  # elements ZeRO-3 may keep gathered
# bitsandbytes' 8-bit AdamW on a CPU (not its fused CUDA kernel) makes float32 temporaries while it
# steps a tensor: measured 20 B per element with bitsandbytes 0.50
BNB_CPU_STEP_BYTES = 20


@dataclasses.dataclass(frozen=True)
class Arch:
    denoiser: float  # parameters (a U-Net, Flux's transformer)
    text: float  # text encoder(s)
    vae: float
    lora_per_rank: float  # LoRA parameters per unit of rank on the attention projections
    largest: float  # parameters of the denoiser's largest tensor
    linear: float = 0.0  # weights of its nn.Linear layers: what a 4/8-bit base quantises
    linear_rows: float = 0.0  # their output rows
    largest_linear: float = 0.0  # parameters of the largest Linear weight
    blocks: int = 0  # Flux: double- plus single-stream blocks, by which its activations grow; a U-Net: 0


@dataclasses.dataclass(frozen=True)
class Method:
    trainer: str  # `method:` of the training config
    optimizer: str  # train.optimizer.name
    base: str = "bf16"  # the frozen base: bf16, or train.base_quantization nf4 / int8


@dataclasses.dataclass(frozen=True)
class Setup:
    zero: int  # DeepSpeed ZeRO stage; 0: none
    gpus: int
    offload: bool = False  # optimizer (master weights, fp32 gradients, state) in host memory
    ddp: bool = False  # DistributedDataParallel's gradient buckets


METHODS = {"lora": Method("lora", "adamw"), "lora-nf4": Method("lora", "adamw", "nf4"),
           "lora-int8": Method("lora", "adamw", "int8"), "full": Method("full", "adamw"),
           "full-8bit": Method("full", "adamw8bit")}
CONFIGS = ("single", "multi", "zero2", "zero2_offload", "zero3")
PREDICTED = {"sd15": 512, "sdxl": 1024}  # native side
ACTIVATION_SIDES = {"tiny": (64, 128), "sd15": (256, 512), "sdxl": (256, 512), "flux-dev": (256, 512)}  # px, part 1
ACTIVATION_MODES = {"flux-dev": ("lora", "lora-nf4", "lora-int8")}  # by model; others: lora and full
# Flux is measured at its real widths at two depths (double, single blocks; 1:2 as in Flux.1's 19 + 38) and
# read off the line through them at its own depth
ACTIVATION_BLOCKS = {"flux-dev": ((1, 2), (2, 4))}
FLUX_PREDICTED = {"flux-dev": 1024}  # Flux.1-dev LoRA, one GPU, by the base's precision
FLUX_METHODS = {"bf16": "lora", "NF4": "lora-nf4", "int8": "lora-int8"}
FLUX_RANK = 16
FLUX_CARDS = (12, 16, 24)
# the check of the Flux prediction on this machine: the scaled-down model at a side part 1 did not measure
FLUX_CHECK_BLOCKS, FLUX_CHECK_SIDE = (2, 4), 384
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
    device is a CPU, which counts a page only once written (a bucket as far as gradients fill it),
    and the host, which keeps the VAE and text encoders the loop moves off the device."""
    trained = trained_params(arch, method, rank)
    frozen = 0 if method.trainer == "full" else arch.denoiser  # LoRA: the denoiser's base
    aux = AUX_BYTES * (arch.text + arch.vae) if cpu else 0.0
    opt = OPTIMIZER_BYTES[method.optimizer]
    n = setup.gpus
    if setup.zero == 0:
        # accelerate + autocast, as trainers/loop.py: the frozen base in bf16 (2 B) or quantised
        # (`base_bytes`); the trained weights (4 B), their gradients (4 B) and the optimizer state in
        # float32; DDP's gradient buckets hold a second copy of the gradients (4 B; gradient_as_bucket_view
        # is off). What a quantised base does while it steps (its weights dequantised layer by layer,
        # activations in its input's dtype) is in its measured activations.
        return aux + base_bytes(arch, method) + (4 + 4 + opt + (4 if setup.ddp else 0)) * trained, 0.0
    # DeepSpeed bf16: the engine holds the prepared module (for LoRA the base too) in bf16 (2 B),
    # ZeRO-3 shards it but keeps up to MAX_LIVE gathered; each rank keeps 1/n of the fp32 master
    # weights (4 B), of the optimizer state, and of the gradients: bf16 (2 B) plus the fp32 copy
    # made at the step (4 B); plus one REDUCE_BUCKET gradient bucket in bf16.
    module = (base_bytes(arch, method) + 2 * trained) / (n if setup.zero == 3 else 1)
    gathered = 2 * min(frozen + trained, MAX_LIVE) if setup.zero == 3 else 0
    bucket = 2 * (min(REDUCE_BUCKET, trained) if cpu else REDUCE_BUCKET)
    on_device = aux + module + gathered + bucket + 2 * trained / n
    optimizer = (4 + opt + 4) * trained / n  # master weights, state, fp32 gradients
    return (on_device, optimizer) if setup.offload else (on_device + optimizer, 0.0)


def trained_params(arch: Arch, method: Method, rank: int) -> float:
    return arch.denoiser if method.trainer == "full" else arch.lora_per_rank * rank


def base_bytes(arch: Arch, method: Method) -> float:
    """Bytes of the frozen denoiser's weights on the device (none for a full fine-tune: its weights train)."""
    if method.trainer == "full":
        return 0.0
    if method.base == "bf16":
        return 2 * arch.denoiser
    rest = 2 * (arch.denoiser - arch.linear)  # biases, norms (and a U-Net's convolutions) stay in bf16
    quantised = {"nf4": NF4_BYTES * arch.linear, "int8": INT8_BYTES * arch.linear + INT8_ROW_BYTES * arch.linear_rows}
    return quantised[method.base] + rest


def activation_mode(method: Method) -> str:
    """The part 1 measurement a method's activations come from: LoRA or full, and a quantised base's
    own (bitsandbytes' layers dequantise their weights for each matmul and return their input's dtype,
    so under autocast a quantised base's activations are not a bf16 base's)."""
    return method.trainer if method.base == "bf16" else f"{method.trainer}-{method.base}"


def activation_gib(measured: dict, side: int, blocks: int = 0) -> float:
    """Activation memory at `side` px, on the line through the two measured sizes (in pixels); for
    Flux, measured at two depths, that at each depth and then on the line through them at `blocks`
    (gradient checkpointing keeps each block's input, the same size for every block)."""
    if "blocks" in measured:
        (l1, l2) = measured["blocks"]
        a1, a2 = (activation_gib({"sides": measured["sides"], "gib": g}, side) for g in measured["gib"])
        return max(a2 + (a2 - a1) / (l2 - l1) * (blocks - l2), 0.0)
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
    load = PROCESS_GIB + 2 * 4 * arch.denoiser / GIB
    if cpu:
        steps = PROCESS_GIB + device + host
        if method.optimizer == "adamw8bit":  # it steps one parameter at a time, or a ZeRO rank's flat partition
            trained = trained_params(arch, method, rank)
            steps += BNB_CPU_STEP_BYTES * (trained / setup.gpus if setup.zero else min(arch.largest, trained)) / GIB
        return {"steps": steps, "peak": max(load, steps), "host": max(load, steps)}
    return {"steps": device, "peak": device, "host": max(load, PROCESS_GIB + host + AUX_BYTES * (arch.text + arch.vae) / GIB)}


def smallest_card(gib: float) -> str:
    return next((str(c) for c in CARDS if gib <= (1 - HEADROOM) * c), "-")


def make_arch(preset, denoiser: float, text: float, vae: float) -> Arch:
    """LoRA's size, the largest tensor and the Linear layers are counted on the architecture, built on
    the meta device."""
    preset = bench_preset(preset)
    with torch.device("meta"):
        model = family_of(preset).denoiser_class().from_config(dict(preset.denoiser))
    largest = max(p.numel() for p in model.parameters())
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    add_lora(model, LoraSettings(rank=1, alpha=1, targets="attention"))
    per_rank = sum(p.numel() for p in model.parameters() if p.requires_grad)
    blocks = preset.denoiser.get("num_layers", 0) + preset.denoiser.get("num_single_layers", 0)
    return Arch(denoiser, text, vae, per_rank, largest, linear=float(sum(m.weight.numel() for m in linears)),
                linear_rows=float(sum(m.out_features for m in linears)),
                largest_linear=float(max(m.weight.numel() for m in linears)), blocks=blocks)


def preset_arch(name) -> Arch:
    """The sizes of a preset's models, counted on the meta device: the denoiser (SDXL's with its
    `add_embedding`), the family's text encoders with the preset's full vocabulary (Flux: CLIP-L and
    T5-XXL), the VAE."""
    preset = bench_preset(name)
    configs = {"text_encoder": preset.text_encoder, "text_encoder_2": preset.text_encoder_2}
    with torch.device("meta"):
        denoiser = family_of(preset).denoiser_class().from_config(dict(preset.denoiser))
        texts = [_text_model_class(kind)(_text_config(kind, configs[part]))
                 for part, _, kind in family_of(preset).text_parts]
        vae = AutoencoderKL.from_config(dict(preset.vae))

    def count(*models) -> float:
        return float(sum(p.numel() for m in models for p in m.parameters()))

    return make_arch(preset, count(denoiser), count(*texts), count(vae))


def predicted_arches() -> dict[str, Arch]:
    return {name: preset_arch(name) for name in [*PREDICTED, *FLUX_PREDICTED]}


# -- workers, one process each ------------------------------------------------------------------------


def activations_worker(args) -> dict:
    """Part 1 for one architecture, mode (and for Flux depth; see the module docstring)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = worker_preset(args)
    trainer, _, base = args.mode.partition("-")
    if trainer == "lora":
        model, _ = seeded_lora_model("ldmcore", preset, args.rank, device, torch.bfloat16, base or None)
    else:
        model, _ = seeded_model("ldmcore", preset, device, torch.bfloat16)
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(lambda q: setattr(q, "grad", None))
    model.set_gradient_checkpointing(True)
    model.train()
    g = torch.Generator().manual_seed(0)
    t = bench_timestep(preset, 1, device)  # (1,) 500, or sigma 0.5

    def step(side: int) -> None:
        # encoder_hidden_states (1, 77, width); SDXL: added_cond_kwargs, pooled (1, 1280) and size ids (1, 6);
        # Flux: T5 states (1, 512, 4096), pooled (1, 768), guidance (1,)
        inputs = denoiser_inputs(preset, 1, side, g, device, torch.float32)
        x = torch.randn(latent_shape(preset, 1, side), generator=g).to(device)  # (1, c, h, w) noisy latents
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = call_denoiser(model, x, t, inputs)  # (1, c, h, w)
        torch.nn.functional.mse_loss(out.float(), torch.zeros_like(x)).backward()

    rises = []
    for side in args.sides:
        step(side)  # one-off allocations (kernels, thread pools, per-shape caches) stay out of the figures
        before = _reset_peak(device)
        step(side)
        rises.append((_memory_peak(device) - before) / GIB)
    return {"sides": args.sides, "gib": rises}


def flux_check_worker(args) -> dict:
    """The check of the Flux prediction: LoRA steps of a Flux transformer as trainers/loop.py runs them
    (the base in bf16 or quantised, `args.base`; LoRA in float32; gradient checkpointing; bf16 autocast;
    AdamW; gradients set to None after each step), batch 1 at `args.sides[0]` px. Returns the peak over
    a step after a warm-up step above what the process held before the model was built (CUDA: the
    allocator's; CPU: the resident set's), and the bytes of the model's weights (quantized_bytes)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = worker_preset(args)
    quantization = None if args.base == "bf16" else args.base
    # what building imports (peft, bitsandbytes' layers) is imported first, by building tiny-flux alike: on a
    # CPU modules are resident memory too, which is not the model's (on CUDA the allocator never sees them)
    seeded_lora_model("ldmcore", "tiny-flux", 4, device, torch.bfloat16, quantization)
    start = _reset_peak(device)
    model, lora = seeded_lora_model("ldmcore", preset, args.rank, device, torch.bfloat16, quantization)
    model.set_gradient_checkpointing(True)
    opt = make_optimizer([p for _, p in lora], TrainConfig(max_steps=1))
    g = torch.Generator().manual_seed(0)
    side = args.sides[0]
    inputs = denoiser_inputs(preset, 1, side, g, device, torch.float32)
    x = torch.randn(latent_shape(preset, 1, side), generator=g).to(device)  # (1, 16, h, w)
    target = torch.randn(x.shape, generator=g).to(device)
    t = bench_timestep(preset, 1, device)

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = call_denoiser(model, x, t, inputs)
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    step()  # the optimizer's state appears here
    _reset_peak(device)
    loss = step()
    return {"steps_gib": (_memory_peak(device) - start) / GIB, "weights_gib": quantized_bytes(model) / GIB,
            "lora_params": sum(p.numel() for _, p in lora), "loss": loss}


def worker_preset(args):
    preset = bench_preset(args.arch)
    return with_blocks(preset, *map(int, args.blocks.split(","))) if args.blocks else preset


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
    return {name: sum(p.numel() for p in getattr(parts, name).parameters()) for name in ("denoiser", "text_encoder", "vae")}


# -- part 1: activations ----------------------------------------------------------------------------


def measure_activations(needed: dict[str, list[str]], args) -> dict:
    """Part 1 for each model and its modes (`activation_mode`)."""
    found = {}
    for name, modes in needed.items():
        flux = name in ACTIVATION_BLOCKS
        for mode in modes:
            argv = ["--worker", "activations", "--arch", name, "--mode", mode, "--rank", str(args.rank),
                    "--sides", *map(str, ACTIVATION_SIDES[name])]
            if not flux:
                found.setdefault(name, {})[mode] = spawn(__file__, argv, f"activations {name} {mode}", _env())
                continue
            depths = [spawn(__file__, [*argv, "--blocks", f"{d},{s}"], f"activations {name} {mode} {d}+{s} blocks",
                            _env()) for d, s in ACTIVATION_BLOCKS[name]]
            found.setdefault(name, {})[mode] = {"sides": depths[0]["sides"],
                                                "blocks": [d + s for d, s in ACTIVATION_BLOCKS[name]],
                                                "gib": [m["gib"] for m in depths]}
    return found


def print_activations(found: dict) -> None:
    print("\nActivation memory per picture (batch 1, gradient checkpointing, bf16), measured:")
    print("| denoiser | mode | " + " | ".join(["side", "GiB"] * 2) + " | per megapixel, between the two |")
    print("|---|---|---|---|---|---|---|")
    for name, modes in found.items():
        for mode, m in modes.items():
            depths = zip(m["blocks"], m["gib"]) if "blocks" in m else [(None, m["gib"])]
            for blocks, (a1, a2) in depths:
                (s1, s2) = m["sides"]
                per_megapixel = (a2 - a1) / (s2**2 - s1**2) * 1e6
                label = f"{name} ({blocks} blocks)" if blocks else name
                print(f"| {label} | {mode} | {s1} px | {a1:.3f} | {s2} px | {a2:.3f} | {per_megapixel:.3f} GiB |")


# -- part 2: the trainer ------------------------------------------------------------------------------


def measure_model(model: str, args, acts: dict, timings: dict) -> list[dict]:
    side = args.resolution or {"tiny": 64, "sd15": 128}[model]
    rows = []
    with tempfile.TemporaryDirectory(prefix=f"scaling-{model}-") as tmp:
        start = time.perf_counter()
        pictures = max(8, args.batch_size * max(args.processes))
        counts = spawn(__file__, ["--worker", "world", "--arch", model, "--folder", tmp, "--pictures", str(pictures),
                                  "--resolution", str(side)], f"building {model}", _env())
        arch = make_arch(model, counts["denoiser"], counts["text_encoder"], counts["vae"])
        timings[f"{model}: build the model folder"] = time.perf_counter() - start
        print(f"\n{model}: {counts['denoiser'] / 1e6:.1f}M U-Net parameters, {side} px, batch {args.batch_size} per "
              f"process, {args.steps} steps; model folder built in {timings[f'{model}: build the model folder']:.0f} s")
        print_runs_header()
        start = time.perf_counter()
        for method_name in args.methods:
            method = METHODS[method_name]
            act = activation_gib(acts[model][activation_mode(method)], side) * args.batch_size
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
    overrides += [f"train.base_quantization={method.base}"] if method.base != "bf16" else []
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
            act = activation_gib(acts[model][activation_mode(method)], side)
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


def flux_prediction(arches: dict[str, Arch], acts: dict) -> list[dict]:
    """Flux.1 LoRA on one GPU by the base's precision: the steps' peak and its parts, and the two moments
    outside the steps when the VAE and text encoders are on the card (float32, as the loop loads them):
    building the cache (before the denoiser comes to the device) and validation sampling (beside the
    base, the LoRA weights and the optimizer state; plus sampling's activations, not modelled)."""
    rows = []
    for model, side in FLUX_PREDICTED.items():
        arch = arches[model]
        encoders = AUX_BYTES * (arch.text + arch.vae) / GIB
        for label, method_name in FLUX_METHODS.items():
            method = METHODS[method_name]
            act = activation_gib(acts[model][activation_mode(method)], side, arch.blocks)
            trained = trained_params(arch, method, FLUX_RANK)
            device, _ = predict_gib(arch, method, FLUX_RANK, Setup(0, 1), act)
            base = base_bytes(arch, method) / GIB
            rows.append({"model": model, "side": side, "rank": FLUX_RANK, "base": label, "gib": device,
                         "base_gib": base,
                         "lora_state_gib": (4 + 4 + OPTIMIZER_BYTES[method.optimizer]) * trained / GIB,
                         "activations_gib": act, "fits": {c: fits(device, c) for c in FLUX_CARDS},
                         "cache_gib": encoders,
                         "validation_gib": base + (4 + OPTIMIZER_BYTES[method.optimizer]) * trained / GIB + encoders})
    return rows


def fits(gib: float, card: int) -> bool:
    return gib <= (1 - HEADROOM) * card


def print_flux_prediction(rows: list[dict], arches: dict[str, Arch]) -> None:
    for model, side in FLUX_PREDICTED.items():
        arch, group = arches[model], [r for r in rows if r["model"] == model]
        print(f"\nPREDICTED GiB on one GPU: {model} ({arch.denoiser / 1e9:.2f}B transformer parameters, {arch.blocks} "
              f"blocks), LoRA r{FLUX_RANK} on the attention projections ({arch.lora_per_rank * FLUX_RANK / 1e6:.1f}M "
              f"parameters), {side} px, batch 1, bf16 autocast, gradient checkpointing; the VAE and text encoders off the "
              f"card during the steps. A card fits at most {1 - HEADROOM:.0%} of its size:")
        print("| base | base weights | LoRA + gradients + AdamW | activations | steps, total | "
              + " | ".join(f"{c} GB" for c in FLUX_CARDS) + " |")
        print("|---" * (5 + len(FLUX_CARDS)) + "|")
        for r in group:
            cells = " | ".join("fits" if r["fits"][c] else "does not fit" for c in FLUX_CARDS)
            print(f"| {r['base']} | {r['base_gib']:.2f} | {r['lora_state_gib']:.2f} | {r['activations_gib']:.2f} | "
                  f"{r['gib']:.2f} | {cells} |")
        cache = group[0]["cache_gib"]
        print(f"- Outside the steps, the same model: building the cache holds CLIP-L, T5-XXL and the VAE on the card "
              f"in float32 ({(arch.text + arch.vae) / 1e9:.2f}B parameters), {cache:.1f} GiB "
              f"({', '.join(f'{c} GB: ' + ('fits' if fits(cache, c) else 'does not fit') for c in FLUX_CARDS)}); "
              "validation sampling brings them back beside the base: "
              + ", ".join(f"{r['base']} {r['validation_gib']:.1f} GiB" for r in group) + " (plus sampling's activations).")


def flux_check(acts: dict, args) -> list[dict]:
    """The Flux prediction against a measurement on this machine: the scaled-down model (FLUX_CHECK_BLOCKS,
    the real widths) at FLUX_CHECK_SIDE px, a side part 1 did not measure, for each base precision."""
    model = next(iter(FLUX_PREDICTED))
    preset = with_blocks(bench_preset(model), *FLUX_CHECK_BLOCKS)
    arch = dataclasses.replace(preset_arch(preset), text=0.0, vae=0.0)  # the worker holds no encoders
    rows = []
    for label, method_name in FLUX_METHODS.items():
        method = METHODS[method_name]
        act = activation_gib(acts[model][activation_mode(method)], FLUX_CHECK_SIDE, arch.blocks)
        trained = trained_params(arch, method, FLUX_RANK)
        argv = ["--worker", "flux-check", "--arch", model, "--blocks", ",".join(map(str, FLUX_CHECK_BLOCKS)),
                "--base", method.base, "--rank", str(FLUX_RANK), "--sides", str(FLUX_CHECK_SIDE)]
        measured = spawn(__file__, argv, f"the Flux check, {label} base", _env())
        device, _ = predict_gib(arch, method, FLUX_RANK, Setup(0, 1), act)
        rows.append({"base": label, "predicted_gib": device, "measured_gib": measured["steps_gib"],
                     "predicted_weights_gib": (base_bytes(arch, method) + 4 * trained) / GIB,
                     "measured_weights_gib": measured["weights_gib"], "activations_gib": act,
                     "lora_params": measured["lora_params"], "loss": measured["loss"]})
    return rows


def print_flux_check(rows: list[dict]) -> None:
    d, s = FLUX_CHECK_BLOCKS
    where = f"GPU ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "this CPU (the resident set)"
    print(f"\nCHECK of the Flux prediction, MEASURED on {where}: flux-dev's widths with {d} + {s} blocks, LoRA "
          f"r{FLUX_RANK}, {FLUX_CHECK_SIDE} px (not a side part 1 measured), batch 1, bf16 autocast, gradient "
          "checkpointing, AdamW; the peak over a step above the process before the model:")
    print("| base | weights GiB, predicted | measured (quantized_bytes) | step peak GiB, predicted | measured | "
          "predicted / measured |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['base']} | {r['predicted_weights_gib']:.3f} | {r['measured_weights_gib']:.3f} | "
              f"{r['predicted_gib']:.3f} | {r['measured_gib']:.3f} | {r['predicted_gib'] / r['measured_gib']:.3f} |")


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
    ("The VAE and text encoder(s) are not counted on the card: trainers/loop.py moves them off it once the cache "
     "is built, and brings them back in float32 for validation sampling (SD 1.5: +0.77 GiB, SDXL: +3.4 GiB, "
     "Flux.1: +18.5 GiB while it samples). On a CPU the device is the host, which keeps them."),
    ("A quantised base (train.base_quantization): NF4 0.516 B per Linear weight (4-bit codes; an 8-bit absmax "
     "per 64 weights with a float32 scale per 256 blocks: bitsandbytes' double quantization), int8 1 B per "
     "weight and a float32 scale per row; the rest of the base in bf16. Its activations are measured with it "
     "(part 1): bitsandbytes dequantises each layer's weight for its matmul, and Linear4bit returns its "
     "input's dtype, float32 under autocast with float32 latents, where a bf16 Linear returns bf16."),
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
    p.add_argument("--activations-from",
                   help="a results JSON of this script: its part 1, not measured again (what it lacks is measured)")
    p.add_argument("--no-flux-check", action="store_true", help="leave out the Flux check (4.5 min on a CPU)")
    p.add_argument("--out", default="scaling_results.json")
    for hidden in ("worker", "arch", "mode", "folder", "blocks", "base"):
        p.add_argument(f"--{hidden}", help=argparse.SUPPRESS)
    p.add_argument("--sides", type=int, nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--pictures", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        workers = {"activations": activations_worker, "world": world_worker, "flux-check": flux_check_worker}
        print(json.dumps(workers[args.worker](args)))
        return
    args.methods, args.configs = args.methods.split(","), args.configs.split(",")
    args.processes = [int(n) for n in args.processes.split(",")]
    unknown = sorted(set(args.methods) - set(METHODS)) + sorted(set(args.configs) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"unknown --methods/--configs {unknown}; methods: {list(METHODS)}, configs: {list(CONFIGS)}")
    sys.stdout.reconfigure(line_buffering=True)  # rows appear as they are measured, also in a log file

    models = [] if args.predict else (["tiny", "sd15"] if args.model == "both" else [args.model])
    arches = predicted_arches()
    needed = {name: list(ACTIVATION_MODES.get(name, ("lora", "full")))
              for name in dict.fromkeys([*models, *PREDICTED, *FLUX_PREDICTED])}
    for model in models:  # the measured runs' methods, a quantised base's included
        needed[model] += [m for m in dict.fromkeys(activation_mode(METHODS[n]) for n in args.methods)
                          if m not in needed[model]]
    timings, start = {}, time.perf_counter()
    acts = json.loads(Path(args.activations_from).read_text())["activations"] if args.activations_from else {}
    acts = {name: {m: acts[name][m] for m in modes if m in acts.get(name, {})} for name, modes in needed.items()}
    missing = {name: [m for m in modes if m not in acts[name]] for name, modes in needed.items()}
    missing = {name: modes for name, modes in missing.items() if modes}
    if missing:
        for name, measured in measure_activations(missing, args).items():
            acts[name].update(measured)
        timings["activations"] = time.perf_counter() - start
    print_activations(acts)
    runs = []
    for model in models:
        runs += measure_model(model, args, acts, timings)
    predicted = prediction(arches, acts)
    print_prediction(predicted)
    flux = flux_prediction(arches, acts)
    print_flux_prediction(flux, arches)
    checked = []
    if not args.no_flux_check:
        start = time.perf_counter()
        checked = flux_check(acts, args)
        timings["Flux check"] = time.perf_counter() - start
        print_flux_check(checked)
    notes = NOTES if torch.cuda.is_available() else CPU_NOTES + NOTES
    print("\nNotes:\n" + "\n".join(f"- {n}" for n in notes))
    if timings:
        print("\nTime: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()))
    settings = {k: v for k, v in vars(args).items() if v is not None}  # the workers' own arguments are None here
    results = {"settings": settings, "activations": acts, "runs": runs, "prediction": predicted, "flux_prediction": flux,
               "flux_check": checked, "timings_s": timings, "notes": notes}
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
