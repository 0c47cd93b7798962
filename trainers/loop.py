"""The one training loop. Every method runs here; what differs lives in the method object.

The loop owns the accelerate work: preparing models and the optimizer, gradient accumulation,
mixed precision, clipping, the EMA, checkpoints, logging and validation. Every random draw of a
step (the latent sample, the noise, the timesteps, caption dropout) comes from one generator per
process that checkpoints save, and batches are read straight from the cache in the sampler's
order; together with checkpoints taken only at optimizer-step boundaries, that makes a resumed
run end with the same weights as one that never stopped.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data_tools.buckets import BucketBatchSampler
from data_tools.diskspace import NotEnoughSpace, ensure_free_space
from data_tools.locks import FolderBusy, FolderLock
from data_tools.loss_masks import masked_mean
from data_tools.schema import dump_config
from data_tools.store import fingerprint
from ldmcore.checkpoints import Components
from ldmcore.faults import fault_point
from ldmcore.weights import read_state_dict, write_safetensors
from ldmcore.quantize import is_quantized, quantize_linears

from .batch import collate, to_device  # noqa: F401  (collate: re-exported for tests and bench/)
from .config import Config
from .distributed import Engine, make_accelerator, prepare
from .integrity import check_checkpoint, write_checksums
from .interrupts import Interrupted, Interrupts
from .optim import averaged_weights
from .samples import PromptsFileError, Samples, encode_sample_prompts, read_prompts_file
from .statefile import load_state, save_state
from .method import Method, denoise, diffusion_loss  # noqa: F401  (diffusion_loss: re-exported for bench/)

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TrainingStopped(RuntimeError):
    """Training cannot go on; the message says why and what was kept."""


class WriteFailed(TrainingStopped):
    """A write failed (no space left, a read-only or vanished folder); what was half written is removed."""

    def __init__(self, error: OSError, what: str, checkpoints: list[Path]):
        kept = f"the last complete checkpoint, {checkpoints[-1]}, is intact" if checkpoints else "no checkpoint was written yet"
        hint = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some of your quota",
                errno.EROFS: "make the folder writable", errno.EACCES: "make the folder writable"}.get(error.errno, "fix it")
        super().__init__(f"could not write {what}: {error.strerror} ({error.filename}); the partial files were removed "
                         f"and {kept}. {hint.capitalize()}, then run the same command with train.resume=latest")


#: method name -> "module:Class"; imported on use so a method's dependencies load only when it runs
METHODS = {
    "lora": "trainers.lora:LoraMethod",
    "dreambooth": "trainers.dreambooth:DreamBoothMethod",
    "full": "trainers.full:FullMethod",
    "inpaint": "trainers.inpaint:InpaintMethod",
    "controlnet": "trainers.controlnet:ControlNetMethod",
    "vae": "trainers.vae:VaeMethod",
}


def make_method(config: Config, components: Components) -> Method:
    import importlib

    if config.method not in METHODS:
        raise NotImplementedError(f"method {config.method!r} is not available; choose one of {sorted(METHODS)}")
    module, cls = METHODS[config.method].split(":")
    return getattr(importlib.import_module(module), cls)(config, components)


# -- the loss of one batch -------------------------------------------------------------------------


def sample_generators(seed: int, micro_step: int, items: torch.Tensor) -> list[torch.Generator]:
    """One generator per sample, keyed by (seed, micro-step, dataset item): a sample draws the same
    noise, timestep and latent whichever process or batch position it lands in, and a resumed run
    draws what the uninterrupted one did, with no generator state to save."""
    keys = [np.random.SeedSequence([seed, micro_step, int(i)]).generate_state(1, np.uint64)[0] for i in items]
    return [torch.Generator().manual_seed(int(k)) for k in keys]


# -- checkpoints -----------------------------------------------------------------------------------


def _checkpoints(output: Path) -> list[Path]:
    folder = output / CHECKPOINTS
    done = [p for p in folder.glob("step_*") if p.is_dir() and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def find_resume(output: Path, resume: str | None) -> Path | None:
    """The checkpoint `train.resume` names, its files checked against their checksums. "latest": the
    newest intact one, passing over damaged ones with a warning (None when there is none at all: a
    fresh start); a damaged named checkpoint, or only damaged ones, stop the run."""
    if resume is None:
        return None
    if resume == "latest":
        found = _checkpoints(output)
        damaged = []
        for folder in reversed(found):
            problem = check_checkpoint(folder)
            if problem is None:
                if damaged:
                    log.warning("resuming from %s, the newest intact checkpoint", folder)
                return folder
            log.warning("skipping checkpoint %s: %s", folder.name, problem)
            damaged.append(problem)
        if damaged:
            raise TrainingStopped(f"train.resume=latest: every checkpoint in {output / CHECKPOINTS} is damaged "
                                  f"({'; '.join(damaged)}); nothing to resume from. Move them away to start over")
        return None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise TrainingStopped(f"train.resume={resume}: not a complete checkpoint folder (no state.json)")
    problem = check_checkpoint(path)
    if problem is not None:
        raise TrainingStopped(f"train.resume={resume}: {problem}; resume from another checkpoint (train.resume=latest "
                              "takes the newest intact one)")
    return path


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- the loop --------------------------------------------------------------------------------------


def train(config: Config) -> Path:
    """Run the training `config` describes; returns the output folder. On SIGTERM or SIGINT it stops
    as `trainers.interrupts` describes, raising Interrupted."""
    with Interrupts() as interrupts, contextlib.ExitStack() as held:
        try:
            return _train(config, interrupts, held)
        except (RuntimeError, torch.distributed.DistError) as e:
            if not _is_lost_process(e):
                raise
            raise TrainingStopped(f"lost contact with the run's other processes ({str(e).splitlines()[0][-160:]}). "
                                  f"{_who_is_behind()} Check their logs; once all are stopped, run the same command "
                                  "with train.resume=latest") from None


# -- several processes: who stopped answering --------------------------------------------------------

_HEARTBEAT = "ldm_tune/step/"


def _is_lost_process(error: BaseException) -> bool:
    """A collective that timed out or found its peer gone (gloo, NCCL), in a run of several processes."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    text = str(error)
    return isinstance(error, torch.distributed.DistError) or any(
        s in text for s in ("gloo", "NCCL", "Connection reset", "Connection closed", "Timed out"))


