"""Training-step time and peak memory of ldmcore.UNet against diffusers' UNet2DConditionModel.

Both models get the same weights (seeded per parameter name) and the same inputs; a step is the
forward pass, an MSE loss against a fixed target and the backward pass into every parameter.
Each (implementation, dtype) pair runs in its own subprocess so that memory peaks stay apart.
The conditioning is what the model's family builds from a text encoding (`family.denoiser_inputs`):
random text embeddings (b, 77, cross_attention_dim); for SDXL also a random pooled embedding
(b, 1280) and the size ids of an uncropped picture of the benchmark's side, (b, 6), passed to both
as `added_cond_kwargs`. The two first steps' loss, output norm and gradient norm are compared
(the run fails where they differ).

    python bench/unet_step.py                       # SD 1.5 at 512 px, batch 1, fp32 and bf16
    python bench/unet_step.py --resolution 256 --steps 3
    python bench/unet_step.py --model sdxl --resolution 256 --grads input --steps 3 --warmup 1   # CPU, 9 min

--model (or --preset) is any name of ldmcore.presets. On a CPU the driver first checks that the
weights (and with --grads all their gradients) fit in the memory the host has available: SDXL's
U-Net is 2.6B parameters, 9.6 GiB in float32.

Memory: on CUDA the peak of torch's allocator over the timed steps (weights included); on CPU the
rise of the process's peak resident memory over all steps above what it held before the first
(weights excluded, since the two processes import different libraries; large allocations go
through mmap so that freed tensors leave the resident set). Targets: step time <= 0.8x, memory <= 0.9x.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
KEEP_FREE_GIB = 2.0  # of the host's available memory, never planned for (the machine is shared)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def fill_seeded(named_tensors) -> None:
    """Fill every (name, tensor) with N(0, 0.02^2) drawn from a generator seeded by the name, so
    that two models holding a tensor of the same name get the same values."""
    import torch

    with torch.no_grad():
        for name, t in named_tensors:
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            t.copy_(torch.randn(t.shape, generator=g) * 0.02)


def build(impl: str, preset: str, dtype, device):
    # allocated in `dtype` directly: a float32 copy cast afterwards would set the process's peak
    model, cfg = seeded_model(impl, preset, device, dtype)
    return model.train(), cfg


def seeded_model(impl: str, preset: str, device, dtype=None):
    """The U-Net of `impl` ("ldmcore" or "diffusers") for `preset`, on `device`, weights seeded by
    name. Given a `dtype`, allocated in it: the values of seeding in float32 and casting, without
    ever holding the float32 copy (whose peak a CPU memory measurement would see)."""
    import torch

    from ldmcore.presets import get_preset

    cfg = dict(get_preset(preset).denoiser)
    with torch.device("meta"):
        if impl == "ldmcore":
            from ldmcore.unet import UNet

            model = UNet.from_config(cfg)
        else:
            from diffusers import UNet2DConditionModel

            model = UNet2DConditionModel(**cfg)
    if dtype is not None:
        model.to(dtype)
    model.to_empty(device=device)
    fill_seeded(model.state_dict().items())
    return model, cfg


def unet_inputs(preset: str, batch: int, resolution: int, generator, device, dtype) -> dict:
    """The U-Net's keyword inputs beyond (sample, timestep), the same for both implementations, as the
    preset's family builds them from a text encoding: random text embeddings; where the family
    conditions on a pooled embedding and size ids (SDXL), a random pooled embedding and the ids of
    an uncropped `resolution` px picture (`added_cond_kwargs`)."""
    import torch

    from ldmcore.family import get_family
    from ldmcore.presets import get_preset

    p = get_preset(preset)
    family = get_family(p.family)
    text = {"hidden": torch.randn(batch, 77, p.denoiser["cross_attention_dim"], generator=generator)}  # (b, 77, width)
    ids = family.generation_ids(resolution, resolution)  # SDXL: (6,) original size, crop, target size; SD: None
    if ids is not None:
        text["pooled"] = torch.randn(batch, p.text_encoder_2["projection_dim"], generator=generator)  # (b, 1280)
        ids = ids.expand(batch, -1)  # (b, 6)
    return family.denoiser_inputs({k: v.to(device, dtype) for k, v in text.items()}, ids)


def unet_params(preset: str) -> int:
    """Parameters of the preset's U-Net, counted on the meta device."""
    import torch

    from ldmcore.presets import get_preset
    from ldmcore.unet import UNet

    with torch.device("meta"):
        return sum(p.numel() for p in UNet.from_config(dict(get_preset(preset).denoiser)).parameters())


