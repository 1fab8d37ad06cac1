"""Model specs, model file resolution, preprocessing and the ONNX runner on a tiny model."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ers_spark.errors import ConfigError, ModelError
from ers_spark.models.onnx_runner import OnnxEmbedder
from ers_spark.models.preprocess import decode_batch, prepare_arrays
from ers_spark.models.spec import SPECS_DIR, ModelSpec, load_model_spec, resolve_model_file

onnx = pytest.importorskip("onnx")
from onnx_builders import tiny_embedding_model as _tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.onnx")


@pytest.fixture()
def arc_spec(tiny: Path) -> ModelSpec:
    return dataclasses.replace(load_model_spec("arcface_r100_example"), onnx_path=str(tiny))


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


# ------------------------------------------------------------------------------- specs


def test_shipped_specs_load():
    dlib_spec = load_model_spec("dlib_resnet_v1")
    assert dlib_spec.builtin == "dlib_resnet_v1" and dlib_spec.onnx_path is None
    assert (dlib_spec.input_height, dlib_spec.input_width, dlib_spec.embedding_dim) == (150, 150, 128)
    assert dlib_spec.mean == (122.782, 117.001, 104.298) and dlib_spec.std == (256.0, 256.0, 256.0)
    arc = load_model_spec("arcface_r100_example")
    assert (arc.input_height, arc.embedding_dim, arc.mean, arc.std) == (112, 512, (127.5,) * 3, (127.5,) * 3)
    assert arc.onnx_path == "/models/arcface_r100.onnx" and arc.sha256 is None


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"channel_order": "rgb"}, "model.channel_order must be 'RGB' or 'BGR', got 'rgb'"),
        ({"layout": "CHW"}, "model.layout must be 'NCHW' or 'NHWC', got 'CHW'"),
        ({"input_height": 0}, "model.input_height must be a positive integer, got 0"),
        ({"embedding_dim": -1}, "model.embedding_dim must be a positive integer, got -1"),
        ({"std": (1.0, 0.0, 1.0)}, "model.std values must be > 0"),
        ({"mean": (1.0, 2.0)}, "model.mean must be 3 numbers (one per channel)"),
        ({"sha256": "abc"}, "model.sha256 must be 64 lowercase hex digits or null, got 'abc'"),
        ({"onnx_path": "/x.onnx"}, "set exactly one of model.builtin, model.onnx_path or model.torch_path"),
        ({"builtin": None}, "set exactly one of model.builtin, model.onnx_path or model.torch_path"),
        ({"builtin": None, "torch_path": "/m.onnx"},
         "model.torch_path must name a TorchScript (.pt) or torch.export (.pt2) file, got '/m.onnx'"),
        ({"builtin": "vgg"}, "model.builtin must be one of dlib_resnet_v1, got 'vgg'"),
        ({"name": ""}, "model.name must be a non-empty string"),
        ({"input_name": ""}, "model.input_name must be a non-empty string or null"),
    ],
)
def test_validate_names_the_field(change, fragment):
    bad = dataclasses.replace(load_model_spec("dlib_resnet_v1"), **change)
    with pytest.raises(ConfigError) as err:
        bad.validate()
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_errors(tmp_path):
    (tmp_path / "extra.yaml").write_text(
        (SPECS_DIR / "dlib_resnet_v1.yaml").read_text()
        + "colour: blue\n"
    )
    with pytest.raises(ConfigError, match=r"unknown field model\.colour"):
        load_model_spec("extra", models_dir=tmp_path)
    (tmp_path / "short.yaml").write_text("name: short\ninput_height: 1\ninput_width: 1\nmean: 0\nstd: 1\n")
    with pytest.raises(ConfigError, match=r"missing field model\.embedding_dim"):
        load_model_spec(tmp_path / "short.yaml")
    with pytest.raises(ConfigError, match=r"unknown model 'nope': no nope\.yaml in .*\(known: .*extra"):
        load_model_spec("nope", models_dir=tmp_path)
    with pytest.raises(ConfigError, match="model spec file not found"):
        load_model_spec(tmp_path / "absent.yaml")


def test_nested_model_key_and_scalar_mean(tmp_path):
    (tmp_path / "m.yaml").write_text(
        "model:\n  name: m\n  onnx_path: /x.onnx\n  input_height: 112\n  input_width: 112\n"
        "  mean: 127.5\n  std: 128\n  embedding_dim: 512\n  channel_order: BGR\n  layout: NHWC\n"
    )
    spec = load_model_spec(tmp_path / "m.yaml")
    assert spec.mean == (127.5,) * 3 and spec.std == (128.0,) * 3 and spec.layout == "NHWC"


# ----------------------------------------------------------------------- model files


def test_missing_model_file_message(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = dataclasses.replace(load_model_spec("arcface_r100_example"), onnx_path="models/r100.onnx")
    with pytest.raises(ModelError) as err:
        resolve_model_file(spec, tmp_path / "cache")
    assert str(err.value) == (
        f"model file not found: models/r100.onnx (looked at {tmp_path.resolve() / 'models' / 'r100.onnx'}); "
        "download the ONNX file or set model.onnx_path"
    )


def test_checksum(tiny, arc_spec, tmp_path):
    actual = hashlib.sha256(tiny.read_bytes()).hexdigest()
    assert resolve_model_file(dataclasses.replace(arc_spec, sha256=actual), tmp_path) == tiny
    wrong = "0" * 64
    with pytest.raises(ModelError) as err:
        resolve_model_file(dataclasses.replace(arc_spec, sha256=wrong), tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"checksum mismatch for {tiny}: expected {wrong}, got {actual}; ")
    assert "\n" not in msg


# --------------------------------------------------------------------- preprocessing


def test_decode_batch_good_and_bad(arc_spec):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(60, 40, 3), dtype=np.uint8)
    jpeg = _encode(rgb, "JPEG")
    grey = _encode(rng.integers(0, 256, size=(112, 92), dtype=np.uint8), "PNG")
    images = [jpeg, b"", None, b"definitely not an image", jpeg[: len(jpeg) // 2], grey]
    batch, ok, reasons = decode_batch(images, arc_spec)
    assert ok.tolist() == [True, False, False, False, False, True]
    assert batch.shape == (2, 3, 112, 112) and batch.dtype == np.float32
    assert reasons[0] is None and reasons[5] is None
    assert reasons[1] == "empty image (0 bytes)"
    assert reasons[2] == "missing image (null bytes)"
    assert reasons[3].startswith("undecodable image: cannot identify image file")
    assert reasons[4].startswith("undecodable image: ")
    assert all("\n" not in r for r in reasons if r)
    # grey input becomes three equal channels
    np.testing.assert_array_equal(batch[1, 0], batch[1, 1])
    np.testing.assert_array_equal(batch[1, 0], batch[1, 2])
    assert batch.min() >= -1.0 and batch.max() <= 1.0


def test_decode_pgm(arc_spec):
    pgm = b"P5\n4 2\n255\n" + bytes(range(0, 256, 32))
    batch, ok, _ = decode_batch([pgm], arc_spec)
    assert ok.tolist() == [True] and batch.shape == (1, 3, 112, 112)


def _photo_decoders():
    from ers_spark.distributed.align import align_images
    from ers_spark.distributed.images import probe_image
    from ers_spark.models.spec import FaceAlignment

    return {"embed": lambda data, spec: decode_batch([data], spec), "ingest": lambda data, spec: probe_image(data),
            "align": lambda data, spec: align_images([data], FaceAlignment("dlib_chip"), 150, 40, True)}


@pytest.mark.parametrize("step", ["embed", "ingest", "align"])
def test_a_missing_codec_fails_the_job_not_the_row(arc_spec, monkeypatch, step):
    """Pillow without its JPEG decoder (as a build without libjpeg is): every JPEG would look like bad
    input, so the task fails with one line naming the codec instead of quarantining the rows."""
    from ers_spark.errors import CodecError

    jpeg = _encode(np.zeros((20, 20, 3), np.uint8), "JPEG")
    monkeypatch.delattr(Image.core, "jpeg_decoder")
    with pytest.raises(CodecError, match="^Pillow on this worker has no jpeg decoder"):
        _photo_decoders()[step](jpeg, arc_spec)


@pytest.mark.parametrize("step", ["embed", "ingest", "align"])
def test_memory_error_while_decoding_fails_the_task(arc_spec, monkeypatch, step):
    """Only bytes that do not decode are bad input: a MemoryError is the job's and propagates."""
    png = _encode(np.zeros((20, 20, 3), np.uint8), "PNG")

    def out_of_memory(*args, **kwargs):
        raise MemoryError("cannot allocate")

    monkeypatch.setattr(Image.Image, "load", out_of_memory)
    with pytest.raises(MemoryError):
        _photo_decoders()[step](png, arc_spec)


