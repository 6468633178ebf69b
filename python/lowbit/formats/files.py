"""What every checkpoint format shares: where lowbit may write, how a directory is replaced so
that the old or the new checkpoint is complete at every instant, writing a state dict as
safetensors shards, reading safetensors files that are bounded by, and resolve inside, the
checkpoint directory, and checking what they hold against config.json."""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import re
import shutil
import struct
import tempfile
from typing import Callable, Dict, Iterable, List, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

TEMP_PREFIX = ".lowbit-"
# .lowbit-<pid>-<mkdtemp suffix>: a new checkpoint being written (after an exchange, the old one
# being deleted); .lowbit-<pid>-old-<name>: the old checkpoint moved aside where the file system
# cannot exchange two directories atomically.
_TEMP_NAME = re.compile(rf"^{re.escape(TEMP_PREFIX)}(\d+)-(old-(.+)|[^-]+)$")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Shard size of the safetensors files (transformers' default).
MAX_SHARD_SIZE = "5GB"


# ---------------------------------------------------------------- where lowbit may write

def _is_same_or_ancestor(path: str, other: str) -> bool:
    """path == other, or path is a directory above other (both absolute and resolved)."""
    return other == path or other.startswith(path.rstrip(os.sep) + os.sep)


def model_directories(model) -> List[str]:
    """The local directories a model was loaded from (config._name_or_path / name_or_path)."""
    names = {getattr(model, "name_or_path", None), getattr(getattr(model, "config", None), "_name_or_path", None)}
    return sorted(os.path.realpath(n) for n in names if isinstance(n, str) and n and os.path.isdir(n))


def check_output_dir(output_dir, overwrite: bool = False, protected: Iterable[str] = (),
                     lowbit_output: Callable[[str], bool] = lambda directory: False) -> str:
    """The absolute path lowbit may write a checkpoint to, or a ValueError naming what is wrong.

    Refused: an empty path, "/", the home directory, the working directory or any directory
    above it, any of `protected` (the model's own directory) or a directory above one, a
    symbolic link, and an existing file. An existing non-empty directory is replaced only with
    overwrite=True, and only when it holds a checkpoint (config.json) or what
    lowbit_output(directory) recognises as lowbit's (a GGUF output): lowbit never deletes a
    directory that is not one."""
    if not isinstance(output_dir, (str, os.PathLike)):
        raise TypeError(f"output_dir must be a path (str or os.PathLike), got {type(output_dir).__name__}")
    path = os.fspath(output_dir)
    if isinstance(path, bytes):
        raise TypeError("output_dir must be a str path, not bytes")
    if not path.strip():
        raise ValueError(f"output_dir {path!r} is empty: name a new directory for the checkpoint")
    if os.path.islink(path):
        raise ValueError(f"output_dir {path!r} is a symbolic link; pass the directory it points to, "
                         f"{os.path.realpath(path)!r}, or a new path")
    real = os.path.realpath(path)
    refusals = [
        (real == os.path.realpath(os.sep), "is the root directory"),
        (real == os.path.realpath(os.path.expanduser("~")), "is the home directory"),
        (_is_same_or_ancestor(real, os.path.realpath(os.getcwd())), "is the working directory or a directory above it"),
    ]
    for protected_dir in protected:
        refusals.append((_is_same_or_ancestor(real, os.path.realpath(protected_dir)),
                         f"is (or holds) the directory the model was loaded from, {protected_dir!r}"))
    for refused, why in refusals:
        if refused:
            raise ValueError(f"output_dir {path!r} ({real}) {why}: lowbit will not write a checkpoint over it; "
                             "choose a new directory")
    if os.path.exists(real) and not os.path.isdir(real):
        raise ValueError(f"output_dir {path!r} exists and is not a directory")
    if os.path.isdir(real) and os.listdir(real):
        if not overwrite:
            raise ValueError(f"output_dir {path!r} is not empty; pass overwrite=True to replace the checkpoint "
                             "there, or choose a new directory")
        if not os.path.isfile(os.path.join(real, "config.json")) and not lowbit_output(real):
            raise ValueError(f"output_dir {path!r} is not empty and holds no checkpoint (no config.json, nor only a "
                             "GGUF file lowbit wrote): lowbit replaces only checkpoint directories, even with "
                             "overwrite=True; choose a new directory")
    return real


# ---------------------------------------------------------------- replacing a directory atomically

def _exchange(a: str, b: str) -> bool:
    """Swap two directories in one step (Linux renameat2 RENAME_EXCHANGE); False where the
    system or file system cannot."""
    rename_exchange, at_fdcwd = 2, -100
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot exchange {a!r} and {b!r}: {os.strerror(err)}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temp_dirs(parent: str) -> None:
    """Clean up after saves into `parent` that were killed: their temporary directories go,
    and an old checkpoint that was moved aside and never replaced goes back to its place."""
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for entry in entries:
        match = _TEMP_NAME.match(entry)
        path = os.path.join(parent, entry)
        if not match or os.path.islink(path) or not os.path.isdir(path):
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        original = match.group(3)
        if original is not None and not os.path.lexists(os.path.join(parent, original)):
            os.rename(path, os.path.join(parent, original))
        else:
            shutil.rmtree(path, ignore_errors=True)


def temp_directory(parent: str) -> str:
    """A new private directory .lowbit-<pid>-* in `parent` (a checkpoint being written, or a
    streamed oneshot's spill), after removing what killed saves left there."""
    remove_stale_temp_dirs(parent)
    return tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=parent)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            _fsync(os.path.join(directory, name))
        _fsync(directory)


