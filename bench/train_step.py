"""LoRA training-step cost of ldm-tune against diffusers + peft, and what the latent cache saves.

Part 1, the LoRA step. Two stacks on the same denoiser architecture (a preset of ldmcore.presets,
SD 1.x/2.x, SDXL or Flux.1, or a scaled-down config of bench/unet_step.py's SCALED):
- ldm-tune: the family's denoiser (`ldmcore.UNet`, `ldmcore.flux.FluxTransformer`) with
  `adapters.add_lora(LoraSettings(rank=R, alpha=R, targets="attention"))`, the trainer's default;
- diffusers: the diffusers class of the same config (`UNet2DConditionModel`,
  `FluxTransformer2DModel`) with `add_adapter(peft.LoraConfig(r=R, lora_alpha=R,
  target_modules=TARGETS, init_lora_weights="gaussian"))`, as diffusers' LoRA scripts do.
TARGETS are the attention projections (bench/unet_step.py's LORA_TARGETS): U-Net ["to_q", "to_k",
"to_v", "to_out.0"]; Flux also the text stream's ["add_q_proj", "add_k_proj", "add_v_proj",
"to_add_out"] (double-stream blocks; the single-stream blocks have q, k, v): what ldm-tune's "attention"
selects for each (checked by the LoRA tensors' names).
Both get the same base and LoRA weights (every tensor drawn from a generator seeded by its name,
LoRA B included, so the adapters change the output from the first step; the LoRA layers are the
same, checked by their names) and then what trainers/loop.py does: the frozen base in the compute
dtype (allocated in it, so no float32 copy inflates a CPU peak), the LoRA weights in float32, and
for bf16 the step under torch.autocast. A step is: forward on fixed latents, the middle timestep
(500; Flux: sigma 0.5) and the conditioning the preset's family builds from a text encoding
(bench/unet_step.py's `denoiser_inputs`: random text embeddings; SDXL: also a random pooled embedding
and the size ids of an uncropped picture, as `added_cond_kwargs`; Flux: random T5 states (b,
max_sequence_length, 4096), a pooled CLIP embedding (b, 768) and for dev guidance 1.0; diffusers' Flux
transformer is called as FluxPipeline calls it, on packed latents), MSE loss against a fixed target,
backward, AdamW (trainers.optim.make_optimizer with the trainer's defaults) on the LoRA weights,
zero_grad. The first step's loss and LoRA gradient norm of the two stacks are compared, so that both
compute the same thing.

Quantised rows (--quantized; default nf4 for a Flux preset, none for a U-Net): ldm-tune's stack with
the base's Linear layers in bitsandbytes' 4-bit NF4 (or int8) (`ldmcore.quantize.quantize_linears`
before `add_lora`, as train.base_quantization does). Its loss differs from the others' (the
weights are rounded), so it is not compared; it must be finite, and its time and memory are reported.

Reported per stack and dtype: median step time; peak memory as bench/unet_step.py measures it
(CUDA: torch's allocator peak over the timed steps, weights included; CPU: the rise of the peak
resident set over all steps, in its own process with MALLOC_MMAP_THRESHOLD_ set); the bytes of the
model's weights (`ldmcore.quantize.quantized_bytes`: quantised ones packed, with their scales); the
FLOPs of one step, counted by torch.utils.flop_counter.FlopCounterMode on an actual step (matmuls,
convolutions and attention, forward and backward; bitsandbytes' own kernels are not counted, so a
quantised row reports the FLOPs of the plain ldm-tune step); and MFU = FLOPs / step time / peak
FLOP/s, where the peak is measured in the same run: the best of N timed square matmuls in that dtype.
(On CUDA, fp32 convolutions run in TF32 by default while the fp32 matmul peak does not.)
Targets, ldm-tune / diffusers: time <= 0.8x, memory <= 0.8x.

Part 2, the loop around the step (ldm-tune's stack only), from a cache built first in a temporary
folder out of synthetic PNGs, with the preset's VAE and text encoder(s) at their real sizes (SDXL:
CLIP-L and CLIP-bigG, 0.7B parameters; Flux: CLIP-L and T5-XXL, 4.8B; their cost is what the cache
saves) with random weights and a vocabulary of the caption words (`data_tools.precompute.prepare_cache`
with the family's prompt encoder, which caches {"hidden", ["pooled"]} per caption):
- cache: read the batch from `CachedDataset` as trainers/loop.py does (text dict, size ids), then
  the LoRA step of `trainers.loop.diffusion_loss` (posterior sample, noise, timesteps, schedule,
  the family's denoiser inputs) + backward + AdamW;
- encode: encode the pictures with the VAE and the captions with the text encoder(s) (in the
  compute dtype, as diffusers' scripts keep them) every step, then the same LoRA step. The
  pictures are decoded and their size ids read beforehand: DataLoader workers would hide decoding.
Reported: time per step, the part of it spent getting the batch, and cache / encode. Part 2 is
skipped, with the reason, where its largest worker (the denoiser beside the VAE and text encoders in
float32) does not fit the host: Flux's T5-XXL alone is 19 GB in float32.

    python bench/train_step.py                       # GPU: SD 1.5, 512 px, batch 1, fp32 and bf16
    python bench/train_step.py --resolution 256 --steps 2 --warmup 1    # CPU (128 px: ~2 min per dtype)
    python bench/train_step.py --model sdxl --resolution 256 --steps 3 --warmup 1   # CPU, 20 min
    python bench/train_step.py --model flux-dev                         # GPU: Flux.1-dev, 1024 px (24 GB bf16 base)
    OMP_NUM_THREADS=1 python bench/train_step.py --model flux-dev-small --resolution 256 --steps 2 --warmup 1  # CPU

--model (or --preset) is any trainable preset of ldmcore.presets, or flux-dev-small /
flux-schnell-small (Flux.1's real widths with 2 double-stream + 4 single-stream blocks: per-block
time and memory as the real model's, 1.31B parameters). On a CPU the driver first checks that part
1's largest worker (the frozen denoiser in the dtype) fits in the memory the host has available, and
refuses the run if not; part 2's (with the VAE and text encoders in float32) is checked before part 2.

It exits non-zero when the two stacks' first steps differ or a quantised step's loss is not finite.
CPU timings are only a smoke test.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils import flop_counter as fc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.unet_step import (DTYPES, bench_preset, bench_timestep, call_denoiser, denoiser_inputs,  # noqa: E402
                              denoiser_params, latent_shape, lora_targets, measure, measure_steps, memory_shortfall,
                              refuse_beyond_memory, seeded_lora_model, spawn)
from data_tools.config import DataConfig  # noqa: E402
from data_tools.dataset import CachedDataset  # noqa: E402
from data_tools.images import load_rgb, read_bytes  # noqa: E402
from data_tools.precompute import prepare_cache  # noqa: E402
from data_tools.records import Manifest  # noqa: E402
from data_tools.transforms import to_tensor  # noqa: E402
from ldmcore.checkpoints import Components, _new_text_encoder, fresh_tokenizer_2  # noqa: E402
from ldmcore.family import get_family  # noqa: E402
from ldmcore.quantize import KINDS, quantized_bytes  # noqa: E402
from ldmcore.text import build_word_tokenizer  # noqa: E402
from ldmcore.vae import AutoencoderKL  # noqa: E402
from trainers.batch import collate, to_device  # noqa: E402
from trainers.config import Config, TrainConfig  # noqa: E402
from trainers.loop import diffusion_loss, sample_generators  # noqa: E402
from trainers.method import Method  # noqa: E402
from trainers.optim import make_optimizer  # noqa: E402

CAPTIONS = ["a photo of a red cube", "a green sphere on a table", "a blue cone in the snow", "a yellow ring"]
MATMUL_REPEATS = 10
STACKS = {"diffusers": "diffusers", "ldmcore": "ldm-tune"}  # worker name -> printed name
# quantised rows: worker "ldmcore-nf4" -> "ldm-tune NF4"


# -- what both parts build ---------------------------------------------------------------------------


def lora_denoiser(stack: str, args, dtype, device):
    """The denoiser of `stack` ("diffusers", "ldmcore", "ldmcore-nf4", ...) with LoRA on the attention
    projections, set up as trainers/loop.py sets it up (bench/unet_step.py's `seeded_lora_model`)."""
    impl, _, quantization = stack.partition("-")
    return seeded_lora_model(impl, args.preset, args.rank, device, dtype, quantization or None)


def stack_name(worker: str) -> str:
    impl, _, quantization = worker.partition("-")
    return STACKS[impl] + (f" {quantization.upper()}" if quantization else "")


def optimizer(params):
    return make_optimizer(params, TrainConfig(max_steps=1))  # AdamW with the trainer's defaults


def precision(device, dtype):
    """What accelerate's autocast does under mixed_precision: nothing for fp32, autocast for bf16."""
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def count_flops(step) -> int:
    """FLOPs of one call of `step`. torch's counter knows the CUDA attention kernels but not the CPU
    one, so that one is taught the same formulas first."""
    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu not in fc.flop_registry:
        fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)(
            lambda q, k, v, *a, out_shape=None, **kw: fc.sdpa_flop_count(q, k, v))
        fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)(
            lambda g, q, k, v, *a, out_shape=None, **kw: fc.sdpa_backward_flop_count(g, q, k, v))
    with fc.FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def data_config(args):
    return DataConfig(path=args.images, resolution=args.resolution, min_side=64,
                      cache={"dir": args.cache, "num_workers": 0})