def test_prepare_arrays_layouts():
    arr = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3)
    base = ModelSpec(name="t", onnx_path="/x", input_height=2, input_width=2, mean=(1.0, 2.0, 3.0),
                     std=(2.0, 2.0, 2.0), embedding_dim=4).validate()
    nchw = prepare_arrays([arr], base)
    expected = (arr.astype(np.float32) - [1.0, 2.0, 3.0]) / 2.0
    np.testing.assert_allclose(nchw[0], expected.transpose(2, 0, 1))
    bgr_nhwc = prepare_arrays([arr], dataclasses.replace(base, channel_order="BGR", layout="NHWC"))
    np.testing.assert_allclose(bgr_nhwc[0], (arr[..., ::-1].astype(np.float32) - [1.0, 2.0, 3.0]) / 2.0)
    assert prepare_arrays([], base).shape == (0, 3, 2, 2)


# ----------------------------------------------------------------------- ONNX runner


def test_tiny_model_end_to_end(tiny, arc_spec):
    rng = np.random.default_rng(2)
    blobs = [_encode(rng.integers(0, 256, size=(80, 70, 3), dtype=np.uint8), "PNG") for _ in range(3)]
    batch, ok, _ = decode_batch([blobs[0], b"bad", blobs[1], blobs[2]], arc_spec)
    emb = OnnxEmbedder(resolve_model_file(arc_spec, tiny.parent), arc_spec)
    assert emb.input_name == "data"
    assert emb.providers == ["CPUExecutionProvider"]
    unit, norms = emb.embed(batch)
    assert unit.shape == (3, 512) and unit.dtype == np.float32 and norms.shape == (3,)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    assert (norms > 0).all()
    empty_unit, empty_norms = emb.embed(batch[:0])
    assert empty_unit.shape == (0, 512) and empty_norms.shape == (0,)


