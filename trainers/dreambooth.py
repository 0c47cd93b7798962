"""DreamBooth (Ruiz et al. 2022): teach the model one subject from a few pictures captioned with a
trigger word (`data.instance_prompt`, e.g. "a photo of sks dog"), while prior preservation keeps
the class ("a photo of a dog") from collapsing onto that subject.

What trains is a LoRA (`dreambooth.train: lora`, the `lora` section, exports as LoRA does) or the
whole U-Net (`train: full`, exports as the full fine-tune does); DreamBooth adds the data and the loss:

- Class images live in `data.class_path`; when it holds fewer than `dreambooth.num_class_images`,
  the base model draws the rest from `data.class_prompt` (seeded by `train.seed`) before the cache
  is built, so the cache holds instance and class images side by side.
- The loop's batches hold instance images only. Each instance sample brings one class sample, drawn
  from its own per-sample generator (so resume and process count do not change the draw), from the
  class images in the same bucket where there are any. A batch of b instance images thus trains
  with b class images, and the loss is DreamBooth's:
      mean over instance samples + dreambooth.prior_loss_weight * mean over class samples,
  with the weight applied per sample through `sample_weights` (it stacks with min-SNR weights).
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch.utils.data import Dataset

from data_tools.schema import ConfigError

from .batch import collate, concat, to_device
from .full import FullMethod
from .lora import LoraMethod
from .method import Method

log = logging.getLogger(__name__)


class DreamBoothMethod(Method):
    """`DreamBoothMethod(config, components)` builds the variant that `dreambooth.train` names."""

    name = "dreambooth"

    def __new__(cls, config, components):
        variant = {"lora": LoraDreamBooth, "full": FullDreamBooth}[config.dreambooth.train] if cls is DreamBoothMethod else cls
        return super().__new__(variant)

    def __init__(self, config, components):
        check_config(config)
        super().__init__(config, components)
        self.prior = config.dreambooth.prior_preservation
        self.cache = None  # the whole cached dataset, instance and class images
        self.class_items: dict[tuple[int, int], list[int]] = {}  # bucket (w, h) -> class items in it

    # -- data ----------------------------------------------------------------------------------

    def dataset(self, device, progress):
        if self.prior:
            self._ensure_class_images(device, progress)
        cache, keys = super().dataset(device, progress)
        roles = [item.role for item in cache.plan.items]
        instances = [i for i, role in enumerate(roles) if role != "class"]
        if not instances:
            raise ConfigError(f"data.path={self.config.data.path or 'the instance subsets'}: no usable instance images")
        for i, role in enumerate(roles):
            if role == "class":
                self.class_items.setdefault(tuple(cache.plan.items[i].bucket), []).append(i)
        if self.prior and not self.class_items:
            raise ConfigError(f"{class_source(self.config.data)[0]}: no usable class images")
        self.cache = cache
        return InstanceImages(cache, instances), [keys[i] for i in instances]

    def _ensure_class_images(self, device, progress) -> None:
        """Fill data.class_path up to num_class_images with the base model, on the main process."""
        from data_tools.class_images import ensure_class_images
        from data_tools.precompute import process_state

        data, db, state = self.config.data, self.config.dreambooth, process_state()
        class_path, class_prompt = class_source(data)
        if state.is_main_process:
            self.components.denoiser.to(device)  # the VAE and text encoder are there already
            with torch.no_grad():
                ensure_class_images(self.components, class_prompt, class_path, db.num_class_images,
                                    seed=self.config.train.seed, batch_size=db.class_batch_size,
                                    steps=db.class_steps, guidance_scale=db.class_guidance_scale,
                                    size=_class_image_side(self.components, data.resolution), progress=progress)
        state.wait_for_everyone()

    # -- one step ------------------------------------------------------------------------------

    def loss(self, models, batch, empty_text, generators):
        if not self.prior:
            return super().loss(models, batch, empty_text, generators)

        device, b = batch["mean"].device, len(generators)
        h, w = batch["mean"].shape[-2:]
        factor = self.components.vae_scale_factor
        pool = self.class_items.get((w * factor, h * factor)) or sorted(i for p in self.class_items.values() for i in p)
        groups: dict[tuple[int, ...], list[tuple[dict, torch.Generator]]] = {}
        for g in generators:
            cg = torch.Generator().manual_seed(class_seed(g.initial_seed()))
            item = self.cache[pool[int(torch.randint(len(pool), (), generator=cg))]]
            groups.setdefault(tuple(item["mean"].shape), []).append((item, cg))

        # instance samples and the class samples of the same size go through the U-Net together
        parts = [(batch, list(generators))]
        for shape, members in groups.items():
            classes = to_device(collate([item for item, _ in members]), device)
            gens = [g for _, g in members]
            if shape == tuple(batch["mean"].shape[1:]):
                parts[0] = (concat(batch, classes), parts[0][1] + gens)
            else:
                parts.append((classes, gens))
        # each part's loss is a mean over its samples; weighing it by len/b makes the total
        # (sum of weighted per-sample losses) / b = instance mean + prior_loss_weight * class mean
        return sum(len(gens) / b * super(DreamBoothMethod, self).loss(models, part, empty_text, gens)
                   for part, gens in parts)

    def sample_weights(self, batch):
        weight = self.config.dreambooth.prior_loss_weight
        return torch.where(batch["is_class"], weight, 1.0).float()


class LoraDreamBooth(DreamBoothMethod, LoraMethod):
    """DreamBooth training a LoRA (and, with lora.text_encoder, the text encoder's LoRA)."""


class FullDreamBooth(DreamBoothMethod, FullMethod):
    """DreamBooth training the whole U-Net."""


def class_source(data) -> tuple[str | None, str | None]:
    """(class folder, class prompt): data.class_path and data.class_prompt, or with data.subsets the class
    subset's path and caption."""
    if not data.subsets:
        return data.class_path, data.class_prompt
    classes = [s for s in data.subsets if s.role == "class"]
    if len(classes) > 1:
        raise ConfigError("method dreambooth takes one subset with role: class (the folder it tops up); "
                          f"data.subsets has {len(classes)}")
    return (classes[0].path, classes[0].caption) if classes else (None, None)


def check_config(config) -> None:
    data, db = config.data, config.dreambooth
    if data.subsets:  # each instance subset names its subject in its caption; one class subset, or none
        nameless = [i for i, s in enumerate(data.subsets) if s.role == "instance" and not s.caption]
        if nameless:
            raise ConfigError(f"method dreambooth: give data.subsets[{nameless[0]}].caption, the caption with the "
                              "trigger word (e.g. 'a photo of sks dog') for its pictures that have none")
        class_path, class_prompt = class_source(data)
        if db.prior_preservation and not (class_path and class_prompt):
            raise ConfigError("dreambooth.prior_preservation: add a subset with role: class and its caption (e.g. "
                              "'a photo of a dog'; missing class images are generated into its folder), or "
                              "dreambooth.prior_preservation=false")
        if not db.prior_preservation and class_path:
            raise ConfigError("dreambooth.prior_preservation is false but data.subsets has a class subset: remove "
                              "it or turn prior preservation on")
        if db.train == "full" and config.lora.text_encoder:
            raise ConfigError("lora.text_encoder trains the text encoder's LoRA, which needs dreambooth.train=lora")
        return
    if not data.instance_prompt:
        raise ConfigError("method dreambooth: set data.instance_prompt, the caption with the trigger word "
                          "(e.g. 'a photo of sks dog')")
    if db.prior_preservation:
        if not data.class_prompt:
            raise ConfigError("dreambooth.prior_preservation: set data.class_prompt (e.g. 'a photo of a dog'), "
                              "or dreambooth.prior_preservation=false")
        if not data.class_path:
            raise ConfigError("dreambooth.prior_preservation: set data.class_path, a folder for the class images "
                              "(missing ones are generated into it), or dreambooth.prior_preservation=false")
    elif data.class_path or data.class_prompt:
        raise ConfigError("dreambooth.prior_preservation is false but data.class_path / data.class_prompt are set: "
                          "unset them (data.class_path=null data.class_prompt=null) or turn prior preservation on")
    if db.train == "full" and config.lora.text_encoder:
        raise ConfigError("lora.text_encoder trains the text encoder's LoRA, which needs dreambooth.train=lora")


def class_seed(instance_seed: int) -> int:
    """The seed of the class sample paired with an instance sample: a hash of the instance's seed."""
    return int(np.random.SeedSequence([instance_seed, 1]).generate_state(1, np.uint64)[0])


def _class_image_side(components, resolution: int) -> int:
    """Class images are drawn at the training resolution, rounded down to what the model can draw."""
    multiple = components.vae_scale_factor * components.family.latent_multiple
    return max(multiple, resolution // multiple * multiple)


class InstanceImages(Dataset):
    """The instance images of the cache: what the loop samples batches from."""

    def __init__(self, cache, indices: list[int]):
        self.cache, self.indices = cache, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.cache[self.indices[i]]

    @property
    def buckets(self) -> list[tuple[int, int]]:
        every = self.cache.buckets
        return [every[i] for i in self.indices]

    @property
    def repeats(self) -> list[int]:
        return [self.cache.repeats[i] for i in self.indices]

    @property
    def subsets(self) -> list[int]:
        return [self.cache.subsets[i] for i in self.indices]

    def set_epoch(self, epoch: int) -> None:
        self.cache.set_epoch(epoch)

    def empty_text(self) -> dict[str, torch.Tensor]:
        return self.cache.empty_text()
