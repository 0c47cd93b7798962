"""`make demo`: teach the tiny base something it has never seen (a shape, or a colour), and measure that it learned.

1. the tiny base (built once by `worlds.build`, reused after);
2. a small set of pictures of the world's concept (`World.concept`: crosses, a shape held out of the
   base's data; the Flux test world's is a colour, green) captioned with the trigger word "zorb" in the
   concept's place: "a red zorb on a white background" ("a zorb circle on ..."), beside as many ordinary
   pictures (regularisation, so that ordinary prompts keep their meaning);
3. the scores before: how often the base draws the concept for "zorb" prompts, and how often it draws
   the asked shape and colour for ordinary prompts;
4. a LoRA trained through `accelerate launch -m trainers` (configs/tiny/demo_lora.yaml), which
   exports the diffusers/peft and the kohya (A1111/ComfyUI) files and logs to TensorBoard;
5. the scores after, with the kohya file merged into the base, a before/after picture and a
   one-screen summary (also saved as summary.json).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from .build import CONFIGS, ROOT, build_base, make_pictures, run_stage
from .world import TINY_WORLD, WORLDS, World

TRIGGER = "zorb"
CONCEPT_PICTURES = 48
REGULARISATION = 48  # ordinary pictures trained beside them (see make_concept)


def make_concept(world: World, data: Path | str) -> Path:
    """CONCEPT_PICTURES of the world's concept under the trigger word, and as many ordinary pictures of
    the base's world with their usual captions: regularisation pictures, without which the LoRA learns
    "draw crosses" for every prompt rather than for "zorb" (measured on a 2000-step base: see
    configs/tiny/demo_lora.yaml)."""
    concept = world.concept
    return make_pictures(Path(data).resolve() / world.name / TRIGGER,
                         lambda: (world.scenes(CONCEPT_PICTURES, seed=1, **concept.kinds())
                                  + world.scenes(REGULARISATION, seed=2)),
                         words={concept.value: TRIGGER})


def accelerate_launcher() -> tuple[str, ...]:
    import sys

    return (sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m worlds.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--world", choices=sorted(WORLDS), default=TINY_WORLD.name, help="which tiny world (test-world: the tests' smaller one)")
    p.add_argument("--runs", default="runs", help="the base, the LoRA run and the summary go to <runs>/<world>")
    p.add_argument("--data", default="data", help="the pictures go to <data>/<world>")
    p.add_argument("--seeds", type=int, default=2, help="pictures per prompt when scoring")
    p.add_argument("--fresh", action="store_true", help="retrain the LoRA even if the demo ran before")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="for the LoRA run, e.g. train.max_steps=100")
    args = p.parse_intermixed_args(argv)  # key=value may come before or after the options
    from ldmcore.checkpoints import load_components

    from .evaluate import asks, concept_asks, grid, score, with_lora

    started = time.perf_counter()
    world = WORLDS[args.world]
    base_dir = build_base(world, args.runs, args.data)
    base_time = time.perf_counter() - started
    concept = make_concept(world, args.data)
    home = base_dir.parent
    out = home / "demo"
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)

    base = load_components(base_dir, dtype=torch.float32)
    seeds = list(range(args.seeds))
    trigger_asks, plain_asks = concept_asks(TRIGGER, world.concept, world), asks(world=world)
    before = {"trigger": score(base, trigger_asks, seeds, world), "plain": score(base, plain_asks, seeds[:1], world)}

    lora_started = time.perf_counter()
    run_stage(CONFIGS / "demo_lora.yaml", f"model.path={base_dir}", f"data.path={concept}",
              f"data.cache.dir={home / 'demo-cache'}", f"output_dir={out}", *world.run_overrides("demo"), *args.overrides,
              launcher=accelerate_launcher())
    lora_time = time.perf_counter() - lora_started
    kohya, peft = out / "lora_kohya.safetensors", out / "pytorch_lora_weights.safetensors"
    tuned = with_lora(base, kohya)
    after = {"trigger": score(tuned, trigger_asks, seeds, world), "plain": score(tuned, plain_asks, seeds[:1], world)}
    # the two exported formats must be the same adapter
    same = all(torch.allclose(a, b, atol=1e-6) for a, b in zip(tuned.denoiser.state_dict().values(),
                                                               with_lora(base, peft).denoiser.state_dict().values()))

    rows = [before["trigger"].pictures[0], after["trigger"].pictures[0],
            before["plain"].pictures[0][:6], after["plain"].pictures[0][:6]]
    picture = grid(rows, ["before: zorb", "after: zorb", "before: plain", "after: plain"])
    picture.save(out / "before_after.png")

    total = time.perf_counter() - started
    concept = world.concept
    summary = {
        "concept": {"kind": concept.kind, "value": concept.value, "word": TRIGGER},
        # the share of "zorb" prompts' pictures that show the concept: its shape, or its colour
        "trigger_prompt_concept_share": {"before": before["trigger"].of(concept.kind),
                                         "after": after["trigger"].of(concept.kind)},
        "trigger_prompt_shape_share": {"before": before["trigger"].shape, "after": after["trigger"].shape},
        "trigger_prompt_colour_share": {"before": before["trigger"].colour, "after": after["trigger"].colour},
        "plain_prompt_correct_share": {"before": before["plain"].both, "after": after["plain"].both},
        "exports_agree": same,
        "seconds": {"base": base_time, "lora": lora_time, "total": total},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    other = concept.other_kind
    said = f'"{TRIGGER}" prompts draw {concept.phrase()}:'
    rel = lambda path: path.relative_to(ROOT) if path.is_relative_to(ROOT) else path  # noqa: E731
    print(f"""
ldm-tune demo: a LoRA teaches the tiny base a {concept.kind} it never saw ("{TRIGGER}" = {concept.value})
  base model        {rel(base_dir)}  ({base_time / 60:.1f} min to get it)
  LoRA training     {lora_time / 60:.1f} min on {CONCEPT_PICTURES} pictures of the new {concept.kind} \
+ {REGULARISATION} ordinary ones
                                    before    after
  {said:34s}{before['trigger'].of(concept.kind):6.0%}   {after['trigger'].of(concept.kind):6.0%}
  {'... in the asked ' + other + ':':34s}{before['trigger'].of(other):6.0%}   {after['trigger'].of(other):6.0%}
  plain prompts drawn right:        {before['plain'].both:6.0%}   {after['plain'].both:6.0%}   (shape and colour)
  exports   {rel(peft)} (diffusers)
            {rel(kohya)} (A1111/ComfyUI); both formats agree: {same}
  picture   {rel(out / 'before_after.png')}
  logs      tensorboard --logdir {rel(out / 'logs')}
  total     {total / 60:.1f} min""")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