def mem_available_gib() -> float:
    return _meminfo_kib("MemAvailable") / 2**20


def _meminfo_kib(field: str) -> int:
    line = next(s for s in Path("/proc/meminfo").read_text().splitlines() if s.startswith(field + ":"))
    return int(line.split()[1])


def refuse_beyond_memory(need_gib: float, what: str, hint: str) -> None:
    """On a CPU the benchmark shares the host's memory: stop before starting a worker that needs more
    than is available (less KEEP_FREE_GIB), rather than let the kernel kill it or its neighbours."""
    available = mem_available_gib()
    if need_gib > available - KEEP_FREE_GIB:
        raise SystemExit(f"{what} needs at least {need_gib:.1f} GiB, and this host has {available:.1f} GiB "
                         f"available ({KEEP_FREE_GIB:g} kept free); {hint}")


def worker(args) -> dict:
    import torch

    device = torch.device(args.device)
    dtype = getattr(torch, DTYPES[args.dtype])
    torch.manual_seed(0)
    model, cfg = build(args.worker, args.preset, dtype, device)
    side = args.resolution // 8
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, cfg["in_channels"], side, side, generator=g).to(device, dtype)
    if args.grads == "input":  # a frozen base, as under LoRA or ControlNet: backprop through, no weight grads
        model.requires_grad_(False)
        x.requires_grad_(True)
    # encoder_hidden_states (b, 77, width); SDXL: added_cond_kwargs {"text_embeds": (b, 1280), "time_ids": (b, 6)}
    inputs = unet_inputs(args.preset, args.batch, args.resolution, g, device, dtype)
    target = torch.randn(x.shape, generator=g).to(device, dtype)
    t = torch.full((args.batch,), 500, device=device)

    first = {}

    def step():
        model.zero_grad(set_to_none=True)
        x.grad = None
        out = model(x, t, **inputs)
        out = out if isinstance(out, torch.Tensor) else out.sample
        loss = torch.nn.functional.mse_loss(out.float(), target.float())
        loss.backward()
        if not first:  # the check of the two implementations: with small random weights the loss is
            # mostly the target's, so the output and the gradients are compared too
            grads = [x.grad] if args.grads == "input" else [p.grad for p in model.parameters()]
            first.update(out_norm=out.float().norm().item(),
                         grad_norm=torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])).item())
        return loss.item()

    r = measure_steps(step, device, args.steps, args.warmup)
    loss = r["values"][max(args.warmup - 1, 0)]  # the last warm-up step's (every step computes the same)
    return {"step_s": r["step_s"], "peak_mib": r["peak_mib"], "loss": loss, **first}


