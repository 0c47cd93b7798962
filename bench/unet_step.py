"""Training-step time and peak memory of ldmcore's denoiser against diffusers' on the same weights:
ldmcore.UNet against UNet2DConditionModel, or for Flux ldmcore.flux.FluxTransformer against
FluxTransformer2DModel (the family names both classes).

Both models get the same weights (seeded per parameter name) and the same inputs; a step is the
forward pass, an MSE loss against a fixed target and the backward pass into every parameter.
Each (implementation, dtype) pair runs in its own subprocess so that memory peaks stay apart.
The conditioning is what the model's family builds from a text encoding (`family.denoiser_inputs`):
random text embeddings (b, 77, cross_attention_dim); for SDXL also a random pooled embedding
(b, 1280) and the size ids of an uncropped picture of the benchmark's side, (b, 6), passed to both
as `added_cond_kwargs`; for Flux random T5 states (b, max_sequence_length, joint_attention_dim),
a pooled CLIP embedding (b, pooled_projection_dim) and, for FLUX.1-dev, the training guidance 1.0.
The timestep is the middle of the schedule (500; Flux: sigma 0.5). diffusers' Flux transformer is
called as FluxPipeline calls it (packed latents, position ids; `call_denoiser`). The two first
steps' loss, output norm and gradient norm are compared (the run fails where they differ).

    python bench/unet_step.py                       # SD 1.5 at 512 px, batch 1, fp32 and bf16
    python bench/unet_step.py --resolution 256 --steps 3
    python bench/unet_step.py --model sdxl --resolution 256 --grads input --steps 3 --warmup 1   # CPU, 9 min

--model (or --preset) is any name of ldmcore.presets, or a scaled-down config of `SCALED`
("flux-dev-small": FLUX.1-dev's real widths, 3072 hidden = 24 heads x 128, joint 4096, pooled 768,
with 2 double-stream + 4 single-stream blocks instead of 19 + 38: 1.31B parameters, so that per-block
time and memory are real on a CPU). On a CPU the driver first checks that the weights (and with
--grads all their gradients) fit in the memory the host has available: SDXL's U-Net is 2.6B
parameters, 9.6 GiB in float32; Flux.1's transformer 11.9B, 22 GiB in bf16.

Memory: on CUDA the peak of torch's allocator over the timed steps (weights included); on CPU the
rise of the process's peak resident memory over all steps above what it held before the first
(weights excluded, since the two processes import different libraries; large allocations go
through mmap so that freed tensors leave the resident set). Targets: step time <= 0.8x, memory <= 0.9x.
"""
from __future__ import annotations

import argparse
import dataclasses
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
# Scaled-down configs for a CPU: a preset's widths with fewer (double-stream, single-stream) blocks, in
# Flux.1's 1:2 ratio, so that per-block figures are those of the real model
SCALED = {"flux-dev-small": ("flux-dev", (2, 4)), "flux-schnell-small": ("flux-schnell", (2, 4))}
# LoRA on the attention projections, as peft's target_modules for diffusers' stack, by the family's
# denoiser; ldm-tune's stack takes the trainer's own `targets="attention"`, and the benches check that
# both wrap the same modules
LORA_TARGETS = {
    "unet": ("to_q", "to_k", "to_v", "to_out.0"),  # = adapters.lora.UNET_TARGETS["attention"]
    # Flux: both streams' q, k, v and outputs in the double-stream blocks, q, k, v in the single-stream ones
    # (diffusers' train_dreambooth_lora_flux.py's attention modules; adapters.lora.FLUX_TARGETS["attention"])
    "transformer": ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
}


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


def bench_preset(preset):
    """A Preset: `preset` itself, a name of ldmcore.presets, or a name of SCALED."""
    from ldmcore.presets import get_preset

    if not isinstance(preset, str):
        return preset
    base, blocks = SCALED.get(preset, (preset, None))
    return with_blocks(get_preset(base), *blocks) if blocks else get_preset(base)


def with_blocks(preset, double: int, single: int):
    """A Flux preset with its widths and `double` double-stream + `single` single-stream blocks."""
    if "num_single_layers" not in preset.denoiser:
        raise SystemExit(f"block counts apply to Flux transformers, not to a {preset.family} U-Net")
    return dataclasses.replace(preset, denoiser={**preset.denoiser, "num_layers": double, "num_single_layers": single})


def family_of(preset):
    from ldmcore.family import get_family

    return get_family(bench_preset(preset).family)


def build(impl: str, preset: str, dtype, device):
    # allocated in `dtype` directly: a float32 copy cast afterwards would set the process's peak
    model, cfg = seeded_model(impl, preset, device, dtype)
    return model.train(), cfg


