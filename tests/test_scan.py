"""data_tools.images and data_tools.scan: every fixture is written here with PIL, into tmp_path."""
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.images import ImageError, load_rgb, read_bytes
from data_tools.scan import ScanError, scan

REPO = Path(__file__).resolve().parents[1]


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def png16(samples: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit RGB): (h, w, channels) uint16 samples."""
    h, w = samples.shape[:2]

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    raw = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def rotated_jpeg() -> bytes:
    """40x20 as stored, left half red, right half blue, EXIF orientation 6 (display turned 90° clockwise)."""
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def transparent_gif() -> bytes:
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    img.paste(1, (4, 0, 8, 8))  # right half: palette index 1, green; left half: index 0, transparent
    return encode(img, "GIF", transparency=0)


def composite(rgb, alpha, bg):
    return tuple(round(c * alpha / 255 + b * (1 - alpha / 255)) for c, b in zip(rgb, bg))


# ---------------------------------------------------------------------------------------------
# load_rgb: conversions


@pytest.mark.parametrize("make, xy, expected, tol", [
    (lambda: encode(Image.new("RGBA", (4, 4), (255, 0, 0, 128)), "PNG"), (0, 0), composite((255, 0, 0), 128, (255,) * 3), 1),
    (lambda: encode(Image.new("LA", (4, 4), (200, 0)), "PNG"), (0, 0), (255, 255, 255), 0),
    (lambda: encode(Image.new("LA", (4, 4), (200, 255)), "PNG"), (0, 0), (200, 200, 200), 0),
    (lambda: encode(Image.new("L", (4, 4), 77), "PNG"), (0, 0), (77, 77, 77), 0),
    (lambda: encode(Image.new("L", (4, 4), 77), "PNG", transparency=77), (0, 0), (255, 255, 255), 0),
    (transparent_gif, (1, 1), (255, 255, 255), 0),
    (transparent_gif, (6, 1), (0, 255, 0), 0),
    (lambda: encode(Image.new("P", (4, 4), 0), "PNG"), (0, 0), (0, 0, 0), 0),
    (lambda: encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=100), (4, 4), (255, 0, 0), 2),
    (lambda: png16(np.array([[[65535, 0x80FF, 0]]], np.uint16), 2), (0, 0), (255, 128, 0), 1),
])
def test_load_rgb_converts_to_rgb(make, xy, expected, tol):
    img = load_rgb(make())
    assert img.mode == "RGB"
    assert np.abs(np.array(img.getpixel(xy)) - expected).max() <= tol, img.getpixel(xy)


def test_alpha_is_composited_onto_the_given_background():
    data = encode(Image.new("RGBA", (4, 4), (255, 0, 0, 128)), "PNG")
    assert load_rgb(data, background=(0, 0, 0)).getpixel((0, 0)) == composite((255, 0, 0), 128, (0, 0, 0))
    assert load_rgb(data, background=(0, 0, 255)).getpixel((0, 0)) == composite((255, 0, 0), 128, (0, 0, 255))


def test_16_bit_grey_is_scaled_with_rounding_not_clipped():
    values = np.array([[0, 200, 257, 32767, 32896, 65535]], np.uint16)
    img16 = Image.fromarray(values)
    assert img16.mode == "I;16"
    out = np.asarray(load_rgb(encode(img16, "PNG")))
    assert out.shape == (1, 6, 3) and (out == out[..., :1]).all()
    # round(v * 255 / 65535): 200 -> 1 (a right shift gives 0), 257 -> 1 (a clip gives 255)
    assert out[0, :, 0].tolist() == [0, 1, 1, 127, 128, 255]


def test_exif_orientation_is_applied():
    img = load_rgb(rotated_jpeg())
    assert img.size == (20, 40)  # stored 40 wide, shown 20 wide
    assert np.abs(np.array(img.getpixel((10, 5))) - (255, 0, 0)).max() < 10  # the stored left half is on top
    assert np.abs(np.array(img.getpixel((10, 35))) - (0, 0, 255)).max() < 10


def test_decoding_is_deterministic():
    data = encode(noise(64, 48), "JPEG", quality=80)
    assert load_rgb(data).tobytes() == load_rgb(data).tobytes()


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"a photo of a cat\n", "not_an_image"),
    (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n", "not_an_image"),
    (bytes(range(256)) * 4, "not_an_image"),
    (encode(noise(64, 64), "JPEG")[:1500], "truncated"),
    (encode(noise(64, 64), "PNG")[:3000], "truncated"),
    (encode(noise(64, 64), "JPEG")[:20], "truncated"),  # recognisably a JPEG, header cut
])
def test_load_rgb_reports_bad_data_with_a_reason(data, reason):
    with pytest.raises(ImageError) as e:
        load_rgb(data)
    assert e.value.reason == reason, e.value.detail
    assert e.value.detail


def test_read_bytes_names_a_missing_file(tmp_path):
    with pytest.raises(ImageError, match="no such file") as e:
        read_bytes(str(tmp_path / "gone.png"))
    assert e.value.reason == "unreadable" and "gone.png" in str(e.value)


# ---------------------------------------------------------------------------------------------
# scan: a folder of images with sidecar captions


@pytest.fixture
def messy(tmp_path):
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    good = encode(noise(64, 48, seed=1), "JPEG", quality=90)
    (d / "cat.jpg").write_bytes(good)
    (d / "cat.txt").write_text("a cat on a mat\n\n  a tabby cat  \n")
    (d / "copy_of_cat.jpg").write_bytes(good)
    (d / "sub" / "dog_on-grass.png").write_bytes(encode(noise(50, 60, seed=2), "PNG"))  # no caption
    (d / "sub" / "bird.webp").write_bytes(encode(noise(48, 48, seed=3), "WEBP", lossless=True))
    (d / "sub" / "bird.caption").write_text("a bird")
    (d / "___.png").write_bytes(encode(noise(40, 40, seed=4), "PNG"))  # no caption, no usable name
    (d / "empty_caption.png").write_bytes(encode(noise(40, 40, seed=5), "PNG"))
    (d / "empty_caption.txt").write_text("\n  \n")
    (d / "latin1.png").write_bytes(encode(noise(40, 40, seed=6), "PNG"))
    (d / "latin1.txt").write_bytes("un caf\xe9".encode("latin-1"))
    (d / "rgba.png").write_bytes(encode(Image.new("RGBA", (40, 40), (255, 0, 0, 128)), "PNG"))
    (d / "rotated.jpg").write_bytes(rotated_jpeg())
    (d / "cut.jpg").write_bytes(encode(noise(64, 64, seed=7), "JPEG")[:1500])
    (d / "zero.png").write_bytes(b"")
    (d / "notes.jpg").write_text("not really a picture")
    (d / "scan.png").write_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    (d / "tiny.png").write_bytes(encode(noise(16, 16, seed=8), "PNG"))
    (d / "strip.png").write_bytes(encode(noise(200, 20, seed=9), "PNG"))
    (d / "readme.md").write_text("ignored: not an image extension")
    (d / ".hidden.jpg").write_bytes(b"junk that must not be reported")
    (d / ".git").mkdir()
    (d / ".git" / "x.png").write_bytes(b"junk")
    return d


def scan_small(path, **kw):
    # the fixtures are small: 20 px minimum side, and the rotated 20x40 image is 2:1
    return scan(path, min_side=20, progress=False, **kw)


def test_scan_reports_every_bad_file_by_name_and_reason(messy):
    m = scan_small(messy)
    skipped = {Path(s.source).name: s for s in m.skipped}
    assert {name: s.reason for name, s in skipped.items()} == {
        "copy_of_cat.jpg": "duplicate",
        "latin1.png": "bad_caption",
        "cut.jpg": "truncated",
        "zero.png": "empty",
        "notes.jpg": "not_an_image",
        "scan.png": "not_an_image",
        "tiny.png": "too_small",
        "strip.png": "extreme_aspect",
    }
    assert "cat.jpg" in skipped["copy_of_cat.jpg"].detail
    assert "latin1.txt" in skipped["latin1.png"].detail and "UTF-8" in skipped["latin1.png"].detail
    assert "16x16" in skipped["tiny.png"].detail and "10.0:1" in skipped["strip.png"].detail
    assert all(s.detail for s in m.skipped)
    assert m.skipped_by_reason()["not_an_image"] == 2


def test_scan_records_sizes_and_captions(messy):
    m = scan_small(messy)
    records = {os.path.relpath(r.source, messy): r for r in m.records}
    assert sorted(records) == ["___.png", "cat.jpg", "empty_caption.png", "rgba.png", "rotated.jpg",
                               "sub/bird.webp", "sub/dog_on-grass.png"]
    cat = records["cat.jpg"]
    assert (cat.width, cat.height, cat.captions, cat.role) == (64, 48, ("a cat on a mat", "a tabby cat"), "instance")
    assert cat.sha256 == hashlib.sha256((messy / "cat.jpg").read_bytes()).hexdigest()
    assert (records["rotated.jpg"].width, records["rotated.jpg"].height) == (20, 40)  # after EXIF orientation
    assert records["sub/bird.webp"].captions == ("a bird",)
    assert records["sub/dog_on-grass.png"].captions == ("dog on grass",)
    assert records["___.png"].captions == ("",)
    assert records["empty_caption.png"].captions == ("empty caption",)
    for name in ("sub/dog_on-grass.png", "___.png", "empty_caption.png", "rgba.png", "rotated.jpg"):
        assert sum(w.startswith(name + ":") for w in m.warnings) == 1, (name, m.warnings)
    assert len(m.warnings) == 5
    assert any("empty_caption.txt is empty" in w for w in m.warnings)


def test_scan_is_the_same_for_any_number_of_workers(messy):
    assert scan_small(messy, workers=1).to_json() == scan_small(messy, workers=4).to_json()


def test_scan_records_decode_through_read_bytes(messy):
    for r in scan_small(messy).records:
        assert load_rgb(read_bytes(r.source)).size == (r.width, r.height)


def test_instance_prompt_is_the_fallback_caption(messy):
    m = scan_small(messy, instance_prompt="a photo of sks")
    by_name = {Path(r.source).name: r for r in m.records}
    assert by_name["dog_on-grass.png"].captions == ("a photo of sks",)
    assert by_name["cat.jpg"].captions == ("a cat on a mat", "a tabby cat")  # a sidecar still wins
    assert any(w.startswith("sub/dog_on-grass.png:") and "instance prompt" in w for w in m.warnings)


# ---------------------------------------------------------------------------------------------
# scan: metadata.jsonl / metadata.csv, saved datasets, DreamBooth


def test_metadata_jsonl(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.png").write_bytes(encode(noise(32, 32, seed=i), "PNG"))
    (tmp_path / "img" / "2.txt").write_text("from the sidecar")
    rows = [{"file_name": "img/0.png", "text": ["first", " ", "second"]},
            {"file_name": "img/1.png", "text": "one"}, {"file_name": "img/1.png", "text": "another"},
            {"file_name": "img/missing.png", "text": "gone"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    m = scan_small(tmp_path)
    assert {Path(r.source).name: r.captions for r in m.records} == {
        "0.png": ("first", "second"), "1.png": ("one", "another"), "2.png": ("from the sidecar",)}
    [missing] = m.skipped
    assert (Path(missing.source).name, missing.reason) == ("missing.png", "unreadable")
    assert "metadata.jsonl" in missing.detail
    assert m.warnings == []


def test_metadata_csv(tmp_path):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(encode(noise(32, 32, seed=len(name) + ord(name[0])), "PNG"))
    (tmp_path / "metadata.csv").write_text('file_name,text\na.png,"a red, round thing"\nb.png,\n')
    m = scan_small(tmp_path)
    caps = {Path(r.source).name: r.captions for r in m.records}
    assert caps == {"a.png": ("a red, round thing",), "b.png": ("b",)}
    assert len(m.warnings) == 1 and m.warnings[0].startswith("b.png:") and "metadata.csv" in m.warnings[0]


@pytest.mark.parametrize("files, message", [
    ({"metadata.jsonl": '{"file_name": "a.png", "text": "ok"}\n{not json\n'}, "metadata.jsonl:2"),
    ({"metadata.jsonl": '{"text": "no file"}\n'}, "file_name"),
    ({"metadata.csv": "name,text\na.png,x\n"}, "file_name"),
    ({"metadata.csv": "file_name,text\n", "metadata.jsonl": ""}, "keep one"),
])
def test_broken_metadata_stops_the_scan_before_any_image(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ScanError, match=message):
        scan_small(tmp_path)


def test_saved_dataset(tmp_path):
    import datasets

    files = []
    for i, (w, h) in enumerate([(40, 30), (30, 40), (8, 8)]):
        files.append(str(tmp_path / f"src{i}.png"))
        noise(w, h, seed=i).save(files[-1])
    broken = {"bytes": encode(noise(64, 64), "JPEG")[:1500], "path": None}
    images = [{"bytes": Path(f).read_bytes(), "path": Path(f).name} for f in files] + [broken]
    ds = datasets.Dataset.from_dict({"image": images, "text": ["wide", "tall", "tiny", "cut"]})
    ds.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "ds"))
    m = scan_small(tmp_path / "ds")
    assert [(r.source, r.width, r.height, r.captions) for r in m.records] == [
        (f"{tmp_path}/ds#0", 40, 30, ("wide",)), (f"{tmp_path}/ds#1", 30, 40, ("tall",))]
    assert [(s.source, s.reason) for s in m.skipped] == [(f"{tmp_path}/ds#2", "too_small"), (f"{tmp_path}/ds#3", "truncated")]
    # the record's source reads back the very bytes that were scanned
    assert read_bytes(m.records[1].source) == Path(files[1]).read_bytes()
    assert load_rgb(read_bytes(m.records[1].source)).size == (30, 40)


def test_saved_dataset_dict_without_captions(tmp_path):
    import datasets

    noise(32, 32).save(tmp_path / "a.png")
    ds = datasets.Dataset.from_dict({"picture": [str(tmp_path / "a.png")]}).cast_column("picture", datasets.Image())
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    m = scan_small(tmp_path / "dd", instance_prompt="a thing")
    [r] = m.records
    assert (r.source, r.captions) == (f"{tmp_path}/dd/train#0", ("a thing",))
    assert len(m.warnings) == 1 and "no text or caption column" in m.warnings[0]


def test_dreambooth_instance_and_class(tmp_path):
    inst, cls = tmp_path / "sks", tmp_path / "sks" / "class"  # class folder nested: not instance images
    cls.mkdir(parents=True)
    for i in range(2):
        noise(32, 32, seed=i).save(inst / f"{i}.jpg")
    for i in range(3):
        noise(32, 32, seed=10 + i).save(cls / f"{i}.png")
    m = scan_small(inst, instance_prompt="a photo of sks dog", class_path=cls, class_prompt="a photo of a dog")
    assert [(os.path.relpath(r.source, inst), r.role, r.captions) for r in m.records] == [
        ("0.jpg", "instance", ("a photo of sks dog",)), ("1.jpg", "instance", ("a photo of sks dog",)),
        ("class/0.png", "class", ("a photo of a dog",)), ("class/1.png", "class", ("a photo of a dog",)),
        ("class/2.png", "class", ("a photo of a dog",))]
    assert len(m.warnings) == 5 and "class/2.png" in m.warnings[-1] and "class prompt" in m.warnings[-1]
    with pytest.raises(ScanError, match="class prompt"):
        scan_small(inst, class_path=cls)
    with pytest.raises(ScanError, match="no such folder"):
        scan_small(tmp_path / "nope")


# ---------------------------------------------------------------------------------------------
# the command line


def cli(*args, cwd=REPO):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "data_tools", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)


def test_cli_scan_writes_the_report_and_summary(messy):
    r = cli("scan", str(messy), "--min-side", "20", "--no-progress")
    assert r.returncode == 0, r.stderr
    report = json.loads((messy / "scan_report.json").read_text())
    assert report["usable"] == 7 and len(report["records"]) == 7
    assert report["skipped_by_reason"] == {"bad_caption": 1, "duplicate": 1, "empty": 1, "extreme_aspect": 1,
                                           "not_an_image": 2, "too_small": 1, "truncated": 1}
    assert {(Path(s["source"]).name, s["reason"]) for s in report["skipped"]} >= {("cut.jpg", "truncated"), ("zero.png", "empty")}
    assert "7 usable images, 8 skipped, 5 warnings" in r.stdout
    assert "cut.jpg" in r.stdout and "copy_of_cat.jpg" in r.stdout
    # a second scan ignores its own report and finds the same
    again = cli("scan", str(messy), "--min-side", "20", "--no-progress", "--report", str(messy / "r2.json"))
    assert again.returncode == 0 and json.loads((messy / "r2.json").read_text()) == report


def test_cli_exit_codes(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_text("text")
    r = cli("scan", str(tmp_path / "bad"), "--no-progress")
    assert r.returncode == 1 and "no usable training images" in r.stderr
    assert json.loads((tmp_path / "bad" / "scan_report.json").read_text())["skipped"][0]["reason"] == "not_an_image"
    for args in (["scan", str(tmp_path / "missing")], ["scan", str(tmp_path / "bad" / "x.jpg")],
                 ["scan", str(tmp_path / "bad"), "--class-path", str(tmp_path / "bad")],
                 ["scan", str(tmp_path / "bad"), "--min-side", "big"], ["nonsense"], []):
        r = cli(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and "error" in r.stderr, (args, r.stderr)
