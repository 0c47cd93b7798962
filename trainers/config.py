"""The training config: one typed schema for every method, read from YAML with dotted overrides.

    method: lora
    model: {path: path/to/sd15}
    data: {path: my_pictures, resolution: 512}
    output_dir: runs/my-lora
    train: {max_steps: 1000, batch_size: 4, learning_rate: 1.0e-4}

Loading goes through `data_tools.schema.load_config` (the project's one config reader): unknown
keys are named with the closest valid key, wrong types with the expected type.
"""
from __future__ import annotations

import os
from typing import Literal, Optional, Sequence, Union

from pydantic import Field, field_validator, model_validator

from data_tools.config import DataConfig, ModelConfig
from data_tools.schema import Strict, load_config



class ProdigyConfig(Strict):
    """Prodigy (prodigyopt) estimates the step size itself: keep train.learning_rate near 1.0."""
    d_coef: float = Field(1.0, gt=0)  # scales the estimated step size
    d0: float = Field(1e-6, gt=0)  # the first estimate
    use_bias_correction: bool = False  # Adam's bias correction in the step-size estimate
    safeguard_warmup: bool = False  # recommended with a warmup (train.warmup_steps)


class ScheduleFreeConfig(Strict):
    """Schedule-free AdamW (schedulefree): no LR schedule (train.lr_scheduler constant, no
    train.warmup_steps); it averages its iterates instead and exports the averaged weights."""
    warmup_steps: int = Field(0, ge=0)  # its own warmup
    r: float = 0.0  # polynomial weighting of the averaged iterates (0: uniform)
    weight_lr_power: float = 2.0  # how strongly later, larger steps weigh in the average


class AdafactorConfig(Strict):
    """Adafactor (transformers): factored second moments, little optimizer memory."""
    relative_step: bool = False  # True: its own step size, train.learning_rate unused
    scale_parameter: bool = False  # scale the step by the parameter's RMS
    warmup_init: bool = False  # with relative_step: warm the step size up from 0
    clip_threshold: float = Field(1.0, gt=0)  # clip the update's RMS to this
    decay_rate: float = -0.8  # the second moment's decay exponent


#: the optimizers whose settings have a section of their own
OPTIMIZER_SECTIONS = {"prodigy": "prodigy", "adamw_schedulefree": "schedulefree", "adafactor": "adafactor"}


class OptimizerConfig(Strict):
    # adamw (torch); adamw8bit and lion8bit (bitsandbytes: state in 8 bits); prodigy (prodigyopt);
    # adamw_schedulefree (schedulefree); adafactor (transformers)
    name: Literal["adamw", "adamw8bit", "lion8bit", "prodigy", "adamw_schedulefree", "adafactor"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)  # (not Adafactor's)
    weight_decay: float = Field(1e-2, ge=0)  # decoupled weight decay
    eps: float = Field(1e-8, gt=0)  # (not Lion's or Adafactor's)
    prodigy: ProdigyConfig = ProdigyConfig()
    schedulefree: ScheduleFreeConfig = ScheduleFreeConfig()
    adafactor: AdafactorConfig = AdafactorConfig()

    @model_validator(mode="after")
    def _settings_of_the_optimizer_in_use(self):
        for name, section in OPTIMIZER_SECTIONS.items():
            settings = getattr(self, section)  # (a saved config has every section: only changed ones count)
            if self.name != name and settings != type(settings)():
                raise ValueError(f"train.optimizer.{section} is set but train.optimizer.name is {self.name}: "
                                 f"set name: {name}, or remove the {section} section")
        return self


class TrainConfig(Strict):
    max_steps: int = Field(ge=1)  # optimizer steps
    batch_size: int = Field(1, ge=1)  # per process, per micro-step
    learning_rate: float = Field(1e-4, gt=0)  # the peak learning rate (after warmup)
    seed: int = 0  # every random draw of the run derives from it
    resume: Optional[str] = None  # "latest" or a checkpoint folder
    gradient_accumulation_steps: int = Field(1, ge=1)  # micro-steps per optimizer step
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # the frozen base in low precision; trained weights fp32
    # the frozen denoiser's linear layers in 4 (NF4) or 8 bits, QLoRA style (LoRA and ControlNet; bitsandbytes)
    base_quantization: Optional[Literal["nf4", "int8"]] = None
    max_grad_norm: Optional[float] = Field(1.0, gt=0)  # clip the gradient norm to this; null: no clipping
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, more time
    # after warmup: constant, or decaying to 0 at max_steps
    lr_scheduler: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0)  # linear warmup from 0
    optimizer: OptimizerConfig = OptimizerConfig()
    ema_decay: Optional[float] = Field(None, gt=0, lt=1)  # keep an EMA of the trained weights
    checkpoint_every: int = Field(500, ge=1)  # optimizer steps between checkpoints (and always at the end)
    # also a checkpoint whenever this many minutes passed since the last (jobs with a wall-clock limit)
    checkpoint_minutes: Optional[float] = Field(None, gt=0)
    keep_checkpoints: int = Field(3, ge=1)  # the newest N are kept
    log_every: int = Field(10, ge=1)  # steps between logged scalars
    max_nonfinite_steps: int = Field(10, ge=1)  # stop after this many non-finite losses in a row
    # how long a process waits for the others at a collective before it stops the run (a stalled machine)
    collective_timeout_minutes: float = Field(30.0, gt=0)

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value):
        return "no" if value is False else value  # YAML 1.1 reads a bare `no` as false

    @model_validator(mode="after")
    def _schedule_free_has_no_schedule(self):
        if self.optimizer.name == "adamw_schedulefree" and (self.lr_scheduler != "constant" or self.warmup_steps):
            raise ValueError("train.optimizer.name adamw_schedulefree replaces the LR schedule: set "
                             "train.lr_scheduler: constant and train.warmup_steps: 0 (its own warmup is "
                             "train.optimizer.schedulefree.warmup_steps)")
        return self


