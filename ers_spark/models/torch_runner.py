"""Run a converted face model with torch (optional backend: ``pip install 'ers-spark[torch]'``).

Why: on clusters where torch with CUDA is already installed but onnxruntime-gpu is not, the
same ONNX file can run on the GPU (optionally in fp16). The module below interprets the small
ONNX op set that :mod:`ers_spark.models.dlib_convert` emits (plus a few common ones), with
the graph's initializers as torch buffers; no onnx2torch dependency is needed.

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

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ers_spark.errors import ModelError
from ers_spark.models.onnx_runner import l2_normalize
from ers_spark.models.spec import ModelSpec


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise ModelError("torch backend needs torch: pip install 'ers-spark[torch]'") from exc
    return torch


def _sym_pads(op: str, pads: list[int]) -> tuple[int, int]:
    """ONNX 2-D pads [top, left, bottom, right] as torch's symmetric (pad_h, pad_w)."""
    if not pads:
        return (0, 0)
    top, left, bottom, right = pads
    if (top, left) != (bottom, right):
        raise ModelError(f"torch backend cannot run {op} with asymmetric pads {pads}")
    return (top, left)


# --------------------------------------------------------------------------------------------
# One function per ONNX op: (context, input names, attributes) -> output tensor
# --------------------------------------------------------------------------------------------


class _OpContext:
    """What an op reads while the graph runs: tensors by name and the integer initializers.

    Why: a tensor is either computed earlier in this run (``env``) or a float initializer
    stored as a buffer of the module, so ops look names up here instead of in either place.
    """

    def __init__(self, module: Any, env: dict[str, Any]) -> None:
        import torch.nn.functional as F

        self.module = module
        self.env = env
        self.ints: dict[str, list[int]] = module.ints
        self.F = F

    def val(self, name: str) -> Any:
        """The tensor called ``name``: a result of this run, else a float initializer."""
        if name in self.env:
            return self.env[name]
        return getattr(self.module, self.module.buffer_of[name])


Attrs = dict[str, Any]


def _has_input(ins: list[str], k: int) -> bool:
    """ONNX optional inputs: absent, or present with an empty name."""
    return len(ins) > k and bool(ins[k])


def _conv(ctx: _OpContext, ins: list[str], at: Attrs) -> Any:
    w = ctx.val(ins[1])
    b = ctx.val(ins[2]) if _has_input(ins, 2) else None
    return ctx.F.conv2d(ctx.val(ins[0]), w, b, stride=tuple(at.get("strides", [1, 1])),
                        padding=_sym_pads("Conv", list(at.get("pads", []))),
                        dilation=tuple(at.get("dilations", [1, 1])), groups=at.get("group", 1))


def _relu(ctx: _OpContext, ins: list[str], at: Attrs) -> Any:
    return ctx.F.relu(ctx.val(ins[0]))


def _add(ctx: _OpContext, ins: list[str], at: Attrs) -> Any:
    return ctx.val(ins[0]) + ctx.val(ins[1])


def _mul(ctx: _OpContext, ins: list[str], at: Attrs) -> Any:
    return ctx.val(ins[0]) * ctx.val(ins[1])


def _sub(ctx: _OpContext, ins: list[str], at: Attrs) -> Any:
    return ctx.val(ins[0]) - ctx.val(ins[1])


def _div(ctx: _OpContext, ins: list[str], at: Attrs) -> Any:
    return ctx.val(ins[0]) / ctx.val(ins[1])


def _pad(ctx: _OpContext, ins: list[str], at: Attrs) -> Any:
    if at.get("mode", b"constant") not in (b"constant", "constant"):
        raise ModelError("torch backend runs only constant Pad")
    pads = ctx.ints[ins[1]]
    half = len(pads) // 2
    torch_pads: list[int] = []
    for d in range(half - 1, -1, -1):  # torch wants last dim first
        torch_pads += [pads[d], pads[d + half]]
    return ctx.F.pad(ctx.val(ins[0]), torch_pads, mode="constant", value=0.0)


def _average_pool(ctx: _OpContext, ins: list[str], at: Attrs) -> Any:
    return ctx.F.avg_pool2d(ctx.val(ins[0]), tuple(at["kernel_shape"]), tuple(at.get("strides", [1, 1])),
                            padding=_sym_pads("AveragePool", list(at.get("pads", []))),
                            ceil_mode=bool(at.get("ceil_mode", 0)),
                            count_include_pad=bool(at.get("count_include_pad", 0)))


def _max_pool(ctx: _OpContext, ins: list[str], at: Attrs) -> Any:
    return ctx.F.max_pool2d(ctx.val(ins[0]), tuple(at["kernel_shape"]), tuple(at.get("strides", [1, 1])),
                            padding=_sym_pads("MaxPool", list(at.get("pads", []))),
                            ceil_mode=bool(at.get("ceil_mode", 0)))


def _global_average_pool(ctx: _OpContext, ins: list[str], at: Attrs) -> Any:
    return ctx.val(ins[0]).mean(dim=(2, 3), keepdim=True)


def _global_max_pool(ctx: _OpContext, ins: list[str], at: Attrs) -> Any:
    return ctx.val(ins[0]).amax(dim=(2, 3), keepdim=True)


def _flatten(ctx: _OpContext, ins: list[str], at: Attrs) -> Any:
    t = ctx.val(ins[0])
    lead = 1
    for s in t.shape[: at.get("axis", 1)]:
        lead *= s
    return t.reshape(lead, -1)


def _reshape(ctx: _OpContext, ins: list[str], at: Attrs) -> Any:
    t = ctx.val(ins[0])
    return t.reshape([t.shape[i] if s == 0 else s for i, s in enumerate(ctx.ints[ins[1]])])


