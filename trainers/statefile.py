"""Training state (optimizer, LR scheduler, EMA, random generators) as safetensors plus JSON: no pickle.

`torch.save` pickles, and reading a pickle runs whatever code it names: a checkpoint folder from
someone else, or one a disk or a copy damaged, must not be able to do that. A state here is one
safetensors file: the tensors under numbered names, and the structure around them (dicts with any
keys, lists, tuples, numbers, strings, numpy arrays, dtypes) as JSON in the file's metadata. Reading
it builds plain Python objects and tensors and nothing else; anything unexpected is an error that
names the file.

Like every file ldm-tune writes, it carries a sha256 of its tensors, so a flipped bit is found when
it is read, not trained on.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldmcore.weights import DIGEST_KEY, CheckpointError, read_safetensors, write_safetensors

FORMAT = "ldm-tune-state/1"


class StateFileError(ValueError):
    """A state file that cannot be read back as written: the message names the file and why."""


def save_state(obj: Any, path: str | os.PathLike) -> Path:
    """Write `obj` (nested dicts, lists, tuples, tensors, numpy arrays, scalars) to `path` (a
    .safetensors file), as `ldmcore.weights.write_safetensors` writes: atomically, with a digest."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(obj, tensors, "state")
    return write_safetensors(tensors, path, {"ldm_tune.state": FORMAT, "ldm_tune.tree": json.dumps(tree)})


def load_state(path: str | os.PathLike, device: str | torch.device = "cpu") -> Any:
    """Read what `save_state` wrote; raises StateFileError naming the file if it is not such a file,
    is truncated, or its tensors do not match their recorded checksum."""
    path = Path(path)
    if not path.is_file():
        old = path.with_suffix(".pt")
        why = (f"; {old.name} beside it was written by an older ldm-tune as a pickle, which is not read (it could run "
               "code): resume from a newer checkpoint or start over") if old.is_file() else ""
        raise StateFileError(f"{path}: missing{why}")
    try:
        tensors, metadata = read_safetensors(path, device=str(device))
    except CheckpointError as e:
        raise StateFileError(str(e)) from None
    if metadata.get("ldm_tune.state") != FORMAT or DIGEST_KEY not in metadata:
        raise StateFileError(f"{path}: not an ldm-tune state file")
    try:
        return _decode(json.loads(metadata["ldm_tune.tree"]), tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise StateFileError(f"{path}: malformed state ({e})") from None


# JSON shapes: a scalar stands for itself; containers and special values are one-key dicts.
def _encode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        name = str(len(tensors))
        tensors[name] = obj.detach().cpu().contiguous().clone()  # safetensors refuses shared storage
        return {"tensor": name}
    if isinstance(obj, np.ndarray):
        return {"ndarray": obj.tolist(), "dtype": obj.dtype.str}
    if isinstance(obj, torch.dtype):
        return {"dtype": str(obj).removeprefix("torch.")}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"dict": {k: _encode(v, tensors, f"{where}.{k}") for k, v in obj.items()}}
        return {"items": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")] for k, v in obj.items()]}
    if isinstance(obj, list):
        return {"list": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, tuple):
        return {"tuple": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    raise TypeError(f"{where}: a {type(obj).__name__} cannot be stored in a state file")


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if not isinstance(node, dict) or len(node) not in (1, 2):
        raise ValueError(f"unexpected node {str(node)[:80]}")
    if "tensor" in node:
        return tensors[node["tensor"]]
    if "ndarray" in node:
        return np.array(node["ndarray"], dtype=np.dtype(node["dtype"]))
    if "dtype" in node:
        dtype = getattr(torch, node["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {node['dtype']!r}")
        return dtype
    if "dict" in node:
        return {k: _decode(v, tensors) for k, v in node["dict"].items()}
    if "items" in node:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in node["items"]}
    if "list" in node:
        return [_decode(v, tensors) for v in node["list"]]
    if "tuple" in node:
        return tuple(_decode(v, tensors) for v in node["tuple"])
    raise ValueError(f"unexpected node {str(node)[:80]}")


def _hashable(key: Any) -> Any:
    if isinstance(key, (list, dict, torch.Tensor, np.ndarray)):
        raise ValueError(f"a dict key of type {type(key).__name__}")
    return key