def _heartbeat(step: int) -> None:
    """Each process records, in the launcher's key-value store, the last step it finished."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        store = torch.distributed.distributed_c10d._get_default_store()
        store.set(_HEARTBEAT + str(torch.distributed.get_rank()), str(step))


def _who_is_behind() -> str:
    """Which processes finished fewer steps than the others, from their heartbeats; "" if that cannot be read."""
    try:
        from datetime import timedelta

        store = torch.distributed.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=5))
        steps = {}
        for rank in range(torch.distributed.get_world_size()):
            key = _HEARTBEAT + str(rank)
            steps[rank] = int(store.get(key)) if store.check([key]) else 0
    except Exception:  # the store lives with process 0: gone with it
        return "Process 0 (the first machine) may be the one that stopped."
    last = max(steps.values())
    behind = sorted(r for r, s in steps.items() if s < last)
    if not behind:
        return f"Every process finished step {last}."
    return (f"Process(es) {', '.join(map(str, behind))} stopped answering after step "
            f"{', '.join(str(steps[r]) for r in behind)}; the others finished step {last}.")


def _train(config: Config, interrupts: Interrupts, held: contextlib.ExitStack) -> Path:
    from accelerate.utils import broadcast_object_list
    from tqdm.auto import tqdm

    from .distributed import DeepSpeedConfigError
    from .optim import EMA, make_scheduler

    tc = config.train
    output = Path(config.output_dir)
    try:
        accelerator = make_accelerator(tc, output / "logs", _trackers(config))
    except DeepSpeedConfigError as e:
        raise TrainingStopped(str(e)) from None
    main = accelerator.is_main_process
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    if main:
        try:  # one run per output_dir: a second stops here, naming the first
            held.enter_context(FolderLock(output, "output_dir"))
        except FolderBusy as e:
            raise TrainingStopped(str(e)) from None
        dump_config(config, output / "config.yaml")
        lc = config.logging
        accelerator.init_trackers(lc.project, init_kwargs={"wandb": {
            "name": lc.run_name or output.name, "dir": str(output / "logs"),
            "config": config.model_dump(mode="json")}})
    sample_prompts = None
    if config.validation.prompts_file:  # read before anything heavy: a bad line stops the run at once
        try:
            sample_prompts = read_prompts_file(config.validation.prompts_file)
        except PromptsFileError as e:
            raise TrainingStopped(str(e)) from None
    parts = config.model.load()
    if not parts.family.trainable:
        raise TrainingStopped(
            f"model.path={config.model.path} is an {parts.family.title}, which the training methods do not take "
            "as a base; point model.path at a base model (an SDXL base, SD 1.x or 2.x)"
        )
    method = make_method(config, parts)

    # The cache first: the VAE and the text encoders are needed for it, not for the steps.
    for model in (parts.vae, *parts.text_encoders.values()):
        model.to(device)
    try:
        dataset, keys = method.dataset(device, progress=main)
    except (ValueError, FileNotFoundError) as e:  # the data's own problems: a missing map or mask, no usable image
        raise TrainingStopped(f"the data cannot be used: {e}") from None
    validation_text = None
    if method.cached_text:  # the steps read the cache: the encoders leave the device (Flux's T5 alone is 9 GB)
        if main:  # encoded now: sampling never brings them back
            validation_text = encode_sample_prompts(config, sample_prompts, parts)
        for model in (parts.vae, *parts.text_encoders.values()):
            model.to("cpu")
    # what a dropped caption conditions on (SDXL: zeros), unbatched
    empty_text = parts.family.empty_text(to_device(dataset.empty_text(), device))
    # the last `validation.heldout` images in key order are kept out of training for the validation loss
    order = sorted(range(len(dataset)), key=lambda i: keys[i])
    heldout = sorted(order[len(order) - config.validation.heldout :]) if config.validation.heldout else []
    if heldout and len(heldout) >= len(dataset):
        raise TrainingStopped(f"validation.heldout={config.validation.heldout} leaves no image to train on")
    train_items = epoch_items(getattr(dataset, "repeats", None) or [1] * len(dataset), heldout)
    sampler = BucketBatchSampler([dataset.buckets[i] for i in train_items], tc.batch_size, seed=tc.seed,
                                 num_replicas=world, rank=rank)
    if main:
        log.info("%s", _data_plan(config, dataset, train_items, len(sampler)))

    # Seeded right here: what the method initialises (LoRA's A matrices) must depend on the seed
    # only, not on whether building the cache above drew from the global generator.
    base_hash = fingerprint(parts.denoiser)  # of the base weights, before the method changes anything
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    torch.manual_seed(tc.seed)
    for frozen in parts.models:  # a method unfreezes what it trains
        frozen.requires_grad_(False)
    weight_dtype = DTYPES[tc.mixed_precision]
    if tc.base_quantization:
        if not method.frozen_denoiser:
            raise TrainingStopped(f"train.base_quantization={tc.base_quantization} quantises the frozen base, but the "
                                  f"{method.name} method trains the denoiser's own weights; use LoRA or ControlNet, "
                                  "or remove train.base_quantization")
        quantize_linears(parts.denoiser, tc.base_quantization, compute_dtype=weight_dtype)
    method.build()
    for module in {"denoiser": parts.denoiser, **method.trained_modules()}.values():
        module.to(device)  # (bitsandbytes quantises a quantised base's weights here)
        for p in module.parameters():  # the frozen base in low precision, trained weights in float32
            if not is_quantized(p):
                p.data = p.data.to(torch.float32 if p.requires_grad else weight_dtype)
        module.train()
    if tc.gradient_checkpointing:
        parts.denoiser.set_gradient_checkpointing(True)

    params = method.parameters()
    if not params:
        raise TrainingStopped(f"method {method.name} left no parameter to train")
    if main:  # a checkpoint and the export must fit before the first step, not after hours
        trained = sum(p.numel() * 4 for p in params)
        moments = {"adamw": 2.0, "adamw8bit": 0.5, "lion8bit": 0.25}.get(tc.optimizer.name, 2.0)
        checkpoint = trained * (1 + moments + (1 if tc.ema_decay else 0)) + method.export_bytes(checkpoint=True)
        try:
            ensure_free_space(output, checkpoint + method.export_bytes(checkpoint=False), "a checkpoint and the export")
        except NotEnoughSpace as e:
            raise TrainingStopped(e.strerror) from None
    models, optimizer, engine = prepare(accelerator, method.trained_modules(), params, tc)
    # built on the optimizer that holds the learning rate in use (DeepSpeed's inner one); stepped by
    # us once per optimizer step, on every rank
    scheduler = make_scheduler(engine.base_optimizer(optimizer), tc)
    ema = EMA(params, tc.ema_decay) if tc.ema_decay else None

    def autocast():
        # DeepSpeed keeps the prepared module itself in low precision and asks for no autocast, but
        # the latents and the frozen parts' outputs arrive in float32: let autocast meet them
        if engine.active and tc.mixed_precision != "no":
            return torch.autocast(device.type, dtype=weight_dtype)
        return accelerator.autocast()

    samples = Samples(accelerator, method, config, output, autocast, sample_prompts, base_hash, validation_text)
    step, skipped, streak = 0, 0, 0
    # the main process checks the checkpoints' files and tells the others which it took
    resume_from = broadcast_object_list([find_resume(output, tc.resume) if main else None])[0]
    if resume_from is not None:
        step, skipped, streak = _load_checkpoint(resume_from, method, optimizer, scheduler, ema, sampler, rank, engine)
        if main:
            log.info("resumed from %s at step %d", resume_from, step)
    interrupts.immediate = False  # from here a signal ends the run at a step's end, with a checkpoint
    saved_at, saved_time = step, time.monotonic()

    def save():
        nonlocal saved_at, saved_time
        _save_checkpoint(accelerator, output, step, skipped, streak, method, optimizer, scheduler, ema, sampler,
                         _metadata(config, base_hash), engine)
        saved_at, saved_time = step, time.monotonic()

    def batches():
        while True:
            dataset.set_epoch(sampler.epoch)
            for positions in sampler:
                idx = [train_items[p] for p in positions]
                batch = collate([dataset[i] for i in idx])
                batch["item"] = torch.tensor(idx)
                yield batch

    stream = batches()
    bar = tqdm(total=tc.max_steps, initial=step, desc="training", unit="step", disable=not main)
    window_bad, last, phase = False, time.perf_counter(), 0
    step_times: list[float] = []
    if torch.cuda.is_available():  # the peak of the steps, not of loading and building the cache
        torch.cuda.reset_peak_memory_stats()
    step_peak = 0.0
    while step < tc.max_steps:
        batch = to_device(next(stream), device)
        gens = sample_generators(tc.seed, step * tc.gradient_accumulation_steps + phase, batch.pop("item"))
        phase = (phase + 1) % tc.gradient_accumulation_steps
        with accelerator.accumulate(*models.values()):
            with autocast():
                loss = method.loss(models, batch, empty_text, gens)
            finite = accelerator.reduce(torch.isfinite(loss).float().reshape(1), "min").item() > 0
            if finite:
                accelerator.backward(loss)
            else:
                window_bad = True
            grad_norm = None
            if accelerator.sync_gradients and not window_bad and tc.max_grad_norm:
                grad_norm = accelerator.clip_grad_norm_(params, tc.max_grad_norm)
            if not window_bad:
                optimizer.step()  # under DeepSpeed the backward above stepped, at the window's end
            fault_point("step")
            optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            continue

        step += 1
        scheduler.step()
        if window_bad:
            skipped, streak = skipped + 1, streak + 1
            window_bad = False
            if streak >= tc.max_nonfinite_steps:
                found = _checkpoints(output)
                kept = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written yet"
                raise TrainingStopped(
                    f"{streak} optimizer steps in a row had a non-finite loss (at step {step}); stopping. {kept}. "
                    "Lower train.learning_rate, use bf16 instead of fp16, or check the data."
                )
        else:
            streak = 0
            if ema is not None:
                ema.update()

        now = time.perf_counter()
        if main:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", step_s=f"{now - last:.2f}")
        if step % tc.log_every == 0 or step == tc.max_steps:
            scalars = {"loss": loss.item(), "lr": scheduler.get_last_lr()[0], "skipped_steps": skipped,
                       "images_per_s": tc.batch_size * tc.gradient_accumulation_steps * world / max(now - last, 1e-9)}
            if grad_norm is not None:
                scalars["grad_norm"] = float(grad_norm)
            if torch.cuda.is_available():
                scalars["memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            accelerator.log(scalars, step=step)
        step_times.append(now - last)
        step_peak = max(step_peak, peak_memory_gib())  # before checkpoints and validation add theirs
        last = now
        if step % tc.checkpoint_every == 0 or step == tc.max_steps:
            save()
        if heldout and ((config.validation.every and step % config.validation.every == 0) or step == tc.max_steps):
            with averaged_weights(engine.base_optimizer(optimizer)):
                val = _validation_loss(models, method, dataset, heldout, parts, config, empty_text, device, autocast)
            accelerator.log({"val_loss": val}, step=step)
        if samples.due(step):
            with averaged_weights(engine.base_optimizer(optimizer)):
                samples.run(step, engine)
        # every process agrees, once a step, whether one of them was signalled or the time checkpoint is due
        _heartbeat(step)  # (first: "finished step N", for the message should another never arrive)
        due = bool(tc.checkpoint_minutes) and time.monotonic() - saved_time >= 60 * tc.checkpoint_minutes
        stop, due = (accelerator.reduce(torch.tensor([interrupts.requested, due], dtype=torch.float32, device=device),
                                        "max") > 0).tolist()
        if (stop or due) and saved_at != step:
            save()
        if stop and step < tc.max_steps:  # (at the last step the export is all that is left: it runs)
            bar.close()
            accelerator.end_training()
            raise Interrupted(f"stopped after step {step} on a signal; checkpoint {output / CHECKPOINTS}/"
                              f"step_{step:08d} holds everything to continue: run the same command with "
                              "train.resume=latest")
    bar.close()
    _write_run_stats(accelerator, output, step_times, step_peak, engine)

    accelerator.wait_for_everyone()
    averages = ema.full_shadow() if ema is not None else None  # collective below ZeRO-3
    with engine.full_weights():
        if main:
            with averaged_weights(engine.base_optimizer(optimizer)):
                _export(method, output, _metadata(config, base_hash), averages)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return output


def epoch_items(repeats: list[int], heldout: list[int]) -> list[int]:
    """The dataset items an epoch visits, each `repeats[i]` times (its subset's, data.subsets), the
    held-out ones left out; the sampler shuffles them into batches."""
    held = set(heldout)
    return [i for i, n in enumerate(repeats) if i not in held for _ in range(n)]


def _data_plan(config: Config, dataset, train_items: list[int], batches_per_epoch: int) -> str:
    """What an epoch is made of, said at the start: pictures and repeats per subset, steps per epoch."""
    import collections

    tc, data = config.train, config.data
    lines = ["data:"]
    every = getattr(getattr(dataset, "cache", dataset), "subsets", None)  # (DreamBooth's instances sit on a cache)
    pictures = collections.Counter(every) if every is not None else collections.Counter({0: len(dataset)})
    visits = collections.Counter(dataset.subsets[i] for i in train_items) if hasattr(dataset, "subsets") else None
    for i, sub in enumerate(data.subsets or [None]):
        if sub is None:
            lines.append(f"  {data.path}: {pictures[0]} pictures")
        elif visits is not None and not visits[i] and sub.role == "class":
            lines.append(f"  subset {i} (class) {sub.path}: {pictures[i]} pictures, drawn beside the instance pictures")
        else:
            lines.append(f"  subset {i} ({sub.role}) {sub.path}: {pictures[i]} pictures x {sub.repeats} repeats "
                         f"= {visits[i] if visits is not None else pictures[i] * sub.repeats} visits an epoch")
    steps = -(-batches_per_epoch // tc.gradient_accumulation_steps)
    lines.append(f"  an epoch: {len(train_items)} visits, {batches_per_epoch} batches of {tc.batch_size} per process, "
                 f"about {steps} optimizer steps; train.max_steps={tc.max_steps}")
    return "\n".join(lines)


def _trackers(config: Config) -> list[str]:
    """The trackers to report to; one that is not installed stops the run before anything starts."""
    import importlib.util

    for name in config.logging.report_to:
        if name == "wandb" and importlib.util.find_spec("wandb") is None:
            raise TrainingStopped("logging.report_to includes wandb, which is not installed: pip install wandb "
                                  "(or remove it; TensorBoard needs nothing)")
    return list(config.logging.report_to)


def peak_memory_gib() -> float:
    """This process's peak: allocated GPU memory, or on a CPU the peak resident set (all of it:
    weights, activations, the Python process itself)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def _write_run_stats(accelerator, output: Path, step_times: list[float], step_peak: float, engine: Engine) -> None:
    """output_dir/run_stats.json: step time and every process's peak memory over the training steps
    (on a GPU; a CPU's peak resident set cannot be reset, so there it includes loading), for the
    user and bench/."""
    peaks = accelerator.gather(torch.tensor([step_peak], device=accelerator.device)).tolist()
    if not accelerator.is_main_process:
        return
    timed = step_times[1:] or step_times  # the first step pays for warm-up
    stats = {
        "processes": accelerator.num_processes,
        "deepspeed_zero_stage": engine.stage if engine.active else None,
        "steps_timed": len(timed),
        "step_time_s_median": float(np.median(timed)) if timed else None,
        "peak_memory_gib": peaks,
        "memory_kind": "cuda max_memory_allocated" if torch.cuda.is_available() else "cpu peak rss",
    }
    (output / "run_stats.json").write_text(json.dumps(stats, indent=2) + "\n")