def seeded_model(impl: str, preset, device, dtype=None):
    """The denoiser of `impl` ("ldmcore" or "diffusers") for `preset`, on `device`, weights seeded by
    name: the family's class (ldmcore.UNet or ldmcore.flux.FluxTransformer) or the diffusers class its
    config names (UNet2DConditionModel, FluxTransformer2DModel). Given a `dtype`, allocated in it: the
    values of seeding in float32 and casting, without ever holding the float32 copy (whose peak a CPU
    memory measurement would see)."""
    import torch

    cfg = dict(bench_preset(preset).denoiser)
    cls = family_of(preset).denoiser_class()
    with torch.device("meta"):
        if impl == "ldmcore":
            model = cls.from_config(cfg)
        else:
            import diffusers

            model = getattr(diffusers, cls.config_class._class_name)(**cfg)
    if dtype is not None:
        model.to(dtype)
    model.to_empty(device=device)
    fill_seeded(model.state_dict().items())
    return model, cfg


def seeded_lora_model(impl: str, preset, rank: int, device, dtype, quantization: str | None = None):
    """`seeded_model` with LoRA of `rank` (alpha = rank) on the attention projections, set up as trainers/loop.py
    sets up a LoRA run: the base frozen in `dtype`, with `quantization` ("nf4", "int8") its Linear
    layers swapped for bitsandbytes' (ldmcore.quantize, before LoRA wraps them, quantised when the
    model moves to the device); the LoRA weights in float32, seeded by name after the cast (B too, so
    the adapters change the output from the first step). ldmcore: `adapters.add_lora` with the
    trainer's default targets, "attention"; diffusers: `add_adapter(peft.LoraConfig(target_modules=
    LORA_TARGETS[...]))`, as diffusers' LoRA scripts. Returns the model (in training mode) and its LoRA
    parameters as (name, parameter) pairs."""
    import torch

    from ldmcore.quantize import is_quantized, quantize_linears

    model, _ = seeded_model(impl, preset, device, dtype)
    model.requires_grad_(False)
    if quantization:
        quantize_linears(model, quantization, compute_dtype=dtype)
    if impl == "ldmcore":
        from adapters.lora import LoraSettings, add_lora

        add_lora(model, LoraSettings(rank=rank, alpha=rank, targets="attention"))
    else:
        from peft import LoraConfig

        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(lora_targets(preset)),
                                     init_lora_weights="gaussian"))
    model.to(device)  # (bitsandbytes quantises a quantised base here)
    lora = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    for p in model.parameters():
        if not is_quantized(p):
            p.data = p.data.to(torch.float32 if p.requires_grad else dtype)
    fill_seeded(lora)  # in float32, after the cast
    return model.train(), lora


def lora_targets(preset) -> tuple[str, ...]:
    """The module-name suffixes diffusers' stack gives peft (`LORA_TARGETS` of the family's denoiser)."""
    return LORA_TARGETS[family_of(preset).denoiser_name]


def latent_shape(preset, batch: int, resolution: int) -> tuple[int, int, int, int]:
    """(b, c, h, w) of the latents of a square `resolution` px picture: the VAE's channels and factor."""
    vae = bench_preset(preset).vae
    side = resolution // 2 ** (len(vae["block_out_channels"]) - 1)
    return batch, vae["latent_channels"], side, side


def bench_timestep(preset, batch: int, device):
    """(b,) the middle of the training schedule on the model's scale: 500 (discrete), sigma 0.5 (flow)."""
    import torch

    schedule = family_of(preset).schedule_class().from_config(bench_preset(preset).scheduler)
    return torch.full((batch,), schedule.fixed_timestep(schedule.num_train_timesteps // 2), device=device)


def text_shapes(preset) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes of the text conditioning the family's prompt encoder makes: {"hidden": (tokens,
    width)} and, where the family conditions on a pooled embedding, "pooled": (width,)."""
    p, family = bench_preset(preset), family_of(preset)
    if family.denoiser_name == "transformer":  # Flux: T5's padded states, CLIP-L's pooled output
        return {"hidden": (family.max_sequence_length, p.denoiser["joint_attention_dim"]),
                "pooled": (p.denoiser["pooled_projection_dim"],)}
    shapes = {"hidden": (77, p.denoiser["cross_attention_dim"])}
    if family.generation_ids(64, 64) is not None:  # SDXL: size ids beside bigG's pooled projection
        shapes["pooled"] = (p.text_encoder_2["projection_dim"],)
    return shapes


def denoiser_inputs(preset, batch: int, resolution: int, generator, device, dtype) -> dict:
    """The denoiser's keyword inputs beyond (sample, timestep), the same for both implementations, as
    the preset's family builds them from a text encoding (`text_shapes`, random values): SD: the text
    states; SDXL: also the pooled embedding and the ids of an uncropped `resolution` px picture
    (`added_cond_kwargs`); Flux: T5 states, the pooled embedding and, for dev, the training guidance."""
    import torch

    family = family_of(preset)
    text = {k: torch.randn(batch, *shape, generator=generator) for k, shape in text_shapes(preset).items()}
    ids = family.generation_ids(resolution, resolution)  # SDXL: (6,) original size, crop, target size; else None
    ids = None if ids is None else ids.expand(batch, -1)  # (b, 6)
    return family.denoiser_inputs({k: v.to(device, dtype) for k, v in text.items()}, ids)


def call_denoiser(model, sample, timestep, inputs: dict):
    """The output (b, c, h, w) of either implementation on unpacked latents and the family's inputs.
    ldmcore's denoisers take them as they are; diffusers' U-Net returns an output object; diffusers'
    Flux transformer takes packed latents and position ids, passed as FluxPipeline passes them."""
    import torch

    if type(model).__name__ == "FluxTransformer2DModel":
        from diffusers import FluxPipeline

        b, c, h, w = sample.shape
        packed = FluxPipeline._pack_latents(sample, b, c, h, w)  # (b, h/2 * w/2, 4c)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, sample.device, sample.dtype)  # (n, 3)
        n_txt = inputs["encoder_hidden_states"].shape[1]
        txt_ids = torch.zeros(n_txt, 3, device=sample.device, dtype=sample.dtype)
        out = model(hidden_states=packed, timestep=timestep, img_ids=img_ids, txt_ids=txt_ids, return_dict=False,
                    **inputs)[0]
        return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)  # (b, c, h, w): a VAE factor 8 for h, w
    out = model(sample, timestep, **inputs)
    return out if isinstance(out, torch.Tensor) else out.sample


def denoiser_params(preset) -> int:
    """Parameters of the preset's denoiser, counted on the meta device."""
    import torch

    with torch.device("meta"):
        model = family_of(preset).denoiser_class().from_config(dict(bench_preset(preset).denoiser))
    return sum(p.numel() for p in model.parameters())


