"""The sharded cache store: round trips, incremental writes, interruption, several writers."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from data_tools.store import ShardReader, ShardWriter, build_index, content_key, fingerprint, load_index, write_index


def entry(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {"mean": torch.randn(4, 8, 8, generator=g).half(), "std": torch.rand(4, 8, 8, generator=g).half()}


def test_entries_round_trip_with_random_access(tmp_path):
    with ShardWriter(tmp_path, shard_entries=3) as w:
        for i in range(10):
            w.add(f"k{i}", entry(i))
    assert len(list(tmp_path.glob("shard-*.safetensors"))) == 4  # 3 + 3 + 3 + 1
    write_index(tmp_path)
    reader = ShardReader(tmp_path)
    assert len(reader) == 10
    for i in (7, 0, 9, 3):
        got = reader.get(f"k{i}")
        assert set(got) == {"mean", "std"}
        for field, t in entry(i).items():
            assert torch.equal(got[field], t)
    with pytest.raises(KeyError, match="run the precompute again"):
        reader.get("missing")


def test_adding_entries_later_extends_the_index(tmp_path):
    with ShardWriter(tmp_path, writer="a", shard_entries=4) as w:
        for i in range(5):
            w.add(f"k{i}", entry(i))
    first = write_index(tmp_path)
    with ShardWriter(tmp_path, writer="b", shard_entries=4) as w:
        for i in range(5, 8):
            w.add(f"k{i}", entry(i))
    # the saved index no longer covers the shards on disk, so loading rebuilds it
    assert set(load_index(tmp_path)) == set(first) | {"k5", "k6", "k7"}


def test_a_killed_writer_leaves_only_complete_shards(tmp_path):
    """A process killed while filling a shard: finished shards stay, the unfinished one never appears."""
    script = textwrap.dedent(f"""
        import os, torch
        from data_tools.store import ShardWriter
        w = ShardWriter({str(tmp_path)!r}, shard_entries=4)
        for i in range(10):
            w.add(f"k{{i}}", {{"x": torch.full((2,), float(i))}})
        open({str(tmp_path / "half.safetensors.partial")!r}, "wb").write(b"\\x00" * 100)  # a write cut short
        os._exit(9)  # no flush, no cleanup: as SIGKILL would leave it
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=str(__import__("pathlib").Path(__file__).parent.parent))
    assert proc.returncode == 9
    index = build_index(tmp_path)
    assert sorted(index) == [f"k{i}" for i in range(8)]  # two full shards; k8, k9 were in memory
    assert not list(tmp_path.glob("*.partial"))
    reader = ShardReader(tmp_path, index)
    assert torch.equal(reader.get("k5")["x"], torch.full((2,), 5.0))


def test_a_damaged_shard_is_set_aside(tmp_path, caplog):
    with ShardWriter(tmp_path, shard_entries=2) as w:
        for i in range(4):
            w.add(f"k{i}", entry(i))
    shards = sorted(tmp_path.glob("shard-*.safetensors"))
    shards[0].write_bytes(shards[0].read_bytes()[:20])  # truncated after the fact
    index = build_index(tmp_path)
    assert len(index) == 2
    assert len(list(tmp_path.glob("*.damaged"))) == 1
    assert "unreadable shard" in caplog.text


def test_two_writer_processes_merge_into_one_index(tmp_path):
    code = textwrap.dedent("""
        import sys, torch
        from data_tools.store import ShardWriter
        rank, world, folder = int(sys.argv[1]), 2, sys.argv[2]
        with ShardWriter(folder, writer=str(rank), shard_entries=3) as w:
            for i in range(rank, 11, world):
                w.add(f"k{i}", {"x": torch.full((3,), float(i))})
    """)
    root = str(__import__("pathlib").Path(__file__).parent.parent)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r), str(tmp_path)], cwd=root) for r in range(2)]
    assert [p.wait() for p in procs] == [0, 0]
    index = write_index(tmp_path)
    assert sorted(index, key=lambda k: int(k[1:])) == [f"k{i}" for i in range(11)]
    saved = json.loads((tmp_path / "index.json").read_text())
    assert saved["shards"] == sorted(p.name for p in tmp_path.glob("shard-*.safetensors"))
    reader = ShardReader(tmp_path)
    assert all(torch.equal(reader.get(f"k{i}")["x"], torch.full((3,), float(i))) for i in range(11))


def test_content_keys_and_fingerprints_change_with_their_inputs():
    assert content_key("abc", {"w": 512, "h": 512}) == content_key("abc", {"h": 512, "w": 512})
    assert content_key("abc", {"w": 512}) != content_key("abc", {"w": 576})
    m = torch.nn.Linear(3, 2)
    before = fingerprint(m)
    assert fingerprint(m) == before
    with torch.no_grad():
        m.weight[0, 0] += 1e-3
    assert fingerprint(m) != before
