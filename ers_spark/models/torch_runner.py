"""Run a face model with torch (optional backend: ``pip install 'ers-spark[torch]'``).

Why: a PyTorch user holds a TorchScript file (``torch.jit.save``, ``.pt``) or a ``torch.export`` program
(``torch.export.save``, ``.pt2``), not an ONNX graph; and on clusters where torch with CUDA is installed but
onnxruntime-gpu is not, an ONNX model runs on the GPU too (optionally in fp16). Each format is loaded by
PyTorch's own loader; an ONNX graph becomes a ``torch.nn.Module`` through the maintained converter
``onnx2torch``, so any op it supports runs (PRelu of ArcFace networks included), not a hand-picked set.

Example
-------
>>> import numpy as np
>>> from ers_spark.models.spec import load_model_spec, resolve_model_file
>>> from ers_spark.models.torch_runner import TorchEmbedder
>>> spec = load_model_spec("dlib_resnet_v1")
>>> emb = TorchEmbedder(resolve_model_file(spec, "/tmp/ers-models"), spec, device="cpu")  # doctest: +SKIP
>>> unit, norms = emb.embed(np.zeros((2, 3, 150, 150), np.float32))  # doctest: +SKIP
>>> unit.shape  # doctest: +SKIP
(2, 128)
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ers_spark.errors import ModelError
from ers_spark.models.onnx_runner import l2_normalize
from ers_spark.models.spec import TORCH_SUFFIXES, ModelSpec

#: How each file suffix is opened, for messages and the run log.
TORCH_FORMATS = {".onnx": "ONNX graph via onnx2torch", ".pt": "TorchScript", ".pt2": "torch.export program"}


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise ModelError("torch backend needs torch: pip install 'ers-spark[torch]'") from exc
    return torch


def load_torch_module(path: str | os.PathLike[str]) -> Any:
    """The model at ``path`` as a ``torch.nn.Module`` on the CPU, in eval mode, by its suffix.

    ``.pt``: ``torch.jit.load``; ``.pt2``: ``torch.export.load(...).module()``; ``.onnx``:
    ``onnx2torch.convert``. Anything it cannot open is a broken job (:class:`ModelError`, one line).
    """
    torch = _import_torch()
    text = os.fspath(path)
    suffix = Path(text).suffix.lower()
    if suffix not in TORCH_FORMATS:
        raise ModelError(f"torch backend cannot open {text}: expected one of "
                         f"{', '.join(f'{s} ({f})' for s, f in TORCH_FORMATS.items())}")
    try:
        with warnings.catch_warnings():  # torch.jit's deprecation notice, once per worker, is noise in task logs
            warnings.simplefilter("ignore", FutureWarning)
            if suffix == ".pt2":  # exported in the mode it was traced in (eval() is refused on it)
                return torch.export.load(text).module()
            module = torch.jit.load(text, map_location="cpu") if suffix == ".pt" else _convert_onnx(text)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the loader raises, the job fails with one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"torch backend cannot load {text} as a {TORCH_FORMATS[suffix]}: {first}") from None
    return module.eval()


def _convert_onnx(path: str) -> Any:
    try:
        import onnx
        from onnx2torch import convert
    except ImportError as exc:
        raise ModelError("torch backend needs onnx2torch to run an ONNX model: pip install 'ers-spark[torch]'") from exc
    return convert(onnx.load(path))


class TorchEmbedder:
    """Face embedder running a model with torch.

    Parameters
    ----------
    model_path : path-like
        A TorchScript file (``.pt``), a ``torch.export`` program (``.pt2``) or an ONNX graph (``.onnx``,
        converted by onnx2torch), see :func:`load_torch_module`.
    spec : ModelSpec
        The model's spec (embedding size is checked against the output).
    device : str
        ``"cpu"`` or ``"cuda:0"``-style torch device.
    fp16 : bool
        Run in half precision (GPU); outputs are returned as float32.

    Example
    -------
    >>> emb = TorchEmbedder("dlib_resnet_v1.onnx", spec, device="cuda:0", fp16=True)  # doctest: +SKIP
    >>> unit, norms = emb.embed(batch)  # doctest: +SKIP
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        spec: ModelSpec,
        device: str = "cpu",
        fp16: bool = False,
    ) -> None:
        _import_torch()
        self.model_path = str(model_path)
        self.spec = spec
        self.device = device
        self.fp16 = bool(fp16)
        self._module: Any = None
        if not Path(self.model_path).is_file():
            raise ModelError(
                f"model file not found: {self.model_path} (looked at {Path(self.model_path).resolve()}); "
                "set model.torch_path (or model.onnx_path) to a file this machine can read"
            )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_module"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"TorchEmbedder({self.model_path!r}, spec={self.spec.name!r}, device={self.device!r}, fp16={self.fp16})"

    @property
    def module(self) -> Any:
        """The torch module, built on first use in this process."""
        if self._module is None:
            self._check_device()
            module = load_torch_module(self.model_path).to(self.device)
            self._module = module.half() if self.fp16 else module
        return self._module

    def _check_device(self) -> None:
        """A CUDA device that torch cannot use is a job-level failure, not a silent CPU run."""
        torch = _import_torch()
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelError(
                f"torch device {self.device} requested but torch {torch.__version__} sees no CUDA device "
                "(CPU-only wheel, or no driver on this executor); install a CUDA build of torch or use embed.device=auto"
            )

    @property
    def runtime(self) -> str:
        """Where inference runs, e.g. ``cuda:0 torch-fp16`` (parallels :attr:`OnnxEmbedder.runtime`)."""
        return f"{self.device} torch{'-fp16' if self.fp16 else ''}"

    @property
    def providers(self) -> list[str]:
        """Where the model runs, e.g. ``['torch:cuda:0:fp16']`` (parallels OnnxEmbedder.providers)."""
        return [f"torch:{self.device}{':fp16' if self.fp16 else ''}"]

    def embed(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Embed a preprocessed float32 batch; return (unit embeddings [N, D], raw norms [N])."""
        torch = _import_torch()
        dim = self.spec.embedding_dim
        if batch.shape[0] == 0:
            return np.zeros((0, dim), np.float32), np.zeros((0,), np.float32)
        module = self.module
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        if self.fp16:
            x = x.half()
        with torch.inference_mode():
            raw = module(x).float().cpu().numpy().reshape(batch.shape[0], -1)
        if raw.shape[1] != dim:
            raise ModelError(
                f"model {self.model_path} gives {raw.shape[1]}-D embeddings but the spec "
                f"{self.spec.name!r} says embedding_dim={dim}; fix the model spec"
            )
        return l2_normalize(raw)
