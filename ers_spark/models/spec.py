"""Model specs: which face model to run and how its input must be prepared.

A spec is a small YAML file (``conf/models/<name>.yaml``) naming either a builtin
model (converted on first use, see :mod:`ers_spark.models.dlib_convert`) or an ONNX file, plus
the input geometry and normalisation. Keeping this in data, not code, lets a user switch to
another ONNX face model (e.g. ArcFace) without touching Python.

Example
-------
>>> from ers_spark.models.spec import load_model_spec
>>> spec = load_model_spec("dlib_resnet_v1")
>>> (spec.input_height, spec.input_width, spec.embedding_dim, spec.std)
(150, 150, 128, (256.0, 256.0, 256.0))
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from ers_spark.errors import ConfigError, ModelError

#: Builtin models that ers_spark can produce by itself.
BUILTIN_MODELS = ("dlib_resnet_v1",)

#: Specs shipped with the package (``conf/models`` in the repository is a link to this folder).
# a Traversable, not a Path: the package may be imported from the --py-files zip
SPECS_DIR = resources.files("ers_spark").joinpath("conf", "models")

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

#: The PyTorch files a spec may name in ``torch_path`` (TorchScript, ``torch.export``); embed.backend=torch runs them.
TORCH_SUFFIXES = (".pt", ".pt2")

#: How a network's training faces were cut, by name (see :mod:`ers_spark.models.align`).
ALIGNMENT_METHODS = ("dlib_chip", "five_point_template")


@dataclass(frozen=True)
class FaceAlignment:
    """The alignment a network was trained on, declared by its spec (``alignment:``).

    ``dlib_chip``: dlib's 5-point landmarks and ``dlib.get_face_chip`` with ``padding`` (the dlib
    ResNet: 150 px, 0.25). ``five_point_template``: eye centres, nose tip and mouth corners moved
    onto InsightFace's 112 px ArcFace template by a similarity transform (scaled to the chip size).
    The chip is square, as large as the spec's input.
    """

    method: str
    padding: float = 0.25

    def tag(self, size: int) -> str:
        """A short name of this alignment at ``size`` px, part of the model version it embeds under.

        >>> FaceAlignment("dlib_chip").tag(150), FaceAlignment("five_point_template").tag(112)
        ('dlib_chip150p0.25', 'five_point_template112')
        """
        if self.method == "dlib_chip":
            return f"dlib_chip{size}p{self.padding:g}"
        return f"{self.method}{size}"

    @classmethod
    def from_value(cls, value: Any, where: str) -> "FaceAlignment | None":
        if value is None or isinstance(value, FaceAlignment):
            return value
        if not isinstance(value, Mapping) or set(value) - {"method", "padding"} or "method" not in value:
            raise ConfigError(f"{where}: model.alignment must be null or a mapping with method (and padding), "
                              f"got {value!r}")
        if value["method"] not in ALIGNMENT_METHODS:
            raise ConfigError(f"{where}: model.alignment.method must be one of {', '.join(ALIGNMENT_METHODS)}, "
                              f"got {value['method']!r}")
        padding = value.get("padding", 0.25)
        if isinstance(padding, bool) or not isinstance(padding, (int, float)) or not 0 <= padding <= 1:
            raise ConfigError(f"{where}: model.alignment.padding must be a number in [0, 1], got {padding!r}")
        return cls(method=value["method"], padding=float(padding))


@dataclass(frozen=True)
class ModelSpec:
    """What a face embedding model expects and where it comes from.

    Exactly one of ``builtin``, ``onnx_path`` and ``torch_path`` (a TorchScript ``.pt`` or ``torch.export``
    ``.pt2`` file, run by ``embed.backend=torch``) is set. Pixels are prepared as
    ``(pixel - mean) / std`` per channel, in ``channel_order``, laid out as ``layout``.
    ``input_name`` is read from the model when None.
    """

    name: str
    input_height: int
    input_width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embedding_dim: int
    version: str = "1"
    builtin: str | None = None
    onnx_path: str | None = None
    torch_path: str | None = None
    channel_order: str = "RGB"
    layout: str = "NCHW"
    sha256: str | None = None
    input_name: str | None = None
    alignment: FaceAlignment | None = None

    def validate(self) -> "ModelSpec":
        """Check every field; raise ConfigError naming the first bad one. Returns self."""
        where = f"model spec {self.name!r}" if isinstance(self.name, str) and self.name else "model spec"
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"{where}: model.name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.version, str) or not self.version:
            raise ConfigError(f"{where}: model.version must be a non-empty string, got {self.version!r}")
        self._validate_source(where)
        for field in ("input_height", "input_width", "embedding_dim"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{where}: model.{field} must be a positive integer, got {value!r}")
        if self.channel_order not in ("RGB", "BGR"):
            raise ConfigError(f"{where}: model.channel_order must be 'RGB' or 'BGR', got {self.channel_order!r}")
        if self.layout not in ("NCHW", "NHWC"):
            raise ConfigError(f"{where}: model.layout must be 'NCHW' or 'NHWC', got {self.layout!r}")
        for field in ("mean", "std"):
            value = getattr(self, field)
            if (
                not isinstance(value, tuple) or len(value) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            ):
                raise ConfigError(f"{where}: model.{field} must be 3 numbers (one per channel), got {value!r}")
        if not all(v > 0 for v in self.std):
            raise ConfigError(f"{where}: model.std values must be > 0, got {self.std!r}")
        if self.sha256 is not None and (not isinstance(self.sha256, str) or not _SHA256_RE.match(self.sha256)):
            raise ConfigError(
                f"{where}: model.sha256 must be 64 lowercase hex digits or null, got {self.sha256!r}"
            )
        if self.input_name is not None and (not isinstance(self.input_name, str) or not self.input_name):
            raise ConfigError(f"{where}: model.input_name must be a non-empty string or null, got {self.input_name!r}")
        if self.alignment is not None and self.input_height != self.input_width:
            raise ConfigError(f"{where}: model.alignment cuts square chips; the input is "
                              f"{self.input_width}x{self.input_height}")
        return self

    def _validate_source(self, where: str) -> None:
        """Exactly one place the network comes from: a builtin, an ONNX file or a PyTorch file."""
        if sum(v is not None for v in (self.builtin, self.onnx_path, self.torch_path)) != 1:
            raise ConfigError(f"{where}: set exactly one of model.builtin, model.onnx_path or model.torch_path")
        if self.builtin is not None and self.builtin not in BUILTIN_MODELS:
            raise ConfigError(
                f"{where}: model.builtin must be one of {', '.join(BUILTIN_MODELS)}, got {self.builtin!r}"
            )
        if self.onnx_path is not None and (not isinstance(self.onnx_path, str) or not self.onnx_path):
            raise ConfigError(f"{where}: model.onnx_path must be a non-empty string, got {self.onnx_path!r}")
        if self.torch_path is not None and (not isinstance(self.torch_path, str)
                                            or not self.torch_path.lower().endswith(TORCH_SUFFIXES)):
            raise ConfigError(f"{where}: model.torch_path must name a TorchScript (.pt) or torch.export (.pt2) "
                              f"file, got {self.torch_path!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "model spec") -> "ModelSpec":
        """Build and validate a spec from a mapping (a YAML document or a config's ``model:``)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: a model spec must be a mapping, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(f"{source}: unknown field model.{unknown[0]} (known: {', '.join(fields)})")
        required = [n for n, f in fields.items()
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [n for n in required if n not in data]
        if missing:
            raise ConfigError(f"{source}: missing field model.{missing[0]}")
        values = dict(data)
        for key in ("mean", "std"):
            value = values[key]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = [value] * 3  # one number for all channels
            if isinstance(value, (list, tuple)):
                value = tuple(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
                              for v in value)
            values[key] = value
        for key in ("version",):
            if isinstance(values.get(key), (int, float)) and not isinstance(values.get(key), bool):
                values[key] = str(values[key])
        values["alignment"] = FaceAlignment.from_value(values.get("alignment"), source)
        if isinstance(values.get("sha256"), str):
            values["sha256"] = values["sha256"].strip().lower()
        return cls(**values).validate()


def _candidate_dirs(models_dir: str | os.PathLike[str] | None) -> list[Any]:
    if models_dir is not None:
        return [Path(models_dir)]
    return [d for d in (SPECS_DIR,) if d.is_dir()]


def available_specs(models_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Names of the specs that :func:`load_model_spec` can load by name."""
    names = {p.name[: -len(".yaml")] for d in _candidate_dirs(models_dir) for p in d.iterdir() if p.name.endswith(".yaml")}
    return sorted(names)


def load_model_spec(
    name_or_path: str | os.PathLike[str],
    models_dir: str | os.PathLike[str] | None = None,
) -> ModelSpec:
    """Load a spec by name (``dlib_resnet_v1``) or from a YAML file path.

    By name, ``<name>.yaml`` is looked up in ``models_dir`` when given, else in ``conf/models``
    (shipped inside the package as ``ers_spark/conf/models``).
    The YAML may hold the fields at top level or under a ``model:`` key.

    Example
    -------
    >>> load_model_spec("arcface_r100_example").embedding_dim
    512
    """
    text = os.fspath(name_or_path)
    as_path = Path(text).expanduser()
    if text.endswith((".yaml", ".yml")) or os.sep in text or as_path.is_file():
        if not as_path.is_file():
            raise ConfigError(f"model spec file not found: {text} (looked at {as_path.resolve()})")
        path = as_path
    else:
        dirs = _candidate_dirs(models_dir)
        found = [d / f"{text}.yaml" for d in dirs if (d / f"{text}.yaml").is_file()]
        if not found:
            known = ", ".join(available_specs(models_dir)) or "none"
            raise ConfigError(
                f"unknown model {text!r}: no {text}.yaml in {', '.join(str(d) for d in dirs) or 'any models dir'}"
                f" (known: {known})"
            )
        path = found[0]
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"model spec {path}: invalid YAML: {first}") from exc
    if isinstance(doc, Mapping) and set(doc) == {"model"}:
        doc = doc["model"]
    return ModelSpec.from_dict(doc, source=f"model spec {path}")


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 hex of a file, memoised on (path, size, mtime) so workers hash a model once."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def resolve_model_file(spec: ModelSpec, cache_dir: str | os.PathLike[str]) -> Path:
    """Return the local model file for a spec (ONNX, or PyTorch's ``torch_path``), converting builtins into
    cache_dir once.

    Raises
    ------
    ModelError
        The file is missing, or its sha256 differs from ``spec.sha256``.

    Example
    -------
    >>> import tempfile
    >>> resolve_model_file(load_model_spec("dlib_resnet_v1"), tempfile.mkdtemp()).name
    'dlib_resnet_v1.onnx'
    """
    if spec.builtin is not None:
        from ers_spark.models.dlib_convert import ensure_builtin_onnx

        if spec.builtin != "dlib_resnet_v1":
            raise ConfigError(f"model.builtin must be one of {', '.join(BUILTIN_MODELS)}, got {spec.builtin!r}")
        path, actual = ensure_builtin_onnx(cache_dir)
    else:
        named, hint = ((spec.torch_path, "save the PyTorch file there or set model.torch_path")
                       if spec.torch_path is not None else (spec.onnx_path, "download the ONNX file or set model.onnx_path"))
        assert named is not None
        path = Path(named).expanduser()
        if not path.is_file():
            raise ModelError(f"model file not found: {named} (looked at {path.resolve()}); {hint}")
        actual = file_sha256(path) if spec.sha256 is not None else ""
    if spec.sha256 is not None and actual != spec.sha256:
        raise ModelError(
            f"checksum mismatch for {path}: expected {spec.sha256}, got {actual}; "
            "the file is corrupt or a different model: re-download it or fix model.sha256"
        )
    return path
