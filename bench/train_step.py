"""LoRA training-step cost of ldm-tune against diffusers + peft, and what the latent cache saves.

Part 1, the LoRA step. Two stacks on the same U-Net architecture (a preset of ldmcore.presets, SD
1.x/2.x or SDXL):
- ldm-tune: `ldmcore.UNet` with `adapters.add_lora(LoraSettings(rank=R, alpha=R, targets="attention"))`;
- diffusers: `UNet2DConditionModel` with `unet.add_adapter(peft.LoraConfig(r=R, lora_alpha=R,
  target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights="gaussian"))`, as
  diffusers' train_text_to_image_lora.py does.
Both get the same base and LoRA weights (every tensor drawn from a generator seeded by its name,
LoRA B included, so the adapters change the output from the first step; the LoRA layers are the
same, checked by their names) and then what trainers/loop.py does: the frozen base in the compute
dtype (allocated in it, so no float32 copy inflates a CPU peak), the LoRA weights in float32, and
for bf16 the step under torch.autocast. A step is: forward on fixed noisy latents, timestep 500 and the
conditioning the preset's family builds from a text encoding (bench/unet_step.py's `unet_inputs`:
random text embeddings; for SDXL also a random pooled embedding and the size ids of an uncropped
picture, given to both stacks as the same `added_cond_kwargs`), MSE loss against a fixed target,
backward, AdamW (trainers.optim.make_optimizer with the trainer's defaults) on the LoRA weights,
zero_grad. The first step's loss and LoRA gradient norm of the two stacks are compared, so that both
compute the same thing.

Reported per stack and dtype: median step time; peak memory as bench/unet_step.py measures it
(CUDA: torch's allocator peak over the timed steps, weights included; CPU: the rise of the peak
resident set over all steps, in its own process with MALLOC_MMAP_THRESHOLD_ set); the FLOPs of
one step, counted by torch.utils.flop_counter.FlopCounterMode on an actual step (matmuls,
convolutions and attention, forward and backward); and MFU = FLOPs / step time / peak FLOP/s,
where the peak is measured in the same run: the best of N timed square matmuls in that dtype.
(On CUDA, fp32 convolutions run in TF32 by default while the fp32 matmul peak does not.)
Targets, ldm-tune / diffusers: time <= 0.8x, memory <= 0.8x.

Part 2, the loop around the step (ldm-tune's stack only), from a cache built first in a temporary
folder out of synthetic PNGs, with the preset's VAE and text encoder(s) at their real sizes (SDXL:
CLIP-L and CLIP-bigG, 0.7B parameters; their cost is what the cache saves) with random weights and
a vocabulary of the caption words (`data_tools.precompute.prepare_cache` with the family's prompt
encoder, which caches {"hidden", ["pooled"]} per caption):
- cache: read the batch from `CachedDataset` as trainers/loop.py does (text dict, size ids), then
  the LoRA step of `trainers.loop.diffusion_loss` (posterior sample, noise, timesteps, schedule,
  the family's U-Net inputs) + backward + AdamW;
- encode: encode the pictures with the VAE and the captions with the text encoder(s) (in the
  compute dtype, as diffusers' scripts keep them) every step, then the same LoRA step. The
  pictures are decoded and their size ids read beforehand: DataLoader workers would hide decoding.
Reported: time per step, the part of it spent getting the batch, and cache / encode.

    python bench/train_step.py                       # GPU: SD 1.5, 512 px, batch 1, fp32 and bf16
    python bench/train_step.py --resolution 256 --steps 2 --warmup 1    # CPU (128 px: ~2 min per dtype)
    python bench/train_step.py --model sdxl --resolution 256 --steps 3 --warmup 1   # CPU, 20 min

--model (or --preset) is any trainable preset of ldmcore.presets. On a CPU the driver first checks
that the largest worker (the frozen U-Net in the dtype, plus for part 2 the VAE and text encoders in
float32) fits in the memory the host has available.

It exits non-zero when the two stacks' first steps differ. CPU timings are only a smoke test.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig
from PIL import Image
from torch.utils import flop_counter as fc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapters.lora import LoraSettings, add_lora  # noqa: E402
from bench.unet_step import (DTYPES, fill_seeded, measure, measure_steps, refuse_beyond_memory,  # noqa: E402
                              seeded_model, spawn, unet_inputs, unet_params)
from data_tools.config import DataConfig  # noqa: E402
from data_tools.dataset import CachedDataset  # noqa: E402
from data_tools.images import load_rgb, read_bytes  # noqa: E402
from data_tools.precompute import prepare_cache  # noqa: E402
from data_tools.records import Manifest  # noqa: E402
from data_tools.transforms import to_tensor  # noqa: E402
from ldmcore.checkpoints import Components, _new_text_encoder, second_tokenizer  # noqa: E402
from ldmcore.family import get_family  # noqa: E402
from ldmcore.presets import get_preset  # noqa: E402
from ldmcore.schedule import NoiseSchedule  # noqa: E402
from ldmcore.text import build_word_tokenizer  # noqa: E402
from ldmcore.vae import AutoencoderKL  # noqa: E402
from trainers.batch import collate, to_device  # noqa: E402
from trainers.config import Config, TrainConfig  # noqa: E402
from trainers.loop import diffusion_loss, sample_generators  # noqa: E402
from trainers.method import Method  # noqa: E402
from trainers.optim import make_optimizer  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # adapters.lora.UNET_TARGETS["attention"]
CAPTIONS = ["a photo of a red cube", "a green sphere on a table", "a blue cone in the snow", "a yellow ring"]
MATMUL_REPEATS = 10
STACKS = {"diffusers": "diffusers", "ldmcore": "ldm-tune"}  # worker name -> printed name


# -- what both parts build ---------------------------------------------------------------------------


def lora_unet(stack: str, args, dtype, device):
    """The U-Net of `stack` with LoRA on every attention projection, weights seeded by name; the base
    in `dtype`, the LoRA weights in float32 (as trainers/loop.py)."""
    unet, cfg = seeded_model(stack, args.preset, device, dtype)
    if stack == "ldmcore":
        add_lora(unet, LoraSettings(rank=args.rank, alpha=args.rank, targets="attention"))
    else:
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TARGETS, init_lora_weights="gaussian"))
    lora = [(name, p) for name, p in unet.named_parameters() if p.requires_grad]
    for p in unet.parameters():
        p.data = p.data.to(torch.float32 if p.requires_grad else dtype)
    fill_seeded(lora)  # in float32, after the cast
    return unet.train(), cfg, lora


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


def components(preset_name: str, unet=None) -> Components:
    """The preset's VAE, schedule and text encoder(s) as its family has them (SDXL: CLIP-L and
    CLIP-bigG, the second tokenizer padding with "!"), at the preset's sizes but with a vocabulary of
    the caption words, random weights from seed 0: the cache builder and the encoding loop get the
    same ones. `unet`: the U-Net the loop trains (None to build the cache)."""
    preset = get_preset(preset_name)
    family = get_family(preset.family)
    tokenizer = build_word_tokenizer(" ".join(CAPTIONS).split())
    tokenizers = {"tokenizer": tokenizer, "tokenizer_2": second_tokenizer(tokenizer)}
    configs = {"text_encoder": preset.text_encoder, "text_encoder_2": preset.text_encoder_2}
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(dict(preset.vae)).eval()
    texts = {name: _new_text_encoder(kind, configs[name], tokenizers[tok]) for name, tok, kind in family.text_parts}
    return Components(unet, vae, texts.get("text_encoder"), tokenizer, NoiseSchedule.from_config(preset.scheduler),
                      text_kind=preset.text_kind, text_encoder_2=texts.get("text_encoder_2"),
                      tokenizer_2=tokenizers["tokenizer_2"] if "text_encoder_2" in texts else None, family=family)


def host_gib_needed(preset_name: str, dtype: str) -> float:
    """GiB of the largest worker's weights: part 1's frozen U-Net in `dtype`, or part 2's with the
    VAE and text encoders beside it in float32 (encoding every step casts them, once, to `dtype`)."""
    size = torch.empty((), dtype=getattr(torch, DTYPES[dtype])).element_size()
    with torch.device("meta"):
        aux = sum(p.numel() for m in components(preset_name).models[1:] for p in m.parameters())
    return (unet_params(preset_name) * size + 4 * aux) / 2**30


# -- workers, one process each -------------------------------------------------------------------------


def step_worker(args) -> dict:
    """Part 1: one stack's LoRA step on fixed inputs."""
    device, dtype = torch.device(args.device), getattr(torch, DTYPES[args.dtype])
    unet, cfg, lora = lora_unet(args.worker, args, dtype, device)
    params = [p for _, p in lora]
    opt = optimizer(params)
    side = args.resolution // 8
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, cfg["in_channels"], side, side, generator=g).to(device)  # (b, 4, h, w)
    # encoder_hidden_states (b, 77, width); SDXL: added_cond_kwargs {"text_embeds": (b, 1280), "time_ids": (b, 6)}
    inputs = unet_inputs(args.preset, args.batch, args.resolution, g, device, torch.float32)
    target = torch.randn(x.shape, generator=g).to(device)
    t = torch.full((args.batch,), 500, device=device)
    first = {}

    def step():
        with precision(device, dtype):
            out = unet(x, t, **inputs)
            out = out if isinstance(out, torch.Tensor) else out.sample
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
            "lora_tensors": len(lora), "lora_names_crc": zlib.crc32(names.encode())}


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
    unet, _, lora = lora_unet("ldmcore", args, dtype, device)
    parts = components(args.preset, unet)
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
                post = vae.encode(torch.stack([pictures[i] for i in idx]).to(device, dtype))  # (b, 4, h, w)
                text = prompt_encoder([records[i].captions[0] for i in idx])  # {"hidden": (b, 77, width), ["pooled"]}
            batch = {"mean": post.mean.float(), "std": post.std.float(), "size": sizes[idx].to(device),
                     "text": {k: v.float() for k, v in text.items()}}
        else:  # as trainers/loop.py reads a batch
            batch = to_device(collate([dataset[i] for i in idx]), device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        data_s = time.perf_counter() - start
        gens = sample_generators(0, k, torch.tensor(idx))
        with precision(device, dtype):
            loss = diffusion_loss({"denoiser": unet}, method, batch, parts, config, empty_text, gens)
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
                   help="a preset of ldmcore.presets (sd15, sdxl, ...)")
    p.add_argument("--resolution", type=int, default=512, help="picture side in pixels, for both parts")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--device", default=None)
    p.add_argument("--matmul-size", type=int, default=None, help="side of the peak-FLOP/s matmul (8192 CUDA, 2048 CPU)")
    for hidden in ("worker", "dtype", "images", "cache"):
        p.add_argument(f"--{hidden}", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.matmul_size = args.matmul_size or (8192 if args.device.startswith("cuda") else 2048)
    workers = {"diffusers": step_worker, "ldmcore": step_worker, "peak": peak_worker, "cache": cache_worker,
               "loop-cache": loop_worker, "loop-encode": loop_worker}
    if args.worker:
        print(json.dumps(workers[args.worker](args)))
        return
    sys.stdout.reconfigure(line_buffering=True)  # rows appear as they are measured, also in a log file
    dtypes, differ = args.dtypes.split(","), []
    if not set(dtypes) <= {"fp32", "bf16"} or args.resolution % 64:
        raise SystemExit(f"--dtypes {args.dtypes} --resolution {args.resolution}: dtypes are fp32 and bf16 (fp16 "
                         "would need a gradient scaler, which this benchmark does not model); the side a multiple of 64")

    if args.device == "cpu":  # one worker at a time
        for d in dtypes:
            refuse_beyond_memory(host_gib_needed(args.preset, d), f"{args.preset} in {d}",
                                 "choose --dtypes bf16 or a smaller model")

    common = ["--preset", args.preset, "--resolution", str(args.resolution), "--batch", str(args.batch),
              "--rank", str(args.rank), "--device", args.device]
    mm = ["--matmul-size", str(args.matmul_size)]
    peaks = {d: spawn(__file__, ["--worker", "peak", "--dtype", d, *common, *mm], f"peak {d}") for d in dtypes}
    print(f"LoRA training step (rank {args.rank}, attention): {args.preset} ({unet_params(args.preset) / 1e6:.0f}M "
          f"U-Net parameters), {args.resolution} px ({args.resolution // 8}x{args.resolution // 8} latents), "
          f"batch {args.batch}, {peaks[dtypes[0]]['device']}")
    print(f"{'dtype':6} {'stack':10} {'step ms':>9} {'peak MiB':>9} {'GFLOP':>8} {'MFU':>7} {'first loss':>12} {'grad norm':>11}")
    for d in dtypes:
        print(f"{d:6} matmul peak {peaks[d]['flops_per_s'] / 1e12:.3f} TFLOP/s "
              f"({args.matmul_size}x{args.matmul_size}, best of {MATMUL_REPEATS})")
        rows = {s: measure(__file__, ["--worker", s, "--dtype", d, *common], args.device, args.steps, args.warmup,
                           f"{s} {d}") for s in STACKS}
        for s, r in rows.items():
            mfu = r["flops"] / r["step_s"] / peaks[d]["flops_per_s"]
            print(f"{d:6} {STACKS[s]:10} {r['step_s'] * 1e3:9.1f} {r['peak_mib']:9.0f} {r['flops'] / 1e9:8.1f} "
                  f"{mfu:7.2%} {r['loss']:12.7g} {r['grad_norm']:11.5g}")
        ours, theirs = rows["ldmcore"], rows["diffusers"]
        print(f"{d:6} {'ratio':10} {ours['step_s'] / theirs['step_s']:8.3f}x {ours['peak_mib'] / theirs['peak_mib']:8.3f}x"
              "   (ldm-tune / diffusers; targets: time <= 0.8x, memory <= 0.8x)")
        rel = {k: abs(ours[k] - theirs[k]) / abs(theirs[k]) for k in ("loss", "grad_norm")}
        same_lora = (ours["lora_tensors"], ours["lora_names_crc"]) == (theirs["lora_tensors"], theirs["lora_names_crc"])
        tol = 1e-4 if d == "fp32" else 2e-2
        verdict = "agree" if same_lora and max(rel.values()) <= tol else "DIFFER: the comparison is not like for like"
        differ += [d] if verdict != "agree" else []
        print(f"{d:6} check: {ours['lora_tensors']} LoRA tensors, {'same' if same_lora else 'DIFFERENT'} names; "
              f"first step rel. diff: loss {rel['loss']:.1e}, LoRA grad norm {rel['grad_norm']:.1e} (tol {tol:g}): {verdict}")

    with tempfile.TemporaryDirectory() as tmp:
        images, cache = Path(tmp) / "pictures", Path(tmp) / "cache"
        images.mkdir()
        make_pictures(images, args.resolution)
        common += ["--images", str(images), "--cache", str(cache)]
        built = spawn(__file__, ["--worker", "cache", *common], "building the cache")
        print(f"\nLoop step of ldm-tune's LoRA trainer: batch from the cache vs encoded every step "
              f"({built['images']} pictures cached in {built['seconds']:.1f} s)")
        print(f"{'dtype':6} {'batch from':34} {'step ms':>9} {'of which batch ms':>18}")
        for d in dtypes:
            run = ["--dtype", d, *common, "--steps", str(args.steps), "--warmup", str(args.warmup)]
            cached = spawn(__file__, ["--worker", "loop-cache", *run], f"loop-cache {d}")
            live = spawn(__file__, ["--worker", "loop-encode", *run], f"loop-encode {d}")
            for label, r in (("cache (CachedDataset)", cached), ("encoded every step (VAE + CLIP)", live)):
                print(f"{d:6} {label:34} {r['step_s'] * 1e3:9.1f} {r['data_s'] * 1e3:18.1f}")
            print(f"{d:6} {'ratio cache / encode':34} {cached['step_s'] / live['step_s']:8.3f}x")
    if differ:
        raise SystemExit(f"the two stacks' first steps differ in {differ}: their timings do not compare like for like")


if __name__ == "__main__":
    main()