def components(preset_name: str, denoiser=None) -> Components:
    """The preset's VAE, schedule and text encoder(s) as its family has them (SDXL: CLIP-L and
    CLIP-bigG, the second tokenizer padding with "!"; Flux: CLIP-L and T5 with a T5 tokenizer of the
    same words), at the preset's sizes but with a vocabulary of the caption words, random weights from
    seed 0: the cache builder and the encoding loop get the same ones. `denoiser`: the one the loop
    trains (None to build the cache)."""
    preset = bench_preset(preset_name)
    family = get_family(preset.family)
    tokenizer = build_word_tokenizer(" ".join(CAPTIONS).split())
    tokenizers = {"tokenizer": tokenizer, "tokenizer_2": fresh_tokenizer_2(family, tokenizer)}
    configs = {"text_encoder": preset.text_encoder, "text_encoder_2": preset.text_encoder_2}
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(dict(preset.vae)).eval()
    texts = {name: _new_text_encoder(kind, configs[name], tokenizers[tok]) for name, tok, kind in family.text_parts}
    return Components(denoiser=denoiser, vae=vae, text_encoder=texts.get("text_encoder"), tokenizer=tokenizer,
                      schedule=family.schedule_class().from_config(preset.scheduler), text_kind=preset.text_kind,
                      text_encoder_2=texts.get("text_encoder_2"), tokenizer_2=tokenizers["tokenizer_2"], family=family)


