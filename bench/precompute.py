"""Precompute throughput against the VAE encoder's own throughput on the same batches.

The baseline encodes batches that are already decoded, resized and in memory: the most a cache
builder could reach with that VAE. The project's number is `data_tools.precompute` end to end on
JPEG files (reading, decoding and cropping in DataLoader workers while the VAE encodes, then
writing shards). Target: 0.9x the baseline or better.

    python bench/precompute.py                   # SD 1.5 VAE architecture, 512 px
    python bench/precompute.py --resolution 256 --images 32
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_tools.config import DataConfig  # noqa: E402
from data_tools.images import load_rgb, read_bytes  # noqa: E402
from data_tools.precompute import _bucket_batches, plan_cache, precompute  # noqa: E402
from data_tools.scan import scan  # noqa: E402
from data_tools.transforms import apply, to_tensor  # noqa: E402
from ldmcore.presets import get_preset  # noqa: E402
from ldmcore.text import PromptEncoder, build_word_tokenizer  # noqa: E402
from ldmcore.vae import AutoencoderKL  # noqa: E402


def make_photos(folder: Path, n: int, side: int) -> None:
    """JPEGs larger than the training size, of a few shapes, with smooth content plus grain."""
    rng = np.random.default_rng(0)
    shapes = [(side * 3 // 2, side * 3 // 2), (side * 2, side * 3 // 2), (side * 3 // 2, side * 2)]
    for i in range(n):
        w, h = shapes[i % len(shapes)]
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * (i + 1) % 256), (yy * 2 % 256), ((xx + yy) % 256)], -1).astype(np.float32)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"photo{i:04d}.jpg", quality=92)
        (folder / f"photo{i:04d}.txt").write_text("a photo")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sd15")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(dict(get_preset(args.preset).vae)).to(device, dtype).eval()
    tok = build_word_tokenizer(["a", "photo"])
    from transformers import CLIPTextConfig, CLIPTextModel

    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).eval()
    encoder = PromptEncoder(tok, text)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        make_photos(folder, args.images, args.resolution)
        cfg = DataConfig(path=str(folder), resolution=args.resolution, min_side=64,
                         cache={"batch_size": args.batch_size, "num_workers": args.workers})
        manifest = scan(folder, min_side=64, progress=False)

        # Baseline: the same batches, decoded and cropped beforehand, through the encoder alone.
        _, jobs, _ = plan_cache(manifest, cfg, "bench", "bench")
        batches = [
            torch.stack([to_tensor(apply(load_rgb(read_bytes(manifest.records[jobs[i].record].source)), jobs[i].plan))
                         for i in idx])
            for idx in _bucket_batches(manifest, jobs, args.batch_size)
        ]
        with torch.no_grad():
            vae.encode(batches[0].to(device, dtype))  # warm-up
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for b in batches:
                post = vae.encode(b.to(device, dtype))
                post.mean.half().cpu(), post.std.half().cpu()  # the baseline also brings results back
            if device == "cuda":
                torch.cuda.synchronize()
            encoder_ips = args.images / (time.perf_counter() - start)

        _, report = precompute(manifest, vae, encoder, cfg, Path(tmp) / "cache", progress=False)

    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"precompute: {args.preset} VAE, {args.resolution} px, {args.images} JPEGs, batch {args.batch_size}, "
          f"{args.workers} workers, {name}")
    print(f"  VAE encoder alone, pre-decoded batches: {encoder_ips:8.2f} images/s")
    print(f"  data_tools.precompute, end to end:      {report.images_per_second:8.2f} images/s")
    print(f"  ratio: {report.images_per_second / encoder_ips:.3f}x   (target >= 0.9x)")


if __name__ == "__main__":
    main()