@torch.no_grad()
def _export(method: Method, folder: Path, metadata: dict, averages: list[torch.Tensor] | None) -> None:
    """Export the trained weights, or with an EMA the averages (the raw weights go beside them
    where the method keeps both: `method.raw_weights`, in parameters() order)."""
    staging = folder / ".export_partial"  # written whole, then moved into place file by file
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        if averages is None:
            method.export(staging, metadata)
        else:
            params = method.parameters()
            raw = [p.detach().clone() for p in params]
            for p, a in zip(params, averages, strict=True):
                p.copy_(a.to(p.device, p.dtype))
            method.raw_weights = raw
            try:
                method.export(staging, metadata)
            finally:
                for p, r in zip(params, raw):
                    p.copy_(r)
                method.raw_weights = None
        fault_point("export", staging)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise WriteFailed(e, "the export", _checkpoints(folder)) from None
    for item in sorted(staging.iterdir()):
        if (folder / item.name).is_dir():
            shutil.rmtree(folder / item.name)
        os.replace(item, folder / item.name)
    staging.rmdir()


def _metadata(config: Config, base_hash: str) -> dict[str, str]:
    return {
        "ldm_tune.method": config.method,
        "ldm_tune.base_model": str(config.model.path),
        "ldm_tune.base_model_hash": base_hash,  # sha256 of the base U-Net's weights (first 32 hex digits)
        "ldm_tune.config": json.dumps(config.model_dump(mode="json")),
    }