class LossConfig(Strict):
    min_snr_gamma: Optional[float] = Field(None, gt=0)  # Hang et al. 2023; 5 is common
    noise_offset: float = Field(0.0, ge=0)  # extra per-channel offset noise, helps very dark/bright images
    input_perturbation: float = Field(0.0, ge=0)  # noise added to the model input only (Ning et al. 2023)
    caption_dropout: float = Field(0.0, ge=0, le=1)  # share of captions replaced by the empty prompt (for CFG)
    # flow-matching models (Flux): how training sigmas are drawn and weighed (ldmcore.flow)
    timestep_sampling: Optional[Literal["uniform", "logit_normal"]] = None  # None: logit-normal for flow models
    logit_mean: float = 0.0  # logit-normal draws: the mean of the logit
    logit_std: float = Field(1.0, gt=0)  # logit-normal draws: the spread of the logit
    # None: the scheduler's own shift (Flux.1-dev: by resolution); "none"; "resolution"; or a fixed shift
    timestep_shift: Optional[Union[Literal["none", "resolution"], float]] = None
    weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"  # per-sigma loss weights (SD3 paper's names)


class LoraConfig(Strict):
    # lora; or the LyCORIS adapters loha (Hadamard product of two low-rank pairs) and lokr (Kronecker product),
    # exported as lycoris_kohya.safetensors for ComfyUI and A1111 / Forge (diffusers reads neither)
    type: Literal["lora", "loha", "lokr"] = "lora"
    rank: int = Field(16, ge=1)  # the LoRA rank (dimension)
    alpha: Optional[float] = Field(None, gt=0)  # None: alpha = rank (scale 1)
    dropout: float = Field(0.0, ge=0, lt=1)  # dropout on the LoRA branch
    # a preset, or module-name suffixes / regular expressions
    targets: Union[Literal["attention", "attention+ff", "all"], list[str]] = "attention"
    # peft's init_lora_weights (true: B = 0, the model starts unchanged)
    init: Union[bool, Literal["gaussian", "pissa", "olora"]] = True
    use_dora: bool = False  # DoRA: a learned magnitude per output beside the LoRA direction
    text_encoder: bool = False  # also train the text encoder's LoRA (then captions are encoded live)
    trigger_words: list[str] = []  # written into the exported files' metadata

    @model_validator(mode="after")
    def _lycoris_is_not_dora(self):
        if self.type != "lora" and (self.use_dora or not isinstance(self.init, bool)):
            raise ValueError(f"lora.type {self.type}: lora.use_dora and the LoRA init schemes are LoRA's; "
                             "leave lora.use_dora false and lora.init true")
        return self


class ValidationConfig(Strict):
    every: int = Field(0, ge=0)  # steps between validations; 0: only at the end when prompts are given
    prompts: list[str] = []  # validation prompts, sampled every validation.every steps
    # kohya-style sample prompts, one per line with its own settings: --n negative --w width --h height
    # --d seed --l guidance --s steps (trainers/samples.py); each saved as its own PNG with its settings
    prompts_file: Optional[str] = None
    seeds: list[int] = [0]  # one row of the grid per seed
    steps: int = Field(20, ge=1)  # sampling steps
    guidance_scale: Optional[float] = None  # None: the model family's default (SD 7.5, SDXL 5, Flux 3.5)
    sampler: Optional[Literal["ddpm", "ddim", "euler", "dpmpp_2m"]] = None  # None: the model's own default
    loss_timesteps: list[int] = [100, 300, 500, 700, 900]  # validation loss at fixed timesteps
    heldout: int = Field(0, ge=0)  # images kept out of training for the validation loss