def measure_steps(step, device, steps: int, warmup: int) -> dict:
    """Call `step` `warmup` times, then `steps` times timed. Returns the median time of the timed
    calls, the peak memory in MiB and the value of every call, in order. The peak, on CUDA: torch's
    allocator over the timed calls; on CPU: the rise of the peak resident set over all calls above
    the resident set before the first (the kernel's peak counter cannot be reset in every container)."""
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    base = _rss_kib("VmRSS")
    values = [step() for _ in range(warmup)]
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        values.append(step())
        sync()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = (_rss_kib("VmHWM") - base) / 1024
    times.sort()
    return {"step_s": times[len(times) // 2], "peak_mib": peak, "values": values}


MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def spawn(script: str, argv: list[str], label: str, env: dict | None = None) -> dict:
    """Run `script argv` in a fresh Python and return the JSON its worker printed last."""
    cmd = [sys.executable, script, *argv]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    if out.returncode != 0:
        raise SystemExit(f"{label} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(script: str, argv: list[str], device: str, steps: int, warmup: int, label: str) -> dict:
    """A worker's timing run; on CPU its peak memory comes from a second run of one step."""
    result = spawn(script, [*argv, "--steps", str(steps), "--warmup", str(warmup)], label)
    if device == "cpu":
        # A second process for memory: large blocks through mmap, so that freed tensors leave the
        # resident set and its peak measures live memory rather than what glibc keeps cached. The
        # page faults this causes would distort the timing, hence two runs.
        result["peak_mib"] = spawn(script, [*argv, "--steps", "1", "--warmup", "1"], label, MEMORY_ENV)["peak_mib"]
    return result


def run_worker(impl: str, dtype: str, args) -> dict:
    argv = ["--worker", impl, "--dtype", dtype]
    for key in ("preset", "resolution", "batch", "device", "grads"):
        argv += [f"--{key}", str(getattr(args, key))]
    return measure(__file__, argv, args.device, args.steps, args.warmup, f"{impl} {dtype}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "--preset", dest="preset", default="sd15",
                   help="a preset of ldmcore.presets (sd15, sdxl, ...)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument(
        "--grads",
        default="all",
        choices=["all", "input"],
        help="all: every weight gets a gradient (full fine-tune); input: frozen weights, backprop to the input (LoRA-like)",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        print(json.dumps(worker(args)))
        return

    device_name = args.device
    if args.device == "cuda":
        import torch

        device_name = torch.cuda.get_device_name()
    params = unet_params(args.preset)
    print(
        f"UNet training step: {args.preset} ({params / 1e6:.0f}M U-Net parameters), {args.resolution} px "
        f"({args.resolution // 8}x{args.resolution // 8} latents), batch {args.batch}, grads={args.grads}, "
        f"{device_name}"
    )
    if args.device == "cpu":  # one worker at a time: the weights, and with every weight training their gradients
        import torch

        for dtype in args.dtypes.split(","):
            size = torch.empty((), dtype=getattr(torch, DTYPES[dtype])).element_size()
            refuse_beyond_memory(params * size * (2 if args.grads == "all" else 1) / 2**30,
                                 f"{args.preset} in {dtype} with --grads {args.grads}",
                                 "choose --dtypes bf16, --grads input or a smaller model")
    print(f"{'dtype':6} {'impl':10} {'step ms':>9} {'peak MiB':>9} {'loss':>12}")
    differ = []
    for dtype in args.dtypes.split(","):
        rows = {impl: run_worker(impl, dtype, args) for impl in ("diffusers", "ldmcore")}
        for impl, r in rows.items():
            print(f"{dtype:6} {impl:10} {r['step_s'] * 1e3:9.1f} {r['peak_mib']:9.0f} {r['loss']:12.6g}")
        d, o = rows["diffusers"], rows["ldmcore"]
        print(
            f"{dtype:6} {'ratio':10} {o['step_s'] / d['step_s']:9.3f}x {o['peak_mib'] / max(d['peak_mib'], 1e-9):8.3f}x"
            f"   (targets: time <= 0.8x, memory <= 0.9x)"
        )
        rel = {k: abs(o[k] - d[k]) / abs(d[k]) for k in ("loss", "out_norm", "grad_norm")}
        tol = 1e-4 if dtype == "fp32" else 2e-2
        verdict = "agree" if max(rel.values()) <= tol else "DIFFER: the comparison is not like for like"
        differ += [dtype] if max(rel.values()) > tol else []
        grads = "input" if args.grads == "input" else "weight"
        print(f"{dtype:6} check: first step rel. diff: loss {rel['loss']:.1e}, output norm {rel['out_norm']:.1e}, "
              f"{grads} grad norm {rel['grad_norm']:.1e} (tol {tol:g}): {verdict}")
    if differ:
        raise SystemExit(f"the two implementations' losses differ in {differ}: their timings do not compare")


if __name__ == "__main__":
    main()