def _save_checkpoint(accelerator, output, step, skipped, streak, method, optimizer, scheduler, ema, sampler, metadata,
                     engine: Engine) -> None:
    """Every process writes its global random state (LoRA dropout draws from it) and, under
    DeepSpeed, its optimizer shard; the main process writes the rest and renames the folder into
    place only when everything is in it, so a crash mid-write leaves no complete-looking checkpoint.
    What the main process writes (trained.safetensors, ema.safetensors, the exports) is plain whole
    tensors, the same with or without DeepSpeed. No file is a pickle (trainers/statefile.py)."""
    main = accelerator.is_main_process
    folder = output / CHECKPOINTS
    tmp = folder / f".tmp_step_{step:08d}"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_state(_rng_state(), tmp / f"rng_{accelerator.process_index}.safetensors")
    if engine.active:
        engine.save(tmp)
    # collective under DeepSpeed (and the EMA under ZeRO-3): every rank takes part in putting the
    # weights together; only the main process keeps a copy
    state = engine.trained_state(method.trained_parameters(), keep=main)
    ema_state = ema.state_dict() if ema is not None and (main or engine.sharded_params) else None
    accelerator.wait_for_everyone()
    with engine.full_weights():
        if main:
            try:
                write_safetensors(state, tmp / "trained.safetensors")
                fault_point("checkpoint_write", tmp / "optimizer.safetensors")
                if not engine.active:  # DeepSpeed's optimizer state is in its shards
                    save_state(optimizer.state_dict(), tmp / "optimizer.safetensors")
                save_state(scheduler.state_dict(), tmp / "scheduler.safetensors")
                if ema_state is not None:
                    save_state(ema_state, tmp / "ema.safetensors")
                with averaged_weights(engine.base_optimizer(optimizer)):  # (after the resume state is written)
                    method.export(tmp, metadata)
            except OSError as e:  # a full disk, a vanished folder: the half-written checkpoint goes
                shutil.rmtree(tmp, ignore_errors=True)
                raise WriteFailed(e, f"checkpoint step_{step:08d}", _checkpoints(output)) from None
        accelerator.wait_for_everyone()
    if main:
        counters = {"step": step, "skipped": skipped, "streak": streak, "sampler": sampler.state_dict(),
                    "world_size": accelerator.num_processes, "deepspeed": engine.active}
        # checksums of every file, then the counters: state.json, written last, marks the folder complete
        write_checksums(tmp)
        (tmp / "state.json").write_text(json.dumps(counters))
        final = folder / f"step_{step:08d}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _checkpoints(output)[: -method.config.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _load_checkpoint(folder: Path, method, optimizer, scheduler, ema, sampler, rank, engine: Engine) -> tuple[int, int, int]:
    counters = json.loads((folder / "state.json").read_text())
    if counters["world_size"] != sampler.num_replicas:
        raise TrainingStopped(
            f"{folder} was written by {counters['world_size']} processes, this run has {sampler.num_replicas}; "
            "resume with the same number of processes"
        )
    if counters.get("deepspeed", False) != engine.active:
        how = "under DeepSpeed" if counters.get("deepspeed") else "without DeepSpeed"
        raise TrainingStopped(f"{folder} was written {how}; resume it with the accelerate config that wrote it")
    if engine.active:  # the trained weights (float32 masters included) and the optimizer shards
        engine.load(folder)
    else:
        method.load_trained_state_dict(read_state_dict(folder / "trained.safetensors"))
        optimizer.load_state_dict(load_state(folder / "optimizer.safetensors"))
    scheduler.load_state_dict(load_state(folder / "scheduler.safetensors"))
    if ema is not None:
        ema.load_state_dict(load_state(folder / "ema.safetensors"))
    sampler.load_state_dict(counters["sampler"])
    _set_rng_state(load_state(folder / f"rng_{rank}.safetensors"))
    return counters["step"], counters["skipped"], counters["streak"]


@torch.no_grad()
def _validation_loss(models, method, dataset, heldout, parts, config, empty_text, device, autocast) -> float:
    """The loss on held-out images at fixed timesteps with fixed noise: comparable across steps
    and runs. Every process computes it (cheap), so no process waits on another."""
    schedule, losses = parts.schedule, []
    for i in heldout:
        batch = to_device(collate([dataset[i]]), device)
        for t in config.validation.loss_timesteps:
            g = torch.Generator().manual_seed(int(np.random.SeedSequence([config.train.seed, i, t]).generate_state(1)[0]))
            latents = parts.vae.scale(batch["mean"])  # the posterior mean: no sampling noise
            noise = torch.randn(latents.shape, generator=g).to(device)
            tt = torch.full((1,), schedule.fixed_timestep(t), device=device)
            text = method.encode_text(batch, torch.zeros(1, dtype=torch.bool, device=device), empty_text, models)
            with autocast():
                pred = denoise(models, method, parts, batch, schedule.add_noise(latents, noise, tt), tt, text)
            error = F.mse_loss(pred.float(), schedule.target(latents, noise, tt).float(), reduction="none")
            losses.append(masked_mean(error, batch.get("loss_mask")).item())  # (over the loss mask, as training)
    return float(np.mean(losses))