def host_gib_needed(preset_name: str, dtype: str, encoders: bool) -> float:
    """GiB of a worker's weights: part 1's frozen denoiser in `dtype`, with `encoders` part 2's, the VAE
    and text encoders beside it in float32 (encoding every step casts them, once, to `dtype`)."""
    size = torch.empty((), dtype=getattr(torch, DTYPES[dtype])).element_size()
    aux = 0
    if encoders:
        with torch.device("meta"):
            aux = sum(p.numel() for m in components(preset_name).models[1:] for p in m.parameters())
    return (denoiser_params(preset_name) * size + 4 * aux) / 2**30


# -- workers, one process each -------------------------------------------------------------------------


def step_worker(args) -> dict:
    """Part 1: one stack's LoRA step on fixed inputs."""
    device, dtype = torch.device(args.device), getattr(torch, DTYPES[args.dtype])
    model, lora = lora_denoiser(args.worker, args, dtype, device)
    params = [p for _, p in lora]
    opt = optimizer(params)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(latent_shape(args.preset, args.batch, args.resolution), generator=g).to(device)  # (b, c, h, w)
    # encoder_hidden_states (b, 77, width); SDXL: added_cond_kwargs {"text_embeds": (b, 1280), "time_ids": (b, 6)};
    # Flux: encoder_hidden_states (b, 512, 4096), pooled_projections (b, 768), guidance (b,)
    inputs = denoiser_inputs(args.preset, args.batch, args.resolution, g, device, torch.float32)
    target = torch.randn(x.shape, generator=g).to(device)
    t = bench_timestep(args.preset, args.batch, device)  # (b,) 500, or sigma 0.5
    first = {}

    def step():
        with precision(device, dtype):
            out = call_denoiser(model, x, t, inputs)
            loss = F.mse_loss(out.float(), target)
        loss.backward()
        if not first:  # the check of the two stacks against each other
            first["loss"] = loss.item()
            first["grad_norm"] = torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in params])).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    r = measure_steps(step, device, args.steps, args.warmup)
    names = "\n".join(sorted(name for name, _ in lora))
    return {"step_s": r["step_s"], "peak_mib": r["peak_mib"], "flops": count_flops(step), **first,
            "weights_mib": quantized_bytes(model) / 2**20, "lora_tensors": len(lora),
            "lora_names_crc": zlib.crc32(names.encode())}