def test_pickle_round_trip(tiny, arc_spec):
    emb = OnnxEmbedder(tiny, arc_spec)
    batch = prepare_arrays([np.full((112, 112, 3), 90, np.uint8)], arc_spec)
    before = emb.embed(batch)
    clone = pickle.loads(pickle.dumps(emb))
    assert clone._session is None and clone.model_path == str(tiny)
    after = clone.embed(batch)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])


def test_runner_checks_model_against_spec(tiny, arc_spec, tmp_path):
    batch = prepare_arrays([np.zeros((112, 112, 3), np.uint8)], arc_spec)
    with pytest.raises(ModelError, match=r"has no input 'pixels' \(inputs: data\)"):
        OnnxEmbedder(tiny, dataclasses.replace(arc_spec, input_name="pixels")).embed(batch)
    with pytest.raises(ModelError, match=r"gives 512-D embeddings but the spec .* says embedding_dim=128"):
        OnnxEmbedder(tiny, dataclasses.replace(arc_spec, embedding_dim=128)).embed(batch)
    with pytest.raises(ModelError, match=r"input 'data' has shape \['N', 3, 112, 112\], but the spec"):
        _ = OnnxEmbedder(tiny, dataclasses.replace(arc_spec, input_height=150, input_width=150)).providers
    with pytest.raises(ModelError, match="model file not found"):
        OnnxEmbedder(tmp_path / "none.onnx", arc_spec)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not onnx")
    with pytest.raises(ModelError, match="cannot load ONNX model"):
        _ = OnnxEmbedder(junk, arc_spec).providers


def test_gpu_request_without_cuda_warns(tiny, arc_spec, caplog):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA; the CPU fallback warning is not reachable")
    emb = OnnxEmbedder(tiny, arc_spec, device_id=0)
    with caplog.at_level(logging.WARNING, logger="ers_spark.models.onnx_runner"):
        assert emb.providers == ["CPUExecutionProvider"]
    assert "onnxruntime-gpu" in caplog.text


