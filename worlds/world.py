"""What a world is, as data, and the worlds there are: TINY_WORLD (the demo's and the README's),
TEST_WORLD (the test suite's smaller one) and its pictures for the SDXL- and Flux-shaped bases
(TEST_WORLD_SDXL, TEST_WORLD_FLUX). `WORLDS` names them for every command's `--world`."""
from __future__ import annotations

from dataclasses import dataclass, field

from .pictures import BACKGROUNDS, BASE_COLOURS, BASE_SHAPES, SHAPES, Scene, scenes

SIZE = 32  # pixels; the tiny-world VAE makes 8x8 latents of them
HELD_OUT = "cross"  # the shape no world's base is taught: the U-Net worlds' concept, the DreamBooth check's subject

#: how the checks sample a U-Net world's base: few steps of DPM++ 2M are plenty for 8x8 latents
DDPM_SAMPLING = {"steps": 20, "guidance_scale": 4.0, "sampler": "dpmpp_2m"}
#: ... a flow-matching world's: the flow Euler step, and real classifier-free guidance with the empty
#: negative prompt (`true_cfg_scale`): a base trained here from nothing is not guidance-distilled
FLOW_SAMPLING = {"steps": 20, "true_cfg_scale": 4.0, "sampler": "euler"}


@dataclass(frozen=True)
class Concept:
    """What the demo's LoRA (and the full-fine-tune check) teaches a world's base under the trigger
    word: a shape or a colour its denoiser never saw. The world's autoencoder has seen it, as a real
    one has seen everything (`World.codec_kinds`)."""

    kind: str  # "shape" or "colour"
    value: str  # "cross", "green", ...

    def __post_init__(self):
        if self.kind not in ("shape", "colour"):
            raise ValueError(f"a concept is a shape or a colour, not {self.kind!r}")

    def kinds(self) -> dict:
        """`World.scenes`' narrowing to pictures of the concept."""
        return {self.kind + "s": (self.value,)}

    def phrase(self) -> str:
        return f"a {self.value}" if self.kind == "shape" else self.value

    @property
    def other_kind(self) -> str:
        """What the trigger prompts ask besides the concept: the colour of a shape, the shape of a colour."""
        return "colour" if self.kind == "shape" else "shape"


@dataclass(frozen=True)
class World:
    """A tiny world, as data: what its base is taught (shapes, colours, backgrounds), its model
    preset, how many pictures, how its checks sample, and key=value overrides per training run ("vae"
    and "unet" for the base, "demo", and each check's name) put after the run's config file and before
    the user's.
    Everything of a world lives under `<runs>/<name>/` and its pictures under `<data>/<name>/`."""

    name: str
    preset: str
    shapes: tuple[str, ...] = BASE_SHAPES
    colours: tuple[str, ...] = BASE_COLOURS
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)
    textured_share: float = 0.2
    pictures: int = 3000
    samples: int = 48  # pictures behind each measured share of the method checks
    class_shape: str = "diamond"  # the DreamBooth check's class: "a red <class_shape> on a white background"
    concept: Concept = Concept("shape", HELD_OUT)  # what the demo teaches (worlds.demo)
    # `ldmcore.pipeline.generate`'s options in every check of this world's models
    sampling: dict = field(default_factory=lambda: dict(DDPM_SAMPLING), hash=False)
    overrides: dict[str, tuple[str, ...]] = field(default_factory=dict, hash=False)

    def kinds(self) -> dict:
        """What `worlds.pictures.scenes` draws from in this world."""
        return {"shapes": self.shapes, "colours": self.colours, "backgrounds": self.backgrounds,
                "textured_share": self.textured_share}

    def codec_kinds(self) -> dict:
        """What the autoencoder's pictures are drawn from: every shape, the world's colours and the
        concept's (the denoiser is what has to learn the concept, as in a real model)."""
        colours = self.colours + ((self.concept.value,) if self.concept.kind == "colour" else ())
        return {"shapes": tuple(SHAPES), "colours": tuple(dict.fromkeys(colours))}

    def scenes(self, n: int, seed: int, **kinds) -> list[Scene]:
        """`n` seeded scenes of this world; `kinds` narrows or widens what is drawn."""
        return scenes(n, seed, SIZE, **{**self.kinds(), **kinds})

    def run_overrides(self, run: str) -> tuple[str, ...]:
        return tuple(self.overrides.get(run, ()))