def _matmul(ctx: _OpContext, ins: list[str], at: Attrs) -> Any:
    return ctx.val(ins[0]) @ ctx.val(ins[1])


def _gemm(ctx: _OpContext, ins: list[str], at: Attrs) -> Any:
    a, c = ctx.val(ins[0]), ctx.val(ins[1])
    a = a.t() if at.get("transA", 0) else a
    c = c.t() if at.get("transB", 0) else c
    y = at.get("alpha", 1.0) * (a @ c)
    if _has_input(ins, 2):
        y = y + at.get("beta", 1.0) * ctx.val(ins[2])
    return y


def _identity(ctx: _OpContext, ins: list[str], at: Attrs) -> Any:
    return ctx.val(ins[0])


def _slice(ctx: _OpContext, ins: list[str], at: Attrs) -> Any:
    t = ctx.val(ins[0])
    starts, ends = ctx.ints[ins[1]], ctx.ints[ins[2]]
    axes = ctx.ints[ins[3]] if _has_input(ins, 3) else list(range(len(starts)))
    steps = ctx.ints[ins[4]] if _has_input(ins, 4) else [1] * len(starts)
    index = [slice(None)] * t.dim()
    for s, e, ax, st in zip(starts, ends, axes, steps):
        index[ax] = slice(s, min(e, t.shape[ax]), st)
    return t[tuple(index)]


def _batch_normalization(ctx: _OpContext, ins: list[str], at: Attrs) -> Any:
    v = ctx.val
    return ctx.F.batch_norm(v(ins[0]), v(ins[3]), v(ins[4]), v(ins[1]), v(ins[2]),
                            training=False, eps=at.get("epsilon", 1e-5))


OPS: dict[str, Callable[[_OpContext, list[str], Attrs], Any]] = {
    "Conv": _conv, "Relu": _relu, "Add": _add, "Mul": _mul, "Sub": _sub, "Div": _div, "Pad": _pad,
    "AveragePool": _average_pool, "MaxPool": _max_pool, "GlobalAveragePool": _global_average_pool,
    "GlobalMaxPool": _global_max_pool, "Flatten": _flatten, "Reshape": _reshape, "MatMul": _matmul,
    "Gemm": _gemm, "Identity": _identity, "Slice": _slice, "BatchNormalization": _batch_normalization,
}
SUPPORTED_OPS = tuple(OPS)


# --------------------------------------------------------------------------------------------
# The module: load the graph once, run its nodes in order
# --------------------------------------------------------------------------------------------


def _load_graph(module: Any, graph: Any) -> None:
    """Keep the graph on ``module``: float initializers as buffers, the rest as plain Python.

    Why buffers: ``.to(device)`` and ``.half()`` then move the weights with the module.
    """
    torch = _import_torch()
    from onnx import helper, numpy_helper

    module.buffer_of = {}
    module.ints = {}
    for i, init in enumerate(graph.initializer):
        arr = numpy_helper.to_array(init)
        if np.issubdtype(arr.dtype, np.floating):
            key = f"p{i}"
            module.register_buffer(key, torch.from_numpy(np.array(arr, dtype=np.float32)))
            module.buffer_of[init.name] = key
        else:
            module.ints[init.name] = [int(v) for v in arr.ravel()]
    init_names = {init.name for init in graph.initializer}
    module.input_names = [i.name for i in graph.input if i.name not in init_names]
    module.output_name = graph.output[0].name
    module.nodes = [
        (n.op_type, list(n.input), list(n.output), {a.name: helper.get_attribute_value(a) for a in n.attribute})
        for n in graph.node
    ]


def _run_nodes(module: Any, x: Any) -> Any:
    """Evaluate the loaded nodes in graph order on input ``x``; return the graph's output."""
    ctx = _OpContext(module, {module.input_names[0]: x})
    for op, ins, outs, at in module.nodes:
        run_op = OPS.get(op)
        if run_op is None:  # pragma: no cover - filtered in build_torch_module
            raise ModelError(f"torch backend cannot run ONNX op {op}")
        ctx.env[outs[0]] = run_op(ctx, ins, at)
    return ctx.env[module.output_name]


@functools.lru_cache(maxsize=1)
def _graph_module_class() -> Any:
    """The ``torch.nn.Module`` subclass, defined on first use so this file imports without torch."""
    torch = _import_torch()

    class OnnxGraphModule(torch.nn.Module):  # type: ignore[misc, name-defined]
        """Evaluates one ONNX graph (supported ops only) with torch."""

        def __init__(self, graph: Any) -> None:
            super().__init__()
            _load_graph(self, graph)

        def forward(self, x: Any) -> Any:
            return _run_nodes(self, x)

    return OnnxGraphModule


def build_torch_module(model: Any) -> Any:
    """Build a ``torch.nn.Module`` that evaluates an ONNX ModelProto (supported ops only).

    Float initializers become buffers (so ``.to(device)`` and ``.half()`` move them);
    integer initializers (shapes, pads, slice bounds) stay Python lists.
    """
    module_class = _graph_module_class()
    unsupported = sorted({n.op_type for n in model.graph.node} - set(SUPPORTED_OPS))
    if unsupported:
        raise ModelError(f"torch backend cannot run ONNX op(s) {', '.join(unsupported)}")
    return module_class(model.graph).eval()


class TorchEmbedder:
    """Face embedder running a converted ONNX model with torch.

    Parameters
    ----------
    model_path : path-like
        ONNX file written by :mod:`ers_spark.models.dlib_convert` (or any model using the
        supported op set).
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
                "download the ONNX file or set model.onnx_path"
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
            import onnx

            self._check_device()
            module = build_torch_module(onnx.load(self.model_path)).to(self.device)
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
