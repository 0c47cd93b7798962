"""What the loop needs to know about DeepSpeed, kept out of the loop.

`accelerate launch --config_file configs/accelerate/zero2.yaml -m trainers CONFIG` runs the same
config under DeepSpeed ZeRO. The loop asks this module for five things:

- `make_accelerator`: the Accelerator, with the DeepSpeed config filled from the training config
  (micro-batch, accumulation, clipping: the training config rules; a DeepSpeed JSON that says
  otherwise is an error naming both keys) and, on a machine without a GPU, a gloo process group;
- `prepare`: the optimizer (DeepSpeed's CPU Adam when the optimizer is offloaded) and the wrapped
  trained modules;
- `check_optimizer`: refuse, before anything is built, what cannot work (an 8-bit optimizer with
  the optimizer offloaded to the CPU);
- `Engine`: one object over the DeepSpeed engine (or nothing, without DeepSpeed) that saves and
  loads its sharded state, reads the trained weights as plain float32 tensors, and lends every
  rank the whole model for a moment (`full_weights`), which ZeRO-3 needs before one rank can
  sample or export;
- `local`, `gather_partitions`, `partition_of`: a parameter's part on this rank under ZeRO-3 (the
  whole parameter otherwise), and back and forth between parts and whole tensors, for the EMA.

ZeRO-3 partitions every parameter of the prepared module, frozen ones included, so a LoRA's base
U-Net is spread over the ranks too. Under DeepSpeed the prepared module is one: the trained
modules go in one `TrainedModules` container (a LoRA that also trains the text encoder has two),
and the methods get a `ModuleCall` for each.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from .config import TrainConfig

STATE_DIR = "deepspeed"  # inside a checkpoint: the engine's own files (optimizer shards, one per rank)
STATE_TAG = "state"


class DeepSpeedConfigError(ValueError):
    """The DeepSpeed config and the training config disagree, or ask for what cannot work."""


def using_deepspeed() -> bool:
    """Whether `accelerate launch` was told to use DeepSpeed (its config or --use_deepspeed)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_accelerator(tc: TrainConfig, logging_dir: Path, report_to: list[str] = ("tensorboard",)):
    from accelerate import Accelerator

    kwargs = dict(mixed_precision=tc.mixed_precision, gradient_accumulation_steps=tc.gradient_accumulation_steps,
                  log_with=list(report_to), project_dir=str(logging_dir))
    _check_accumulation_env(tc)
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    # every collective wait is bounded: a stalled or lost process stops the others instead of hanging them
    group = dict(timeout=timedelta(minutes=tc.collective_timeout_minutes))
    if not using_deepspeed():
        return Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[InitProcessGroupKwargs(**group)],
                           **kwargs)

    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin()
    fill_deepspeed_config(plugin.deepspeed_config, tc, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    fill_zero_buffers(plugin.deepspeed_config)
    check_optimizer(tc, plugin.deepspeed_config)
    if tc.optimizer.name == "adamw" and offloads_optimizer(plugin.deepspeed_config):
        # we build DeepSpeedCPUAdam ourselves (with our betas and eps); accelerate must not swap it
        plugin.deepspeed_config["zero_force_ds_cpu_optimizer"] = False
    if not torch.cuda.is_available():
        # accelerate forms a DeepSpeed group only when not told "cpu"; on a CPU machine it then has
        # no backend to name, so name gloo (DeepSpeed's CPU accelerator speaks it)
        group["backend"] = "gloo"
    accelerator = Accelerator(cpu=False, deepspeed_plugin=plugin, kwargs_handlers=[InitProcessGroupKwargs(**group)],
                              **kwargs)
    # accelerate registers the config with transformers, which then builds every CLIP text model
    # already partitioned (zero.Init) under ZeRO-3. Here ZeRO partitions what the engine wraps and
    # nothing else: the frozen text encoder and VAE stay whole on each rank.
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    return accelerator


def _check_accumulation_env(tc: TrainConfig) -> None:
    """accelerate reads an accumulation count from its launch config and would silently override ours."""
    value = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if value is None:
        return
    if not value.isdigit():  # "auto": ours
        del os.environ["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"]
    elif int(value) != tc.gradient_accumulation_steps:
        raise DeepSpeedConfigError(
            f"the accelerate config sets gradient_accumulation_steps={value} but the training config has "
            f"train.gradient_accumulation_steps={tc.gradient_accumulation_steps}; remove it from the accelerate "
            "config (the training config sets it) or make the two equal")


def fill_deepspeed_config(ds: dict, tc: TrainConfig, world_size: int) -> dict:
    """Write the training config's batch, accumulation and clipping into a DeepSpeed config. Values
    the DeepSpeed config leaves out or sets to "auto" are filled; one that differs is an error."""
    ours = {
        "train_micro_batch_size_per_gpu": (tc.batch_size, "train.batch_size"),
        "gradient_accumulation_steps": (tc.gradient_accumulation_steps, "train.gradient_accumulation_steps"),
        "gradient_clipping": (float(tc.max_grad_norm or 0.0), "train.max_grad_norm (null: 0)"),
        "train_batch_size": (tc.batch_size * tc.gradient_accumulation_steps * world_size,
                             "train.batch_size x train.gradient_accumulation_steps x processes"),
    }
    for key, (value, source) in ours.items():
        given = ds.get(key, "auto")
        if given not in ("auto", None) and float(given) != float(value):
            raise DeepSpeedConfigError(
                f"the DeepSpeed config sets {key}={given} but {source} gives {value}; set {key} to \"auto\" in "
                "the DeepSpeed config (the training config then decides) or make the two equal")
        ds[key] = value
    for precision in ("fp16", "bf16"):
        enabled = str(ds.get(precision, {}).get("enabled", "auto")).lower()
        if enabled == "true" and tc.mixed_precision != precision:
            raise DeepSpeedConfigError(
                f"the DeepSpeed config enables {precision} but train.mixed_precision={tc.mixed_precision}; set "
                f"train.mixed_precision={precision}, or \"enabled\": \"auto\" in the DeepSpeed config")
    return ds


#: ZeRO buffer sizes (elements) where the DeepSpeed config leaves them out. DeepSpeed's own defaults
#: (5e8-element gradient buckets, 1e9 parameters kept gathered under ZeRO-3) are sized for models
#: ten times a U-Net's: a 5e8 bucket alone is 0.93 GiB per rank in bf16, more than a LoRA's whole
#: state, and 1e9 live parameters keep all of an SD U-Net gathered, so ZeRO-3 would save nothing.
ZERO_BUFFERS = {
    "reduce_bucket_size": 5e7,
    "allgather_bucket_size": 5e7,
    "stage3_prefetch_bucket_size": 5e7,
    "stage3_param_persistence_threshold": 1e5,
    "stage3_max_live_parameters": 1e8,
    "stage3_max_reuse_distance": 1e8,
}


def fill_zero_buffers(ds: dict) -> dict:
    zero = ds.setdefault("zero_optimization", {})
    for key, value in ZERO_BUFFERS.items():
        if zero.get(key, "auto") == "auto":
            zero[key] = int(value)
    return ds


def offloads_optimizer(ds: dict) -> bool:
    return ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") not in ("none", None)


def check_optimizer(tc: TrainConfig, ds: dict) -> None:
    """Refuse at start what would fail or silently change mid-run."""
    from .optim import WHOLE_PARAMETERS

    name = tc.optimizer.name
    if name in WHOLE_PARAMETERS:
        raise DeepSpeedConfigError(
            f"train.optimizer.name={name} needs every parameter whole on every process, and DeepSpeed ZeRO hands "
            "each process flat slices of them (its step size, factored moments or averaged iterates would differ "
            "from one process's). Launch with configs/accelerate/multi.yaml (data parallel), or use adamw, "
            "adamw8bit or lion8bit under DeepSpeed")
    if name != "adamw" and offloads_optimizer(ds):
        raise DeepSpeedConfigError(
            f"train.optimizer.name={name} cannot run with the optimizer offloaded to the CPU: DeepSpeed's offload "
            "steps its own CPU Adam (32-bit state in CPU memory), and accelerate would swap yours for it silently. "
            f"Either set train.optimizer.name=adamw (the offload already takes the optimizer state off the GPU) or "
            f"launch with a config without offload_optimizer_device (configs/accelerate/zero2.yaml keeps {name} "
            "and shards its 8-bit state across the processes)")
    if ds.get("optimizer"):
        raise DeepSpeedConfigError(
            "the DeepSpeed config has an \"optimizer\" section; remove it: the optimizer comes from "
            "train.optimizer and train.learning_rate")
    if ds.get("scheduler"):
        raise DeepSpeedConfigError(
            "the DeepSpeed config has a \"scheduler\" section; remove it: the schedule comes from "
            "train.lr_scheduler and train.warmup_steps")


def prepare(accelerator, trained: dict[str, nn.Module], params: list[nn.Parameter], tc: TrainConfig):
    """Build the optimizer and let accelerate wrap it with the trained modules. Returns the modules
    as the methods call them (by name), the wrapped optimizer and the `Engine`. DeepSpeed wraps one
    model: several trained modules go in one container, each called through it."""
    from .optim import make_optimizer

    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        prepared = accelerator.prepare(*trained.values(), make_optimizer(params, tc))
        return dict(zip(trained, prepared[:-1])), prepared[-1], Engine(None)
    offload = offloads_optimizer(plugin.deepspeed_config)
    optimizer = make_offload_optimizer(params, tc) if offload else make_optimizer(params, tc)
    names = list(trained)
    single = len(names) == 1
    wrapped, optimizer = accelerator.prepare(trained[names[0]] if single else TrainedModules(trained), optimizer)
    models = {names[0]: wrapped} if single else {name: ModuleCall(wrapped, name) for name in names}
    return models, optimizer, Engine(wrapped)


def make_offload_optimizer(params, tc: TrainConfig) -> torch.optim.Optimizer:
    """AdamW stepped on the CPU by DeepSpeed (what ZeRO-Offload needs), with the config's settings."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    o = tc.optimizer
    return DeepSpeedCPUAdam(params, lr=tc.learning_rate, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                            adamw_mode=True)


class TrainedModules(nn.ModuleDict):
    """The trained modules as the one model a DeepSpeed engine wraps; `engine(name, ...)` calls
    module `name`, so every call goes through the engine (ZeRO-3 gathers what the call needs)."""

    def forward(self, name: str, *args, **kwargs):
        return self[name](*args, **kwargs)


class ModuleCall:
    """Module `name` of a DeepSpeed-wrapped `TrainedModules`, as the methods use a module: calling
    it goes through the engine; anything else (parameters(), config) is the module's own."""

    def __init__(self, engine, name: str):
        self._engine, self._name = engine, name

    def __call__(self, *args, **kwargs):
        return self._engine(self._name, *args, **kwargs)

    def __getattr__(self, attr):
        return getattr(self._engine.module[self._name], attr)


def local(p: torch.Tensor) -> torch.Tensor:
    """The part of a parameter this rank holds: its ZeRO-3 partition, or the whole of it."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p


def gather_partitions(part: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a ZeRO-3 parameter `like` from every rank's `part` of it (collective).
    ZeRO-3 cuts the flattened parameter, padded to a multiple of the world size, into equal parts in
    rank order."""
    import torch.distributed as dist

    parts = [torch.empty_like(part) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, part.contiguous())
    return torch.cat(parts)[: like.ds_numel].view(like.ds_shape)


def partition_of(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of a whole tensor, cut as ZeRO-3 cuts parameter `like`."""
    import torch.distributed as dist

    n = like.ds_tensor.numel()
    flat = full.reshape(-1)
    flat = torch.cat([flat, flat.new_zeros(n * dist.get_world_size() - flat.numel())])
    rank = dist.get_rank()
    return flat[rank * n : (rank + 1) * n].clone()


class Engine:
    """The DeepSpeed engine as the loop needs it; `Engine(None)` stands for plain data parallelism."""

    def __init__(self, engine=None):
        self.engine = engine
        self.stage = int(engine.zero_optimization_stage()) if engine is not None else 0


    @property
    def active(self) -> bool:
        return self.engine is not None

    @property
    def sharded_params(self) -> bool:
        return self.stage == 3

    def base_optimizer(self, optimizer) -> torch.optim.Optimizer:
        """The torch optimizer whose parameter groups hold the learning rate actually used."""
        if self.engine is None:
            return getattr(optimizer, "optimizer", optimizer)
        zero = self.engine.optimizer
        return getattr(zero, "optimizer", zero)

    # -- state -------------------------------------------------------------------------------------

    def save(self, folder: Path) -> None:
        """Every rank writes its optimizer shard (and rank 0 the trained weights as DeepSpeed keeps
        them) under folder/deepspeed. Frozen weights are not written: the base model has them."""
        self.engine.save_checkpoint(str(folder / STATE_DIR), tag=STATE_TAG, exclude_frozen_parameters=True)

    def load(self, folder: Path) -> None:
        path = folder / STATE_DIR
        if not (path / STATE_TAG).is_dir():
            raise FileNotFoundError(
                f"{folder} holds no DeepSpeed state ({STATE_DIR}/{STATE_TAG}); it was written without DeepSpeed. "
                "Resume it with the launch config that wrote it")
        loaded, _ = self.engine.load_checkpoint(str(path), tag=STATE_TAG, load_module_strict=False,
                                                load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load its state from {path}")

    def trained_state(self, named: dict[str, nn.Parameter], keep: bool) -> dict[str, torch.Tensor] | None:
        """The trained weights as whole float32 tensors on the CPU (DeepSpeed's master copies under
        mixed precision), for the rank with `keep` (None for the others). Collective under
        DeepSpeed: every rank calls it, in the same order."""
        if self.engine is None:
            return {k: p.detach().contiguous().cpu() for k, p in named.items()} if keep else None
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for k, p in named.items():
            full = safe_get_full_fp32_param(p)  # every rank takes part; one keeps the result
            if keep:
                out[k] = (full if full is not None else p.detach()).float().contiguous().cpu()
        return out if keep else None

    @contextlib.contextmanager
    def full_weights(self):
        """Every rank holds every weight of the prepared module while inside, and ZeRO-3's fetch
        hooks are off, so one rank can run the model alone (sampling, export) while the others wait.
        Nothing written to the weights inside is kept. Collective: every rank enters."""
        if not self.sharded_params:
            yield
            return
        import deepspeed

        offload = self.engine.optimizer.parameter_offload
        params = list(self.engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            for p in params:
                p.ds_active_sub_modules.clear()
            offload._remove_module_hooks()
            offload.forward_hooks, offload.backward_hooks = [], []
            try:
                yield
            finally:
                offload.setup_zero_stage3_hooks()