#: the demo's and the README's world: four shapes, six colours, three backgrounds (`make base`, ~13 min)
TINY_WORLD = World("tiny-world", "tiny-world")

#: the test suite's world, where every method is trained and scored within CI's budget: three shapes,
#: three colours, two plain backgrounds, a model with half the channels (preset "test-world"), and
#: shorter runs. What each method scores here is asserted by tests/test_learning.py.
TEST_WORLD = World(
    "test-world", "test-world", shapes=("circle", "triangle", "square"), colours=("red", "blue", "yellow"),
    backgrounds=("white", "black"), textured_share=0.0, pictures=800, samples=36, class_shape="square",
    overrides={
        "vae": ("train.max_steps=300",),
        "unet": ("train.max_steps=1200", "train.learning_rate=3.0e-3", "loss.min_snr_gamma=5"),
        # the smaller model takes (and needs) larger steps than the tiny world's
        "demo": ("train.max_steps=400", "train.learning_rate=4.0e-3", "train.checkpoint_every=200", "validation.every=200"),
        "inpaint": ("train.max_steps=900", "train.learning_rate=1.5e-3", "train.checkpoint_every=900"),
        "full": ("train.max_steps=800", "train.learning_rate=1.0e-3", "train.checkpoint_every=800"),
        "dreambooth": ("train.learning_rate=3.0e-3",),
        "controlnet": ("train.learning_rate=2.0e-3",),
    },
)

#: the test world's pictures and runs for an SDXL-shaped base (preset "test-world-sdxl": two text encoders,
#: pooled and size conditioning, three levels with the first without attention), so the SDXL family's
#: methods are shown to learn as the SD layout's are. The pictures are TEST_WORLD's (same kinds and seeds).
TEST_WORLD_SDXL = World(
    "test-world-sdxl", "test-world-sdxl", shapes=TEST_WORLD.shapes, colours=TEST_WORLD.colours,
    backgrounds=TEST_WORLD.backgrounds, textured_share=0.0, pictures=TEST_WORLD.pictures, samples=TEST_WORLD.samples,
    class_shape=TEST_WORLD.class_shape, overrides=TEST_WORLD.overrides,
)

#: the test world's pictures for a flow-matching base (preset "test-world-flux": a small Flux.1-schnell-shaped
#: transformer on 2x2 patches of 16-channel latents, T5 states and CLIP's pooled output), so that the Flux
#: family is shown to learn as the U-Net families are. Its runs are its own: no min-SNR weighting (a DDPM
#: notion, refused on flow models); it samples with FLOW_SAMPLING.
#: Its concept is a colour, green: at this size the transformer hardly draws a cross (a base trained from
#: nothing with crosses among its pictures drew 0 of 12, its circles 12 of 12; the demo's LoRA drew 0-8%
#: whatever was tried: docs/flux.md). Its autoencoder sees green (`codec_kinds`), its denoiser never does.
TEST_WORLD_FLUX = World(
    "test-world-flux", "test-world-flux", shapes=TEST_WORLD.shapes, colours=TEST_WORLD.colours,
    backgrounds=TEST_WORLD.backgrounds, textured_share=0.0, pictures=TEST_WORLD.pictures, samples=TEST_WORLD.samples,
    class_shape=TEST_WORLD.class_shape, concept=Concept("colour", "green"), sampling=dict(FLOW_SAMPLING),
    overrides={
        "vae": ("train.max_steps=300",),
        # the flow defaults for the sigmas (logit-normal, schnell's shift 1): uniform draws and fixed shifts of 3 or
        # 0.5 drew no better; lr 3e-3 drew 42% right where 1e-3 drew 28% (both at width 64)
        "unet": ("train.max_steps=1200", "train.learning_rate=3.0e-3"),
        # no validation pictures: they would be drawn at Flux's default size, 512 px
        "demo": ("train.max_steps=400", "train.learning_rate=4.0e-3", "train.checkpoint_every=200",
                 "validation.prompts=[]"),
    },
)

WORLDS = {w.name: w for w in (TINY_WORLD, TEST_WORLD, TEST_WORLD_SDXL, TEST_WORLD_FLUX)}