def peak_worker(args) -> dict:
    """The best FLOP/s of square matmuls in the dtype: the peak MFU is measured against."""
    device, dtype = torch.device(args.device), getattr(torch, DTYPES[args.dtype])
    n, cuda = args.matmul_size, device.type == "cuda"
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    out, inner, best = torch.empty_like(a), (20 if cuda else 1), float("inf")
    for i in range(MATMUL_REPEATS + 1):  # round 0 warms up
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=out)
        if cuda:
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / inner) if i else best
    name = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    return {"flops_per_s": 2 * n**3 / best, "device": name}


def cache_worker(args) -> dict:
    """Part 2, first: the cache of the synthetic pictures, as `python -m data_tools precompute` builds it."""
    data = data_config(args)
    parts = components(args.preset)
    _, report = prepare_cache(data, parts.vae, parts.prompt_encoder(data.clip_skip, data.max_windows), progress=False)
    return {"images": report.images_encoded, "seconds": report.seconds}


def loop_worker(args) -> dict:
    """Part 2: batch from the cache (loop-cache) or encoded live (loop-encode), then the LoRA step of
    trainers/loop.py on ldm-tune's stack."""
    device, dtype = torch.device(args.device), getattr(torch, DTYPES[args.dtype])
    data = data_config(args)
    config = Config(method="lora", model={"path": "(random weights)"}, data=data, output_dir=args.cache,
                    train={"max_steps": 1, "batch_size": args.batch})
    denoiser, lora = lora_denoiser("ldmcore", args, dtype, device)
    parts = components(args.preset, denoiser)
    method = Method(config, parts)  # LoraMethod changes nothing of the step; LoRA is in place already
    opt = optimizer([p for _, p in lora])
    dataset = CachedDataset(args.cache)
    empty_text = parts.family.empty_text(to_device(dataset.empty_text(), device))  # as trainers/loop.py
    encode = args.worker == "loop-encode"
    if encode:
        vae, prompt_encoder = parts.vae, parts.prompt_encoder(data.clip_skip, data.max_windows)
        for model in (vae, *parts.text_encoders.values()):
            model.to(device, dtype)
        manifest = Manifest.load(Path(args.cache) / "scan_report.json")
        records = [manifest.records[item.record] for item in dataset.plan.items]
        pictures = [to_tensor(load_rgb(read_bytes(r.source))) for r in records]  # (3, H, W) each, decoded once
        sizes = torch.stack([dataset[i]["size"] for i in range(len(dataset))])  # (n, 6) each picture's size ids
    counter = itertools.count()

    def step() -> float:
        k = next(counter)
        idx = [(k * args.batch + j) % len(dataset) for j in range(args.batch)]
        start = time.perf_counter()
        if encode:
            with torch.no_grad():
                post = vae.encode(torch.stack([pictures[i] for i in idx]).to(device, dtype))  # (b, c, h, w)
                text = prompt_encoder([records[i].captions[0] for i in idx])  # {"hidden": (b, tokens, width), ["pooled"]}
            batch = {"mean": post.mean.float(), "std": post.std.float(), "size": sizes[idx].to(device),
                     "text": {k: v.float() for k, v in text.items()}}
        else:  # as trainers/loop.py reads a batch
            batch = to_device(collate([dataset[i] for i in idx]), device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        data_s = time.perf_counter() - start
        gens = sample_generators(0, k, torch.tensor(idx))
        with precision(device, dtype):
            loss = diffusion_loss({"denoiser": denoiser}, method, batch, parts, config, empty_text, gens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return data_s

    r = measure_steps(step, device, args.steps, args.warmup)
    data_times = sorted(r["values"][args.warmup:])
    return {"step_s": r["step_s"], "data_s": data_times[len(data_times) // 2]}


# -- the driver ------------------------------------------------------------------------------------------


def make_pictures(folder: Path, side: int) -> None:
    """Square PNGs of the training size (one bucket, so any batch stacks), each with a caption file."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side]
    for i, caption in enumerate(CAPTIONS):
        base = np.stack([(xx * (i + 1)) % 256, (yy * 2) % 256, (xx + yy) % 256], -1).astype(np.float32)
        Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)).save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text(caption)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "--preset", dest="preset", default="sd15",
                   help="a preset of ldmcore.presets (sd15, sdxl, flux-dev, ...) or flux-dev-small / flux-schnell-small")
    p.add_argument("--resolution", type=int, default=None,
                   help="picture side in pixels, for both parts (default: the preset's, SD 1.5 512, SDXL and Flux 1024)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--quantized", default=None,
                   help=f"extra ldm-tune rows with a quantised base, of {', '.join(KINDS)} (default: nf4 for Flux, "
                        "none for a U-Net; 'none' for none)")
    p.add_argument("--device", default=None)
    p.add_argument("--matmul-size", type=int, default=None, help="side of the peak-FLOP/s matmul (8192 CUDA, 2048 CPU)")
    for hidden in ("worker", "dtype", "images", "cache"):
        p.add_argument(f"--{hidden}", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.resolution = args.resolution or bench_preset(args.preset).resolution
    args.matmul_size = args.matmul_size or (8192 if args.device.startswith("cuda") else 2048)
    if args.worker:
        worker = {"peak": peak_worker, "cache": cache_worker, "loop-cache": loop_worker, "loop-encode": loop_worker}
        print(json.dumps(worker.get(args.worker, step_worker)(args)))
        return
    sys.stdout.reconfigure(line_buffering=True)  # rows appear as they are measured, also in a log file
    dtypes, differ = args.dtypes.split(","), []
    if not set(dtypes) <= {"fp32", "bf16"} or args.resolution % 64:
        raise SystemExit(f"--dtypes {args.dtypes} --resolution {args.resolution}: dtypes are fp32 and bf16 (fp16 "
                         "would need a gradient scaler, which this benchmark does not model); the side a multiple of 64")
    family = get_family(bench_preset(args.preset).family)
    if args.quantized is None:
        args.quantized = "nf4" if family.denoiser_name == "transformer" else "none"
    quantized = [] if args.quantized == "none" else args.quantized.split(",")
    if set(quantized) - set(KINDS):
        raise SystemExit(f"--quantized {args.quantized}: choose of {', '.join(KINDS)}, or none")
    stacks = [*STACKS, *(f"ldmcore-{q}" for q in quantized)]

    if args.device == "cpu":  # one worker at a time
        for d in dtypes:
            refuse_beyond_memory(host_gib_needed(args.preset, d, encoders=False), f"{args.preset} in {d}",
                                 "choose --dtypes bf16 or a smaller model (for Flux: flux-dev-small)")

    common = ["--preset", args.preset, "--resolution", str(args.resolution), "--batch", str(args.batch),
              "--rank", str(args.rank), "--device", args.device]
    mm = ["--matmul-size", str(args.matmul_size)]
    peaks = {d: spawn(__file__, ["--worker", "peak", "--dtype", d, *common, *mm], f"peak {d}") for d in dtypes}
    _, _, h, w = latent_shape(args.preset, args.batch, args.resolution)
    print(f"LoRA training step (rank {args.rank}, {', '.join(lora_targets(args.preset))}): {args.preset} "
          f"({denoiser_params(args.preset) / 1e6:.0f}M {family.denoiser_name} parameters), {args.resolution} px "
          f"({h}x{w} latents), batch {args.batch}, {peaks[dtypes[0]]['device']}")
    print(f"{'dtype':6} {'stack':13} {'step ms':>9} {'peak MiB':>9} {'weights MiB':>12} {'GFLOP':>8} {'MFU':>7} "
          f"{'first loss':>12} {'grad norm':>11}")
    for d in dtypes:
        print(f"{d:6} matmul peak {peaks[d]['flops_per_s'] / 1e12:.3f} TFLOP/s "
              f"({args.matmul_size}x{args.matmul_size}, best of {MATMUL_REPEATS})")
        rows = {s: measure(__file__, ["--worker", s, "--dtype", d, *common], args.device, args.steps, args.warmup,
                           f"{s} {d}") for s in stacks}
        for s, r in rows.items():
            flops = rows["ldmcore"]["flops"] if "-" in s else r["flops"]  # bitsandbytes' kernels are not counted
            mfu = flops / r["step_s"] / peaks[d]["flops_per_s"]
            print(f"{d:6} {stack_name(s):13} {r['step_s'] * 1e3:9.1f} {r['peak_mib']:9.0f} {r['weights_mib']:12.0f} "
                  f"{flops / 1e9:8.1f} {mfu:7.2%} {r['loss']:12.7g} {r['grad_norm']:11.5g}")
        ours, theirs = rows["ldmcore"], rows["diffusers"]
        print(f"{d:6} {'ratio':13} {ours['step_s'] / theirs['step_s']:8.3f}x {ours['peak_mib'] / theirs['peak_mib']:8.3f}x"
              "   (ldm-tune / diffusers; targets: time <= 0.8x, memory <= 0.8x)")
        rel = {k: abs(ours[k] - theirs[k]) / abs(theirs[k]) for k in ("loss", "grad_norm")}
        same_lora = (ours["lora_tensors"], ours["lora_names_crc"]) == (theirs["lora_tensors"], theirs["lora_names_crc"])
        tol = 1e-4 if d == "fp32" else 2e-2
        verdict = "agree" if same_lora and max(rel.values()) <= tol else "DIFFER: the comparison is not like for like"
        differ += [d] if verdict != "agree" else []
        print(f"{d:6} check: {ours['lora_tensors']} LoRA tensors, {'same' if same_lora else 'DIFFERENT'} names; "
              f"first step rel. diff: loss {rel['loss']:.1e}, LoRA grad norm {rel['grad_norm']:.1e} (tol {tol:g}): {verdict}")
        for s in stacks[len(STACKS):]:
            q = rows[s]
            same = (q["lora_tensors"], q["lora_names_crc"]) == (ours["lora_tensors"], ours["lora_names_crc"])
            finite = all(math.isfinite(q[k]) for k in ("loss", "grad_norm"))
            verdict = "ok" if same and finite else "FAILED"
            differ += [f"{d} {stack_name(s)}"] if verdict != "ok" else []
            print(f"{d:6} check {stack_name(s)}: {'same' if same else 'DIFFERENT'} LoRA names, loss and grad norm "
                  f"{'finite' if finite else 'NOT FINITE'} ({verdict}; loss {abs(q['loss'] - ours['loss']) / ours['loss']:.1e} "
                  f"from the unquantised base's, not compared); ratio to ldm-tune: time "
                  f"{q['step_s'] / ours['step_s']:.3f}x, peak {q['peak_mib'] / ours['peak_mib']:.3f}x, "
                  f"weights {q['weights_mib'] / ours['weights_mib']:.3f}x")

    skip = None
    if args.device == "cpu":
        skip = memory_shortfall(max(host_gib_needed(args.preset, d, encoders=True) for d in dtypes),
                                f"the denoiser beside the VAE and text encoders of {args.preset} in float32")
    if skip:
        print(f"\nLoop step, batch from the cache vs encoded every step: skipped: {skip}")
    else:
        loop_comparison(args, dtypes, common)
    if differ:
        raise SystemExit(f"the two stacks' first steps differ, or a quantised step failed, in {differ}: their timings "
                         "do not compare like for like")


def loop_comparison(args, dtypes: list[str], common: list[str]) -> None:
    """Part 2: the loop's step with the batch from the cache against one encoding it every step."""
    with tempfile.TemporaryDirectory() as tmp:
        images, cache = Path(tmp) / "pictures", Path(tmp) / "cache"
        images.mkdir()
        make_pictures(images, args.resolution)
        common = [*common, "--images", str(images), "--cache", str(cache)]
        built = spawn(__file__, ["--worker", "cache", *common], "building the cache")
        print(f"\nLoop step of ldm-tune's LoRA trainer: batch from the cache vs encoded every step "
              f"({built['images']} pictures cached in {built['seconds']:.1f} s)")
        print(f"{'dtype':6} {'batch from':40} {'step ms':>9} {'of which batch ms':>18}")
        for d in dtypes:
            run = ["--dtype", d, *common, "--steps", str(args.steps), "--warmup", str(args.warmup)]
            cached = spawn(__file__, ["--worker", "loop-cache", *run], f"loop-cache {d}")
            live = spawn(__file__, ["--worker", "loop-encode", *run], f"loop-encode {d}")
            for label, r in (("cache (CachedDataset)", cached), ("encoded every step (VAE + text encoders)", live)):
                print(f"{d:6} {label:40} {r['step_s'] * 1e3:9.1f} {r['data_s'] * 1e3:18.1f}")
            print(f"{d:6} {'ratio cache / encode':40} {cached['step_s'] / live['step_s']:8.3f}x")


if __name__ == "__main__":
    main()
