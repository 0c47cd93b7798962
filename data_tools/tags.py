"""Tag captions: "1girl, red hair, smile, outdoors" shuffled, kept, dropped and prefixed as kohya's and
OneTrainer's users expect (`data.tags`, `data.subsets[].tags`). Each caption becomes a fixed number of
versions, drawn from (data.seed, the caption, the version's number), all encoded into the text cache;
training picks one per picture and epoch, as it picks among several captions."""
from __future__ import annotations

import random

from .config import CaptionTags


def caption_variant(caption: str, tags: CaptionTags, seed: int, number: int) -> str:
    """Version `number` of `caption`: its first `keep_tokens` tags in place, the rest shuffled and each
    left out with chance `dropout`, then prefix and suffix."""
    rng = random.Random(f"{seed}:{number}:{caption}")
    parts = [t.strip() for t in caption.split(",") if t.strip()]
    kept, rest = parts[: tags.keep_tokens], parts[tags.keep_tokens:]
    if tags.shuffle:
        rng.shuffle(rest)
    if tags.dropout:
        rest = [t for t in rest if rng.random() >= tags.dropout]
    return f"{tags.prefix}{', '.join(kept + rest)}{tags.suffix}"


def caption_variants(caption: str, tags: CaptionTags | None, seed: int) -> tuple[str, ...]:
    """The versions the cache holds for `caption` (itself alone without tag settings), in order, repeats kept
    out (a caption of one tag has one order)."""
    if tags is None:
        return (caption,)
    return tuple(dict.fromkeys(caption_variant(caption, tags, seed, k) for k in range(tags.variants)))