def write_directory(output_dir, write: Callable[[str], None], overwrite: bool = False,
                    protected: Iterable[str] = (), lowbit_output: Callable[[str], bool] = lambda directory: False) -> str:
    """Have `write(tmp)` fill a new temporary directory beside `output_dir`, then put it in
    place so that `output_dir` holds the old checkpoint or the complete new one at every
    instant (an atomic exchange of the two directories; the old one is then deleted). A
    failure or a kill leaves the old checkpoint in place; the next save into the same parent
    removes what a killed one left behind. lowbit_output: see check_output_dir. Returns the
    absolute path written."""
    target = check_output_dir(output_dir, overwrite, protected, lowbit_output)
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    tmp = temp_directory(parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should be an ordinary directory
    try:
        write(tmp)
        for directory, _, names in os.walk(tmp):  # safetensors creates its files private (0600): make them ordinary
            for name in names:
                os.chmod(os.path.join(directory, name), 0o666 & ~umask)
        _fsync_tree(tmp)
        check_output_dir(target, overwrite, protected, lowbit_output)  # nothing changed under us while writing
        if not os.path.isdir(target):
            os.rename(tmp, target)
        elif not _exchange(tmp, target):
            aside = os.path.join(parent, f"{TEMP_PREFIX}{os.getpid()}-old-{name}")
            os.rename(target, aside)
            os.rename(tmp, target)
            tmp = aside
        _fsync(parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the failed new data, or the replaced old checkpoint
    return target


# ---------------------------------------------------------------- writing safetensors

def state_with(model: torch.nn.Module, replaced: Dict[str, Dict[str, torch.Tensor]],
               skip: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """model.state_dict() with the tensors of each module in `replaced` (but its bias) swapped
    for replaced[module] (local names), sorted by name; tied duplicates (an lm_head sharing
    the embedding) are dropped, transformers re-ties them. skip: a module whose tensors are
    left out (the decoder layers of a streamed model, saved one by one)."""
    state, seen = {}, set()
    for key, tensor in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if (owner in replaced and leaf != "bias") or (skip is not None and key.startswith(skip + ".")):
            continue
        if tensor.numel() and tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        state[key] = tensor
    for owner, tensors in replaced.items():
        state.update({f"{owner}.{k}": v for k, v in tensors.items()})
    return {k: state[k].detach().contiguous() for k in sorted(state)}


def _shards(layout: Dict[str, torch.Tensor], max_shard_size):
    """huggingface_hub's split of tensors of `layout`'s shapes and dtypes into shards, filled in
    name order. It is computed on meta placeholders, so a tensor counts its own bytes (not a
    larger storage it views) and a streamed save splits exactly as an in-memory one."""
    from huggingface_hub import split_torch_state_dict_into_shards

    meta = {k: torch.empty(layout[k].shape, dtype=layout[k].dtype, device="meta") for k in sorted(layout)}
    return split_torch_state_dict_into_shards(meta, max_shard_size=max_shard_size)


def _write_index(split, directory: str) -> None:
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        with open(os.path.join(directory, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)


def write_safetensors(state: Dict[str, torch.Tensor], directory: str, max_shard_size=MAX_SHARD_SIZE) -> None:
    """`state` as model.safetensors, or as shards of at most `max_shard_size` with their index."""
    split = _shards(state, max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: state[k] for k in keys}, os.path.join(directory, filename), metadata=SAFETENSORS_METADATA)
    _write_index(split, directory)


SAFETENSORS_METADATA = {"format": "pt"}


@functools.lru_cache(maxsize=None)
def _safetensors_dtype_rank() -> Dict[torch.dtype, int]:
    """The order in which safetensors lays out tensors of different dtypes (then by name), read
    off the installed library: one tensor of each dtype, serialized, in header order."""
    from safetensors.torch import save

    probe = {f"t{i}": torch.zeros(1, dtype=dtype) for i, dtype in enumerate(_SAFETENSORS_DTYPES.values())}
    raw = save(probe)
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    return {probe[key].dtype: rank for rank, key in enumerate(k for k in header if k != "__metadata__")}


def safetensors_header(layout: Dict[str, torch.Tensor], metadata=SAFETENSORS_METADATA):
    """(the header bytes safetensors' save_file writes for tensors of `layout`'s names, dtypes
    and shapes, [(name, offset of its data after the header, nbytes)] in file order)."""
    rank, names = _safetensors_dtype_rank(), {v: k for k, v in _SAFETENSORS_DTYPES.items()}
    order = sorted(layout, key=lambda k: (rank[layout[k].dtype], k))
    entries, doc, offset = [], {"__metadata__": dict(metadata)}, 0
    for key in order:
        t = layout[key]
        nbytes = t.numel() * t.element_size()
        doc[key] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        entries.append((key, offset, nbytes))
        offset += nbytes
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, entries


class TensorSpill:
    """Tensors written to one file as they are produced (a decoder layer's checkpoint tensors
    while the next layer is calibrated), to be assembled into safetensors shards at the end
    without holding them in memory. The file lives in the caller's directory (the checkpoint's
    temporary directory, removed with it)."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, ".lowbit-spill.bin")
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self.layout: Dict[str, torch.Tensor] = {}  # name -> meta tensor of its dtype and shape
        self._offsets: Dict[str, int] = {}
        self._end = 0

    def put(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.layout:
            raise ValueError(f"tensor {name!r} was spilled twice")
        data = tensor.detach().contiguous()
        view = memoryview(data.view(-1).view(torch.uint8).numpy()) if data.numel() else memoryview(b"")
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], self._end + done)
        self.layout[name] = torch.empty(data.shape, dtype=data.dtype, device="meta")
        self._offsets[name] = self._end
        self._end += len(view)

    def copy_to(self, name: str, fd: int, offset: int) -> None:
        """Write tensor `name`'s bytes into file `fd` at `offset` (a kernel copy: no user memory)."""
        t = self.layout[name]
        left, src, dst = t.numel() * t.element_size(), self._offsets[name], offset
        while left:
            n = os.copy_file_range(self._fd, fd, left, src, dst)
            if n == 0:
                raise OSError(f"the spill file {self.path} ended early (was it truncated?)")
            left, src, dst = left - n, src + n, dst + n

    def write_safetensors(self, directory: str, max_shard_size=MAX_SHARD_SIZE) -> None:
        """The spilled tensors as write_safetensors writes the same tensors: the same shards, bytes
        and index."""
        split = _shards(self.layout, max_shard_size)
        for filename, keys in split.filename_to_tensors.items():
            header, entries = safetensors_header({k: self.layout[k] for k in keys})
            fd = os.open(os.path.join(directory, filename), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                done = 0
                while done < len(header):
                    done += os.write(fd, header[done:])
                for key, offset, _ in entries:
                    self.copy_to(key, fd, len(header) + offset)
            finally:
                os.close(fd)
        _write_index(split, directory)

    def close(self) -> None:
        """Delete the spill file."""
        if self._fd is not None:
            os.close(self._fd)
            os.unlink(self.path)
            self._fd = None


# ---------------------------------------------------------------- reading safetensors

def _inside(root: str, name: str, what: str) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} names the file {name!r}, which is not a file name")
    path = os.path.realpath(os.path.join(root, name))
    if not path.startswith(root + os.sep):
        raise ValueError(f"{what} names {name!r}, which resolves to {path}, outside the checkpoint directory "
                         f"{root}: lowbit reads only files inside it")
    if not os.path.isfile(path):
        raise ValueError(f"{what} names {name!r}, which does not exist in {root}")
    return path


def read_index(path: str) -> Optional[Dict[str, str]]:
    """The weight_map (tensor name -> file name) of a sharded checkpoint, None for one file."""
    index = os.path.join(path, INDEX_FILE)
    if not os.path.isfile(index):
        return None
    try:
        with open(index, encoding="utf-8") as f:
            doc = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{index} is not valid JSON ({type(e).__name__}: {e}); re-save the checkpoint") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise ValueError(f"{index} needs a non-empty 'weight_map' object of tensor name -> file name strings; "
                         "re-save the checkpoint")
    return weight_map


def safetensors_files(path: str) -> List[str]:
    """The checkpoint's safetensors files, each checked to resolve inside `path`."""
    root = os.path.realpath(path)
    weight_map = read_index(path)
    if weight_map is not None:
        return [_inside(root, name, INDEX_FILE) for name in sorted(set(weight_map.values()))]
    if not os.path.lexists(os.path.join(path, SINGLE_FILE)):
        raise ValueError(f"{path!r} holds no {SINGLE_FILE} (lowbit loads safetensors only, never pickles)")
    return [_inside(root, SINGLE_FILE, "the checkpoint")]


def _for_each_file(path: str, read: Callable[[str, "safe_open", List[str]], None]) -> None:
    """Open every safetensors file once and call read(file, handle, keys), checking that no
    tensor appears twice and that each sits in the file the index names."""
    root, weight_map = os.path.realpath(path), read_index(path)
    seen: Dict[str, str] = {}
    for file in safetensors_files(path):
        try:
            handle = safe_open(file, framework="pt")
        except Exception as e:  # safetensors raises its own SafetensorError for a corrupt header
            raise ValueError(f"{file} is not a readable safetensors file ({e})") from None
        with handle as f:
            keys = list(f.keys())
            for key in keys:
                if key in seen:
                    raise ValueError(f"tensor {key!r} is stored twice, in {seen[key]} and {file}")
                if weight_map is not None and (key not in weight_map
                                               or os.path.realpath(os.path.join(root, weight_map[key])) != file):
                    raise ValueError(f"tensor {key!r} is in {file}, but {INDEX_FILE} places it in "
                                     f"{weight_map.get(key)!r}")
                seen[key] = file
            read(file, f, keys)
    if weight_map is not None:
        lost = sorted(set(weight_map) - set(seen))
        if lost:
            raise ValueError(f"{INDEX_FILE} lists {lost[0]!r}, which no safetensors file holds")


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def read_headers(path: str) -> Dict[str, torch.Tensor]:
    """Every stored tensor as an empty meta tensor of its stored dtype and shape: what the
    files declare, read from their headers without loading any data."""
    return stored_tensors(path)[0]


def stored_tensors(path: str):
    """(read_headers(path), every stored tensor's name -> the safetensors file that holds it),
    from one pass over the files."""
    headers: Dict[str, torch.Tensor] = {}
    where: Dict[str, str] = {}

    def read(file, f, keys):
        for key in keys:
            view = f.get_slice(key)
            dtype = _SAFETENSORS_DTYPES.get(view.get_dtype())
            if dtype is None:
                raise ValueError(f"tensor {key!r} in {file} has dtype {view.get_dtype()}, which lowbit does not read")
            headers[key] = torch.empty(view.get_shape(), dtype=dtype, device="meta")
            where[key] = file

    _for_each_file(path, read)
    return headers, where


def read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """All tensors of the checkpoint directory (single file or index + shards)."""
    state: Dict[str, torch.Tensor] = {}

    def read(file, f, keys):
        for key in keys:
            try:
                state[key] = f.get_tensor(key)
            except Exception as e:  # data shorter than the header says, for one
                raise ValueError(f"{file} is not a readable safetensors file ({e})") from None

    _for_each_file(path, read)
    return state


# ---------------------------------------------------------------- checking files against config.json

FLOAT_STORAGE = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MODEL_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype, what: str) -> Optional[torch.dtype]:
    """None, "auto", a float dtype or its name -> None or the torch dtype."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, str):
        dtype = MODEL_DTYPES.get(dtype.replace("torch.", ""), dtype)
    if dtype not in MODEL_DTYPES.values():
        raise ValueError(f"{what} must be float32, float16, bfloat16 or 'auto', got {dtype!r}")
    return dtype


def read_config(path: str):
    """(the transformers config, the quantization_config dict or None) of a checkpoint
    directory, with config.json's own fields checked first so that a malformed file is a
    ValueError naming the key, not an error from deep inside transformers. The returned config
    holds no quantization_config: lowbit builds the quantized layers itself."""
    from transformers import AutoConfig

    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise ValueError(f"{path!r} holds no config.json: not a model checkpoint")
    try:
        with open(file, encoding="utf-8") as f:
            doc = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{file} is not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(doc).__name__}")
    qc = doc.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise TypeError(f"{file}: quantization_config must be an object (or absent), got {type(qc).__name__} "
                        f"{str(qc)[:80]!r}")
    for key in ("dtype", "torch_dtype"):
        resolve_dtype(doc.get(key), f"{file}: {key!r}")
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, TypeError, KeyError, AttributeError, OSError, RecursionError) as e:
        raise ValueError(f"{file} cannot be read as a transformers config ({type(e).__name__}: {e})") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = resolve_dtype(config.dtype, f"{file}: 'dtype'")
    return config, qc


def check_layer_count(config, stored: Dict[str, torch.Tensor]) -> None:
    """Refuse a config that declares more decoder layers than the files hold, before a
    skeleton of that many layers is built."""
    declared = getattr(config, "num_hidden_layers", None)
    if not isinstance(declared, int):
        return
    indices = [int(i) for key in stored for i in re.findall(r"\.(\d+)\.", key)]
    held = max(indices) + 1 if indices else 0
    if declared > held:
        raise ValueError(f"config.json declares {declared} decoder layers (num_hidden_layers) but the safetensors "
                         f"files hold tensors for {held}; the config does not belong to these files")


def _looks_quantized(key: str, tensor: torch.Tensor) -> bool:
    leaf = key.rsplit(".", 1)[-1]
    return leaf in ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape", "SCB",
                    "absmax", "quant_map", "nested_absmax") or "quant_state" in key \
        or (leaf == "weight" and tensor.dtype not in FLOAT_STORAGE)


def check_against_skeleton(model: torch.nn.Module, state: Dict[str, torch.Tensor], path: str,
                           unquantized: bool = False) -> None:
    """Every tensor of `state` (what the files hold) must be one the model expects, with its
    shape and a dtype of the same kind (any float dtype for a float tensor, exactly the dtype
    for an integer one), and every tensor the model expects must be there (tied copies
    aside). `model` is a meta-device skeleton, so nothing was allocated for a wrong config."""
    expected = model.state_dict(keep_vars=True)
    first_owner: Dict[int, str] = {}
    tied = set()
    for key, tensor in expected.items():
        if id(tensor) in first_owner:
            tied.add(key)
        first_owner.setdefault(id(tensor), key)
    skip_unexpected = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
    skip_missing = list(getattr(model, "_keys_to_ignore_on_load_missing", None) or [])
    for key in sorted(state):
        stored = state[key]
        if key not in expected:
            if any(re.search(p, key) for p in skip_unexpected):
                continue
            hint = (": the files hold quantized tensors, but config.json has no quantization_config"
                    if unquantized and _looks_quantized(key, stored) else "")
            raise ValueError(f"{path}: the files hold {key!r} ({stored.dtype}, {tuple(stored.shape)}), which the model "
                             f"config.json describes has no place for{hint}")
        want = expected[key]
        if tuple(stored.shape) != tuple(want.shape):
            raise ValueError(f"{path}: {key!r} has shape {tuple(stored.shape)} in the files, but config.json makes it "
                             f"{tuple(want.shape)}")
        if want.dtype in FLOAT_STORAGE:
            ok, wanted = stored.dtype in FLOAT_STORAGE, "a float dtype (float32, float16, bfloat16)"
        else:
            ok, wanted = stored.dtype == want.dtype, str(want.dtype)
        if not ok:
            raise ValueError(f"{path}: {key!r} is stored as {stored.dtype}, expected {wanted}")
    missing = [k for k in expected if k not in state and k not in tied
               and not any(re.search(p, k) for p in skip_missing)]
    if missing:
        raise ValueError(f"{path}: {missing[0]!r} is missing from the files"
                         f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; the checkpoint is "
                         "incomplete or its config.json belongs to another model")


def check_loading_info(info: dict, path: str) -> None:
    """transformers' own account of a from_pretrained load: anything left out is an error."""
    for what in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        found = sorted(map(str, info.get(what) or []))
        if found:
            raise ValueError(f"{path}: transformers reports {what.replace('_', ' ')} {found[:3]}; the files and "
                             "config.json disagree")


def check_quantized_values(model: torch.nn.Module, path: str) -> None:
    """Each quantized module checks the values it loaded (scales finite and positive, zero
    points and group indices in range ...), so a tampered file is an error, not wrong logits."""
    for name, module in model.named_modules():
        check = getattr(module, "check_state", None)
        if callable(check):
            try:
                check(name)
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}: {e}") from None