class DreamBoothConfig(Strict):
    """Instance images (data.path, data.instance_prompt with the trigger word) trained together with
    class images (data.class_path, data.class_prompt) that keep the class from drifting: every
    instance sample is paired with one class sample, and the loss is the instance mean plus
    prior_loss_weight times the class mean."""
    train: Literal["lora", "full"] = "lora"  # what trains: a LoRA (the `lora` section) or the whole U-Net
    prior_preservation: bool = True  # false: instance images only (then leave data.class_path unset)
    prior_loss_weight: float = Field(1.0, ge=0)  # the class images' loss weight
    num_class_images: int = Field(100, ge=0)  # the base draws the rest when data.class_path has fewer
    class_steps: int = Field(25, ge=1)  # sampling steps for generated class images
    class_guidance_scale: Optional[float] = None  # None: the model family's default
    class_batch_size: int = Field(4, ge=1)  # with train.seed, fixes which picture each index gets


class FullConfig(Strict):
    """Every U-Net weight trains (use train.optimizer.name: adamw8bit and gradient checkpointing to
    fit memory). The end of the run writes model/ (diffusers; with train.ema_decay its unet/ is the
    EMA and unet_raw/ the raw weights) and model.safetensors; checkpoints hold unet/ only, and
    `python -m trainers.full CHECKPOINT --out DIR` exports one completely."""
    single_file: bool = True  # also write model.safetensors in the original layout


class InpaintConfig(Strict):
    """9-channel inpainting U-Net: noisy latent, mask and masked-image latent. Starts from an
    inpainting checkpoint, or widens a 4-channel U-Net's conv_in (new channels at zero); the whole
    U-Net trains and exports as the full fine-tune does (the `full` section applies). Needs
    data.cache.inpaint_masks > 0."""
    full_mask_share: float = Field(0.1, ge=0, le=1)  # samples trained with the whole image masked (plain generation)
    validation_image: Optional[str] = None  # a picture to inpaint at validation; None: full-mask (plain) samples
    validation_mask: Optional[str] = None  # its mask, white = repaint; set both or neither

    @model_validator(mode="after")
    def _image_and_mask_together(self):
        if (self.validation_image is None) != (self.validation_mask is None):
            raise ValueError("set both inpaint.validation_image and inpaint.validation_mask, or neither")
        return self


class ControlNetConfig(Strict):
    """A ControlNet copied from the base U-Net's encoder; the U-Net stays frozen. Needs data.cache.control
    (canny, or folder with data.cache.control_dir). Exports controlnet/ (diffusers) and controlnet.safetensors
    (the original layout)."""
    # the conditioning-image encoder's widths; 2**(n-1) must equal the VAE's downscale (SD: 8, four widths)
    conditioning_embedding_out_channels: list[int] = Field([16, 32, 96, 256], min_length=1)
    init: Optional[str] = None  # a diffusers ControlNet folder to continue from, instead of copying the U-Net
    conditioning_scale: float = 1.0  # scale of the residuals in validation samples
    validation_image: Optional[str] = None  # control image for validation samples; default: a training image's map


class VaeConfig(Strict):
    """Train the KL autoencoder itself (the tiny world's base): L1 reconstruction plus a small KL term."""
    kl_weight: float = Field(1e-6, ge=0)  # the KL term's weight
    l2_weight: float = Field(0.0, ge=0)  # an optional MSE term beside L1


class LoggingConfig(Strict):
    """Where the scalars and validation grids go (accelerate's trackers). TensorBoard writes to
    output_dir/logs; Weights & Biases (pip install wandb) to its own service, or with WANDB_MODE=offline
    to output_dir/logs/wandb for a later `wandb sync`."""
    report_to: list[Literal["tensorboard", "wandb"]] = ["tensorboard"]  # the trackers to report to
    project: str = "ldm-tune"  # the W&B project (and TensorBoard's run folder name)
    run_name: Optional[str] = None  # the W&B run's name; default: the output_dir's name


class Config(Strict):
    # what to train (each method has its section below)
    method: Literal["lora", "dreambooth", "full", "inpaint", "controlnet", "vae"]
    model: ModelConfig
    data: DataConfig
    output_dir: str  # checkpoints, exports, logs, samples and the run's config.yaml go here (one run per folder)
    train: TrainConfig
    loss: LossConfig = LossConfig()
    lora: LoraConfig = LoraConfig()
    validation: ValidationConfig = ValidationConfig()
    dreambooth: DreamBoothConfig = DreamBoothConfig()
    full: FullConfig = FullConfig()
    inpaint: InpaintConfig = InpaintConfig()
    controlnet: ControlNetConfig = ControlNetConfig()
    vae: VaeConfig = VaeConfig()
    logging: LoggingConfig = LoggingConfig()


def read_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Config:
    return load_config(Config, path, overrides)