def mem_available_gib() -> float:
    return _meminfo_kib("MemAvailable") / 2**20


def _meminfo_kib(field: str) -> int:
    line = next(s for s in Path("/proc/meminfo").read_text().splitlines() if s.startswith(field + ":"))
    return int(line.split()[1])


def memory_shortfall(need_gib: float, what: str) -> str | None:
    """Why a worker needing `need_gib` must not start on this host (None: it fits): the host's
    available memory, less KEEP_FREE_GIB, is short of it."""
    available = mem_available_gib()
    if need_gib > available - KEEP_FREE_GIB:
        return (f"{what} needs at least {need_gib:.1f} GiB, and this host has {available:.1f} GiB available "
                f"({KEEP_FREE_GIB:g} kept free)")
    return None


def refuse_beyond_memory(need_gib: float, what: str, hint: str) -> None:
    """On a CPU the benchmark shares the host's memory: stop before starting a worker that needs more
    than is available (less KEEP_FREE_GIB), rather than let the kernel kill it or its neighbours."""
    reason = memory_shortfall(need_gib, what)
    if reason:
        raise SystemExit(f"{reason}; {hint}")


def worker(args) -> dict:
    import torch

    device = torch.device(args.device)
    dtype = getattr(torch, DTYPES[args.dtype])
    torch.manual_seed(0)
    model, _ = build(args.worker, args.preset, dtype, device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(latent_shape(args.preset, args.batch, args.resolution), generator=g).to(device, dtype)
    if args.grads == "input":  # a frozen base, as under LoRA or ControlNet: backprop through, no weight grads
        model.requires_grad_(False)
        x.requires_grad_(True)
    # encoder_hidden_states (b, 77, width); SDXL: added_cond_kwargs {"text_embeds": (b, 1280), "time_ids": (b, 6)};
    # Flux: encoder_hidden_states (b, 512, 4096), pooled_projections (b, 768), guidance (b,)
    inputs = denoiser_inputs(args.preset, args.batch, args.resolution, g, device, dtype)
    target = torch.randn(x.shape, generator=g).to(device, dtype)
    t = bench_timestep(args.preset, args.batch, device)  # (b,) 500, or sigma 0.5

    first = {}

    def step():
        model.zero_grad(set_to_none=True)
        x.grad = None
        out = call_denoiser(model, x, t, inputs)
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
    the resident set before the first. The kernel's peak counter is reset to the resident set there
    (/proc/self/clear_refs), so that a higher peak while the model was built (a quantised base's
    full-precision weights, seeding's float32 temporaries) is not taken for the steps'; where a
    container does not allow that, the peak is the process's, and only a peak above the build's shows."""
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    base = _rss_kib("VmRSS")
    if device.type == "cpu":
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        except OSError:
            pass
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
                   help="a preset of ldmcore.presets (sd15, sdxl, flux-dev, ...) or of SCALED (flux-dev-small)")
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
    params = denoiser_params(args.preset)
    _, _, h, w = latent_shape(args.preset, args.batch, args.resolution)
    print(
        f"Denoiser training step: {args.preset} ({params / 1e6:.0f}M parameters), {args.resolution} px "
        f"({h}x{w} latents), batch {args.batch}, grads={args.grads}, {device_name}"
    )
    if args.device == "cpu":  # one worker at a time: the weights, and with every weight training their gradients
        import torch

        for dtype in args.dtypes.split(","):
            size = torch.empty((), dtype=getattr(torch, DTYPES[dtype])).element_size()
            refuse_beyond_memory(params * size * (2 if args.grads == "all" else 1) / 2**30,
                                 f"{args.preset} in {dtype} with --grads {args.grads}",
                                 "choose --dtypes bf16, --grads input or a smaller model (for Flux: flux-dev-small)")
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
