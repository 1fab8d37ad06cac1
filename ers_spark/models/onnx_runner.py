"""Run an ONNX face embedding model with ONNX Runtime, on CPU or on one CUDA device.

The embedder is meant to be shipped to Spark workers: it pickles as (path, spec, settings)
and opens its InferenceSession lazily in the worker, once per process.

Example
-------
>>> import tempfile
>>> import numpy as np
>>> from ers_spark.models.spec import load_model_spec, resolve_model_file
>>> from ers_spark.models.onnx_runner import OnnxEmbedder
>>> spec = load_model_spec("dlib_resnet_v1")
>>> emb = OnnxEmbedder(resolve_model_file(spec, tempfile.mkdtemp()), spec)
>>> unit, norms = emb.embed(np.zeros((2, 3, 150, 150), np.float32))
>>> unit.shape, norms.shape
((2, 128), (2,))
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ers_spark.errors import ModelError
from ers_spark.models.devices import CPU_PROVIDER, CUDA_PROVIDER, check_onnxruntime
from ers_spark.models.spec import ModelSpec

log = logging.getLogger(__name__)

def l2_normalize(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit-length rows and their original norms (zero rows stay zero)."""
    raw = np.asarray(raw, dtype=np.float32).reshape(raw.shape[0], -1)
    norms = np.linalg.norm(raw, axis=1).astype(np.float32)
    safe = np.where(norms > 0, norms, 1.0).astype(np.float32)
    return (raw / safe[:, None]).astype(np.float32), norms


