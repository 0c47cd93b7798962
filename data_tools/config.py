"""The `model` and `data` sections of a config, as the precompute command and the trainers read them."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from .schema import Strict


class ModelConfig(Strict):
    path: str  # a diffusers folder or an original single file (.safetensors / .ckpt)
    tokenizer: Optional[str] = None  # single files carry none: a tokenizer/ folder of any SD 1.x/2.x model
    prediction_type: Optional[Literal["epsilon", "v_prediction", "sample"]] = None  # override the checkpoint's
    # a diffusers model folder for a single file: its configs describe the file (SD/SDXL of another shape), and
    # for a Flux transformer file it supplies the VAE, text encoders, tokenizers and scheduler that ship apart
    config: Optional[str] = None

    def load(self, dtype=None, device="cpu"):
        """The model's Components, float32 by default."""
        import torch

        from ldmcore.checkpoints import load_components

        return load_components(self.path, dtype=dtype or torch.float32, device=device, tokenizer=self.tokenizer,
                               prediction_type=self.prediction_type, config=self.config)


class CacheConfig(Strict):
    dir: Optional[str] = None  # default: <data.path>/.ldm_cache (or the run's output_dir when unwritable)
    flip: bool = False  # also cache the mirrored picture; training then picks one of the two per step
    crop: Literal["center", "random"] = "center"  # random crops are drawn once, from data.seed, at precompute
    inpaint_masks: int = Field(0, ge=0)  # K mask variants per image, for 9-channel inpainting
    # with inpaint_masks: how often each kind of mask is drawn
    mask_weights: dict[str, float] = {"rectangle": 1.0, "ellipse": 1.0, "brush": 2.0, "full": 0.5}
    control: Optional[Literal["canny", "folder"]] = None  # ControlNet conditioning images
    control_dir: Optional[str] = None  # with control: folder, conditioning images matched by file stem
    canny_low: int = Field(100, ge=0)  # with control: canny, the hysteresis thresholds
    canny_high: int = Field(200, ge=0)  # (the upper one)
    batch_size: int = Field(8, ge=1)  # pictures per VAE batch while encoding
    num_workers: int = Field(2, ge=0)  # DataLoader workers decoding while the VAE encodes
    shard_entries: int = Field(256, ge=1)  # entries per cache file


class CaptionTags(Strict):
    """Captions made of comma-separated tags ("1girl, red hair, smile, outdoors"), changed each time a
    picture is seen. The text cache holds `variants` versions of each caption, drawn once from data.seed;
    each epoch picks one per picture, so the text encoders stay off the device and resume stays exact
    (the cost: `variants` times the text cache and its encoding time)."""
    shuffle: bool = False  # shuffle the tags after the first keep_tokens
    keep_tokens: int = Field(0, ge=0)  # the first N tags stay in place (a trigger word, a character name)
    dropout: float = Field(0.0, ge=0, lt=1)  # each tag after the first keep_tokens is left out with this chance
    prefix: str = ""  # put before the caption as it is (say "zorb, ")
    suffix: str = ""  # put after it
    variants: int = Field(8, ge=1)  # versions of each caption in the text cache


class SubsetConfig(Strict):
    """One folder of pictures among several in a run (kohya's dataset subsets, OneTrainer's concepts)."""
    path: str  # a folder of images, captioned as data.path is
    repeats: int = Field(1, ge=1)  # how many times an epoch visits each of its pictures
    role: Literal["instance", "class"] = "instance"  # class: DreamBooth's prior-preservation pictures
    caption: Optional[str] = None  # the caption of its pictures that have none (say, the trigger word)
    tags: Optional[CaptionTags] = None  # tag captions: shuffled, kept, dropped, prefixed (this subset's)
    resolution: Optional[int] = Field(None, ge=16)  # its own bucket area (resolution**2); default data.resolution


class DataConfig(Strict):
    # a folder of images (sidecar captions or metadata.jsonl/csv) or a saved datasets folder; or data.subsets
    path: Optional[str] = None
    # several folders, each with its repeats and role, instead of data.path (and data.class_path)
    subsets: list[SubsetConfig] = []
    tags: Optional[CaptionTags] = None  # tag captions of data.path's pictures (a subset has its own)
    resolution: int = Field(512, ge=16)  # bucket area is resolution**2; 512 for SD 1.x, 768 for SD 2.x
    bucket_step: int = Field(64, ge=8)  # bucket sides are multiples of this (64 for SD; Flux needs 16)
    no_upscale: bool = False  # small images get a smaller bucket instead of being enlarged
    min_side: int = Field(256, ge=1)  # pictures whose shorter side is smaller are skipped
    max_aspect: float = Field(4.0, ge=1.0)  # pictures longer than this ratio are skipped
    instance_prompt: Optional[str] = None  # DreamBooth, and the caption for images without one
    class_path: Optional[str] = None  # DreamBooth: the class (prior preservation) pictures, topped up by sampling
    class_prompt: Optional[str] = None  # DreamBooth: their caption
    background: tuple[int, int, int] = (255, 255, 255)  # what transparent pixels are composited onto
    max_windows: int = Field(1, ge=1)  # 77-token windows per caption; 1 truncates, as SD was trained
    clip_skip: int = Field(0, ge=0)  # read CLIP this many layers before the last (SD 1.x anime models: 1)
    seed: int = 0  # random crops and the order of pictures
    # masked loss: the loss is weighed by a mask per picture (white trains, black is ignored), from the
    # picture's alpha channel or from a folder of masks named after the pictures (outside data.path)
    loss_mask: Optional[Literal["alpha", "folder"]] = None
    loss_mask_dir: Optional[str] = None  # with loss_mask: folder
    cache: CacheConfig = CacheConfig()

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (not self.subsets):
            raise ValueError("give data.path (one folder) or data.subsets (several), one of the two")
        if self.subsets and (self.class_path or self.class_prompt):
            raise ValueError("with data.subsets, class pictures are a subset with role: class (and its caption), "
                             "not data.class_path")
        return self

    @model_validator(mode="after")
    def _mask_folder_with_its_mode(self):
        if (self.loss_mask == "folder") != (self.loss_mask_dir is not None):
            raise ValueError("data.loss_mask: folder and data.loss_mask_dir go together (the folder of masks, "
                             "named after the pictures)")
        return self
