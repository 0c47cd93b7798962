"""Worlds: small synthetic domains with ground truth, where a model is built from nothing and every
training method can be measured.

A world is data (`world.World`): which shapes, colours and backgrounds its pictures show, the model
preset its base uses, how many pictures it draws and the run lengths of its trainings. Every
picture is drawn from a seeded scene, so what it shows is known, and a detector reads shape and
colour back from generated pictures: "was the asked shape drawn, in the asked colour?" is a number.
Everything of a world lives under `<runs>/<world>/` and its pictures under `<data>/<world>/`.

- `pictures.py`: scenes, drawing them, captions, the ground-truth folders (`truth.jsonl`).
- `detect.py`: the detector that reads a picture's shape, colour, background and box.
- `world.py`: `World`, the worlds there are (`TINY_WORLD`, `TEST_WORLD`) and `WORLDS` by name.
- `build.py`: a world's base model, built in resumable stages by the project's own trainers
  (`python -m worlds.build`, `make base`).
- `evaluate.py`: sampling, scoring with the detector, picture grids (`python -m worlds.evaluate`).
- `demo.py`: a LoRA teaches the base a shape it never saw, scored before and after (`make demo`).
- `checks.py`: every method trained on a world and scored before and after (`make checks`).

This room uses `ldmcore` (models, sampling), `adapters` (merging LoRA files) and launches
`python -m trainers` for every training run; nothing in the other rooms imports it.
"""