class OnnxEmbedder:
    """Face embedder backed by an ONNX Runtime session.

    Parameters
    ----------
    model_path : path-like
        The ONNX file (see :func:`ers_spark.models.spec.resolve_model_file`).
    spec : ModelSpec
        The model's spec; its ``embedding_dim`` is checked against the model output.
    device_id : int, optional
        CUDA device to run on; None runs on CPU.
    intra_op_threads : int
        ONNX Runtime intra-op threads; 0 lets ONNX Runtime choose.
    require_gpu : bool
        With ``device_id`` set: True raises :class:`ModelError` when the CUDA provider is missing
        or fails to start (``embed.device=cuda``); False falls back to the CPU and says so in
        :attr:`runtime` (``embed.device=auto``).

    Example
    -------
    >>> emb = OnnxEmbedder("model.onnx", spec, device_id=0)  # doctest: +SKIP
    >>> unit, norms = emb.embed(batch)  # doctest: +SKIP
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        spec: ModelSpec,
        device_id: int | None = None,
        intra_op_threads: int = 0,
        *,
        require_gpu: bool = False,
    ) -> None:
        self.model_path = str(model_path)
        self.spec = spec
        self.device_id = device_id
        self.intra_op_threads = int(intra_op_threads)
        self.require_gpu = bool(require_gpu)
        self._session: Any = None
        self._input_name: str | None = None
        if not Path(self.model_path).is_file():
            raise ModelError(
                f"model file not found: {self.model_path} (looked at {Path(self.model_path).resolve()}); "
                "download the ONNX file or set model.onnx_path"
            )

    # -- pickling: ship the path, re-open the session in the worker --------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_session"] = None
        state["_input_name"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"OnnxEmbedder({self.model_path!r}, spec={self.spec.name!r}, device_id={self.device_id})"

    # -- session ---------------------------------------------------------------------------
    def _requested_providers(self) -> list[Any]:
        import onnxruntime as ort

        if self.device_id is None:
            return [CPU_PROVIDER]
        check_onnxruntime(require_cuda=self.require_gpu)
        if CUDA_PROVIDER not in ort.get_available_providers():
            log.warning(
                "GPU %s given to the task but this onnxruntime has no %s (install onnxruntime-gpu); "
                "running %s on CPU", self.device_id, CUDA_PROVIDER, self.spec.name,
            )
            return [CPU_PROVIDER]
        return [(CUDA_PROVIDER, {"device_id": int(self.device_id)}), CPU_PROVIDER]

    @property
    def session(self) -> Any:
        """The ONNX Runtime session, created on first use in this process."""
        if self._session is None:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.intra_op_threads
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            try:
                session = ort.InferenceSession(
                    self.model_path, sess_options=opts, providers=self._requested_providers()
                )
            except ModelError:
                raise
            except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ModelError(f"cannot load ONNX model {self.model_path}: {first}") from exc
            self._check_gpu_started(session)
            self._input_name = self._check_input(session)
            self._session = session
        return self._session

    def _check_gpu_started(self, session: Any) -> None:
        """ONNX Runtime drops a CUDA provider that fails to start without raising: check what it kept."""
        if self.device_id is None or CUDA_PROVIDER in session.get_providers():
            return
        used = ", ".join(session.get_providers())
        if self.require_gpu:
            raise ModelError(
                f"embed.device=cuda but ONNX Runtime could not start {CUDA_PROVIDER} on device {self.device_id} "
                f"(the session runs on {used}): check the CUDA and cuDNN libraries on the executors"
            )
        log.warning("GPU %s given to the task but the ONNX Runtime session runs on %s only", self.device_id, used)

    @property
    def runtime(self) -> str:
        """Where inference actually runs, e.g. ``cuda:0 CUDAExecutionProvider`` or ``cpu CPUExecutionProvider``."""
        providers = self.session.get_providers()
        if self.device_id is not None and CUDA_PROVIDER in providers:
            return f"cuda:{self.device_id} {CUDA_PROVIDER}"
        fallback = f" (gpu {self.device_id} given, not used)" if self.device_id is not None else ""
        return f"cpu {providers[0]}{fallback}"

    def _check_input(self, session: Any) -> str:
        inputs = session.get_inputs()
        names = [i.name for i in inputs]
        name = self.spec.input_name or names[0]
        if name not in names:
            raise ModelError(
                f"model {self.model_path} has no input {name!r} (inputs: {', '.join(names)}); "
                "fix model.input_name or set it to null"
            )
        shape = next(i.shape for i in inputs if i.name == name)
        h, w = self.spec.input_height, self.spec.input_width
        expected = [3, h, w] if self.spec.layout == "NCHW" else [h, w, 3]
        if len(shape) != 4 or any(isinstance(s, int) and s != e for s, e in zip(shape[1:], expected)):
            raise ModelError(
                f"model {self.model_path} input {name!r} has shape {shape}, but the spec "
                f"{self.spec.name!r} gives {['N', *expected]} ({self.spec.layout}); fix the model spec"
            )
        return name

    @property
    def providers(self) -> list[str]:
        """Execution providers the session actually uses (e.g. ``['CPUExecutionProvider']``)."""
        return list(self.session.get_providers())

    @property
    def input_name(self) -> str:
        """Name of the model input fed by :meth:`embed`."""
        _ = self.session
        assert self._input_name is not None
        return self._input_name

    # -- inference -------------------------------------------------------------------------
    def embed(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Embed a preprocessed batch.

        Parameters
        ----------
        batch : numpy.ndarray
            float32 batch from :func:`ers_spark.models.preprocess.decode_batch`.

        Returns
        -------
        unit : numpy.ndarray
            float32 ``[N, D]`` L2-normalised embeddings.
        raw_norms : numpy.ndarray
            float32 ``[N]`` norms of the raw model outputs.
        """
        dim = self.spec.embedding_dim
        if batch.shape[0] == 0:
            return np.zeros((0, dim), np.float32), np.zeros((0,), np.float32)
        session = self.session
        raw = session.run(None, {self._input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]
        raw = np.asarray(raw).reshape(batch.shape[0], -1)
        if raw.shape[1] != dim:
            raise ModelError(
                f"model {self.model_path} gives {raw.shape[1]}-D embeddings but the spec "
                f"{self.spec.name!r} says embedding_dim={dim}; fix the model spec"
            )
        return l2_normalize(raw)
