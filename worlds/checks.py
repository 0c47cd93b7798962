"""Measured proof that each training method learns, on the tiny world.

    python -m worlds.checks full|dreambooth|inpaint|controlnet|all [--world tiny-world|test-world]
                            [--runs runs] [--data data] [--base PATH] [--samples N] [--fresh] [key=value ...]

Every check starts from a tiny world's base (`worlds.build` builds it at <runs>/<world>/base,
or --base names one), trains its method through the real entry point (`python -m trainers
configs/tiny/world_<method>.yaml`, then the world's overrides for the method, then the key=value
given here), samples the model before and after for prompts whose answer is known, and scores the
pictures with the tiny world's detector. It prints the scores and writes them to
<runs>/<world>/checks/<method>.json, with a picture grid <method>.png beside.

- full: the whole U-Net trained on the demo's concept pictures (its held-out shape, captioned with
  the trigger word "zorb", beside as many ordinary pictures that keep the base's prompts in place):
  how often "zorb" prompts draw the new shape, and how often plain prompts still draw the asked
  shape and colour.
- dreambooth: a LoRA on one subject (red zorbs on white, "a red zorb on a white background") with
  class pictures the base draws for "a red diamond on a white background": the trigger draws the
  subject, and the class prompt keeps drawing what the base drew. The same run without prior
  preservation shows what the class pictures buy: there the subject leaks into the class prompt.
- inpaint: the base widened to 9 channels and trained on cached masks. On held-out pictures the
  shape's box is masked and another shape asked for: is it drawn inside the region in the asked
  colour, and do the pixels outside stay? "Before" is the widened, untrained model: its new input
  channels are zero, so it is the 4-channel base generating from the prompt alone.
- controlnet: a ControlNet trained on shape-mask maps (white shape on black, from each picture's ground
  truth). Masks rather than Canny edges: the map then says exactly what the check measures, where the
  shape lies, and a 32 px picture gives Canny only a thin outline (the canny source has its own tests).
  On held-out scenes: overlap (IoU) of the drawn shape with the scene's true mask, against the base
  alone with the same prompts and seeds.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .build import CONFIGS, base_pictures, build_base, make_pictures, run_stage
from .demo import TRIGGER, make_concept
from .world import HELD_OUT, SIZE, TINY_WORLD, WORLDS, World

HELDOUT_SEED = 7  # scenes no method trained on (the base pictures use seed 0, the demo's concept seed 1)
INSTANCE_COLOUR, INSTANCE_BACKGROUND = "red", "white"  # DreamBooth: the subject; its class shape is the world's
INSTANCE_PICTURES = 8
REGION_MARGIN = 2  # pixels the repainted region reaches past the erased shape's box
ERASED_MAX_FRAC = 0.55  # held-out shapes to erase are at most this share of the side: the region stays
# within the training masks' sizes and leaves at least half the picture to keep


@dataclass
class Setup:
    world: World
    base: Path  # the base model folder every check starts from
    data: Path  # the pictures go to <data>/<world>
    out: Path  # <runs>/<world>/checks: runs, caches, scores and pictures
    overrides: Sequence[str] = ()  # key=value for every training run, after the check's own
    samples: int | None = None  # pictures behind each measured share; None: the world's
    fresh: bool = False  # retrain instead of resuming a finished run
    seconds: dict[str, float] = field(default_factory=dict)  # training time per run
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self):
        self.samples = self.samples or self.world.samples

    def train(self, config: str, name: str, data: Path, *extra: str) -> Path:
        """Run configs/tiny/world_<config>.yaml into <out>/<name>, timed under `name`."""
        out = self.out / name
        if self.fresh:
            shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        run_stage(CONFIGS / f"world_{config}.yaml", f"model.path={self.base}", f"data.path={data}",
                  f"data.cache.dir={self.out / 'cache' / name}", f"output_dir={out}", *extra,
                  *self.world.run_overrides(config), *self.overrides)
        self.seconds[name] = round(time.perf_counter() - started, 1)
        return out


def load(model: Path):
    from ldmcore.checkpoints import load_components

    return load_components(model, dtype=torch.float32)


def finish(setup: Setup, check: str, columns: Sequence[str], scores: dict[str, Sequence[float]],
           picture: Image.Image, **notes) -> dict:
    """Write <check>.json and <check>.png, print the table; rows whose label says 'levels' are 0..255
    pixel levels, the others shares."""
    summary = {"check": check, "world": setup.world.name, "samples": setup.samples, "columns": list(columns),
               "scores": {label: dict(zip(columns, values, strict=True)) for label, values in scores.items()},
               **notes, "training_seconds": setup.seconds,
               "total_seconds": round(time.perf_counter() - setup.started, 1)}
    (setup.out / f"{check}.json").write_text(json.dumps(summary, indent=2) + "\n")
    picture.save(setup.out / f"{check}.png")
    width, cell = max(map(len, scores)), max(len(c) for c in columns) + 2
    print(f"\ncheck {check} ({setup.samples} pictures per score)\n  {'':{width}}" + "".join(f"{c:>{cell}}" for c in columns))
    for label, values in scores.items():
        cells = "".join(f"{v:{cell}.1f}" if "levels" in label else f"{v:{cell}.0%}" for v in values)
        print(f"  {label:{width}}{cells}")
    for key, value in notes.items():
        print(f"  {key}: {value}")
    print(f"  training seconds: {setup.seconds}, whole check: {summary['total_seconds']} s\n  scores: {setup.out / (check + '.json')}, picture: {setup.out / (check + '.png')}")
    return summary


def seeds_for(n_prompts: int, samples: int) -> list[int]:
    return list(range(max(1, math.ceil(samples / n_prompts))))


# -- full fine-tune ---------------------------------------------------------------------------------


def check_full(setup: Setup) -> dict:
    from .evaluate import asks, concept_asks, grid, score

    pictures, concept = make_concept(setup.world, setup.data), setup.world.concept
    trigger, plain = concept_asks(TRIGGER, concept, setup.world), asks(world=setup.world)
    t_seeds, p_seeds = seeds_for(len(trigger), setup.samples), seeds_for(len(plain), setup.samples)

    def measure(parts):
        return score(parts, trigger, t_seeds, setup.world), score(parts, plain, p_seeds, setup.world)

    before = measure(load(setup.base))
    after = measure(load(setup.train("full", "full", pictures) / "model"))
    picture = grid([before[0].pictures[0], after[0].pictures[0], before[1].pictures[0][:8], after[1].pictures[0][:8]],
                   [f"before: {TRIGGER}", f"after: {TRIGGER}", "before: plain", "after: plain"])
    return finish(setup, "full", ["before", "after"], {
        f'"{TRIGGER}" prompts draw {concept.phrase()}': [before[0].of(concept.kind), after[0].of(concept.kind)],
        f"... in the asked {concept.other_kind}": [before[0].both, after[0].both],
        "plain prompts drawn right": [before[1].both, after[1].both],
    }, picture)


# -- DreamBooth -------------------------------------------------------------------------------------


def make_instances(world: World, data: Path) -> Path:
    """A few pictures of one subject: the held-out shape in one colour on one plain background,
    captioned with the trigger word."""
    return make_pictures(data / world.name / f"{TRIGGER}-{INSTANCE_COLOUR}-{INSTANCE_BACKGROUND}",
                         lambda: world.scenes(INSTANCE_PICTURES, seed=2, shapes=(HELD_OUT,), colours=(INSTANCE_COLOUR,),
                                              backgrounds=(INSTANCE_BACKGROUND,), textured_share=0.0),
                         words={HELD_OUT: TRIGGER})


def check_dreambooth(setup: Setup) -> dict:
    from .detect import detect
    from .evaluate import Ask, grid, score, with_lora

    instance_prompt = f"a {INSTANCE_COLOUR} {TRIGGER} on a {INSTANCE_BACKGROUND} background"
    world = setup.world
    class_shape = world.class_shape
    class_prompt = f"a {INSTANCE_COLOUR} {class_shape} on a {INSTANCE_BACKGROUND} background"
    if INSTANCE_COLOUR not in world.colours or class_shape not in world.shapes or INSTANCE_BACKGROUND not in world.backgrounds:
        raise SystemExit(f"the DreamBooth check asks for a {INSTANCE_COLOUR} {class_shape} on {INSTANCE_BACKGROUND}; "
                         f"world {world.name} does not draw that")
    instances = make_instances(world, setup.data)
    prompts = [f"data.instance_prompt={instance_prompt}"]
    n = setup.samples
    trigger = [Ask(instance_prompt, HELD_OUT, INSTANCE_COLOUR)] * n
    klass = [Ask(class_prompt, class_shape, INSTANCE_COLOUR)] * n

    def measure(parts):
        t, c = score(parts, trigger, [0], world), score(parts, klass, [0], world)
        leak = float(np.mean([detect(p).shape == HELD_OUT for p in c.pictures[0]]))
        return t.shape, t.both, c.both, leak, t.pictures[0], c.pictures[0]

    class_images = setup.out / "dreambooth-class"  # drawn by the base at the start of the run
    if setup.fresh:
        shutil.rmtree(class_images, ignore_errors=True)
    base = load(setup.base)
    runs = {
        "before": None,
        "with prior": setup.train("dreambooth", "dreambooth", instances, *prompts,
                                  f"data.class_prompt={class_prompt}", f"data.class_path={class_images}"),
        "no prior": setup.train("dreambooth", "dreambooth-no-prior", instances, *prompts,
                                "dreambooth.prior_preservation=false", "data.class_path=null", "data.class_prompt=null"),
    }
    results = {name: measure(base if out is None else with_lora(base, out / "pytorch_lora_weights.safetensors"))
               for name, out in runs.items()}
    rows, labels = [], []
    for name, (*_, subject_pictures, class_pictures) in results.items():
        rows += [subject_pictures[:8], class_pictures[:8]]
        labels += [f"{name}: {TRIGGER}", f"{name}: {class_shape}"]
    return finish(setup, "dreambooth", ["before", "after (prior pres.)", "after (no prior pres.)"], {
        f'"{instance_prompt}" draws a {HELD_OUT}': [r[0] for r in results.values()],
        f"... in {INSTANCE_COLOUR}": [r[1] for r in results.values()],
        f'"{class_prompt}" draws a {INSTANCE_COLOUR} {class_shape}': [r[2] for r in results.values()],
        f"... draws a {HELD_OUT} instead (the subject leaks into its class)": [r[3] for r in results.values()],
    }, grid(rows, labels))


# -- inpainting -------------------------------------------------------------------------------------


def erase_asks(n: int, world: World = TINY_WORLD):
    """Held-out scenes, each with the region to repaint (the shape's box and a margin, (H, W) bool) and
    an ask for another shape in another colour of the world on the same background."""
    from .evaluate import Ask

    shapes, colours = world.shapes, world.colours
    out = []
    for i, scene in enumerate(world.scenes(n, HELDOUT_SEED, max_frac=ERASED_MAX_FRAC)):
        x0, y0, x1, y1 = scene.box
        m = REGION_MARGIN
        region = np.zeros((SIZE, SIZE), dtype=bool)
        region[max(y0 - m, 0):y1 + m, max(x0 - m, 0):x1 + m] = True
        shape = shapes[(shapes.index(scene.shape) + 1 + i % (len(shapes) - 1)) % len(shapes)]
        colour = colours[(colours.index(scene.colour) + 1 + i % (len(colours) - 1)) % len(colours)]
        out.append((scene, region, Ask(f"a {colour} {shape} on a {scene.background} background", shape, colour)))
    return out


def check_inpaint(setup: Setup) -> dict:
    from ldmcore.inpaint import inpaint, widen_conv_in

    from .evaluate import grid, repaint_score
    from .pictures import render

    pictures = base_pictures(setup.world, setup.data)
    items = erase_asks(setup.samples, setup.world)
    originals = [render(scene, SIZE)[0] for scene, _, _ in items]
    masks = [Image.fromarray(region.astype(np.uint8) * 255, "L") for _, region, _ in items]

    def measure(parts):
        with torch.no_grad():
            out = inpaint(parts, [a.prompt for _, _, a in items], originals, masks, seed=0, **setup.world.sampling)
        scores = [repaint_score(p, o, region, a.shape, a.colour) for p, o, (_, region, a) in zip(out, originals, items)]
        return (float(np.mean([s.drawn for s in scores])), float(np.mean([s.outside_change for s in scores])), out)

    base = load(setup.base)
    widened = copy.deepcopy(base)
    widen_conv_in(widened.denoiser)  # the new channels' weights are zero: the base, blind to the picture
    before = measure(widened)
    after = measure(load(setup.train("inpaint", "inpaint", pictures) / "model"))
    floor = vae_round_trip_change(base, originals, [region for _, region, _ in items])
    erased = [Image.composite(Image.new("RGB", o.size, (127, 127, 127)), o, m) for o, m in zip(originals, masks)]
    picture = grid([originals[:8], erased[:8], before[2][:8], after[2][:8]],
                   ["held-out picture", "region to repaint", "before (base)", "after"])
    return finish(setup, "inpaint", ["before", "after"], {
        "asked shape+colour drawn inside the region": [before[0], after[0]],
        "outside the region: mean change (levels)": [before[1], after[1]],
    }, picture, vae_round_trip_levels=round(floor, 2), asks=[a.prompt for _, _, a in items[:4]])


def vae_round_trip_change(parts, originals: Sequence[Image.Image], regions: Sequence[np.ndarray]) -> float:
    """The outside change a perfect inpainter still shows: the pictures through the VAE and back."""
    from ldmcore.pipeline import images_to_tensor

    vae = parts.vae
    with torch.no_grad():
        x = images_to_tensor(list(originals), vae.device).to(vae.dtype)  # (b, 3, H, W) in [-1, 1]
        y = vae.decode(vae.encode(x).mode()).clamp(-1, 1)
    diff = ((y - x).abs() * 127.5).permute(0, 2, 3, 1).cpu().numpy()  # (b, H, W, 3) levels
    keep = ~np.stack(regions)  # (b, H, W)
    return float(diff[keep].mean())


# -- ControlNet -------------------------------------------------------------------------------------


def shape_map(scene) -> Image.Image:
    """A scene's control map: its shape's mask, white on black, RGB."""
    from .pictures import shape_mask

    mask = shape_mask(scene.shape, scene.box, SIZE).astype(np.uint8) * 255  # (H, W)
    return Image.fromarray(np.repeat(mask[..., None], 3, axis=-1), "RGB")


def make_shape_maps(folder: Path, pictures: Path) -> Path:
    """One map per picture of a tiny-world folder, named by the picture's stem (data.cache.control: folder)."""
    from .pictures import read_truth

    done = folder / "complete"
    if not done.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        for file, scene in read_truth(pictures):
            shape_map(scene).save(folder / (Path(file).stem + ".png"))
        done.write_text("")
    return folder


def check_controlnet(setup: Setup) -> dict:
    from ldmcore.controlnet import ControlNet, generate_controlled

    from .detect import detect
    from .evaluate import grid, mask_iou, sample
    from .pictures import render, shape_mask

    pictures = base_pictures(setup.world, setup.data)
    maps = make_shape_maps(pictures.with_name("base-shape-maps"), pictures)
    held = setup.world.scenes(setup.samples, HELDOUT_SEED)
    prompts = [s.caption() for s in held]
    controls = [shape_map(s) for s in held]

    def measure(out):
        ious = [mask_iou(p, shape_mask(s.shape, s.box, SIZE)) for p, s in zip(out, held)]
        right = [detect(p).matches(s.shape, s.colour) for p, s in zip(out, held)]
        return float(np.mean(ious)), float(np.mean(right)), out

    base = load(setup.base)
    before = measure(sample(base, prompts, [0], setup.world)[0])
    controlnet = ControlNet.from_pretrained(setup.train("controlnet", "controlnet", pictures,
                                                        f"data.cache.control_dir={maps}") / "controlnet")
    with torch.no_grad():
        after = measure(generate_controlled(base, controlnet.eval(), prompts, controls, seed=0, **setup.world.sampling))
    picture = grid([controls[:8], [render(s, SIZE)[0] for s in held[:8]], before[2][:8], after[2][:8]],
                   ["control map", "ground truth", "base alone", "with ControlNet"])
    return finish(setup, "controlnet", ["base alone", "with ControlNet"], {
        "IoU of the drawn shape with the map's": [before[0], after[0]],
        "asked shape+colour drawn": [before[1], after[1]],
    }, picture)


CHECKS = {"full": check_full, "dreambooth": check_dreambooth, "inpaint": check_inpaint, "controlnet": check_controlnet}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m worlds.checks", description=__doc__.split("\n\n")[0])
    p.add_argument("method", choices=[*CHECKS, "all"])
    p.add_argument("overrides", nargs="*", metavar="key=value", help="passed to every training run, after the check's own")
    p.add_argument("--world", choices=sorted(WORLDS), default=TINY_WORLD.name, help="which tiny world (test-world: the tests' smaller one)")
    p.add_argument("--runs", default="runs", help="the base and the checks go to <runs>/<world>")
    p.add_argument("--data", default="data", help="the pictures go to <data>/<world>")
    p.add_argument("--base", help="start from this model folder instead of building <runs>/<world>/base")
    p.add_argument("--samples", type=int, help="pictures behind each measured share (default: the world's)")
    p.add_argument("--fresh", action="store_true", help="retrain even when a check's run finished before")
    args = p.parse_intermixed_args(argv)  # key=value may come before or after the options

    world = WORLDS[args.world]
    runs, data = Path(args.runs).resolve(), Path(args.data).resolve()
    base = Path(args.base).resolve() if args.base else build_base(world, runs, data)
    if not (base / "model_index.json").is_file():
        raise SystemExit(f"--base {args.base}: not a model folder (no model_index.json); build one with "
                         "`python -m worlds.build` or leave --base out")
    out = runs / world.name / "checks"
    out.mkdir(parents=True, exist_ok=True)
    for name in CHECKS if args.method == "all" else [args.method]:
        setup = Setup(world, base, data, out, tuple(args.overrides), args.samples, args.fresh)
        CHECKS[name](setup)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
