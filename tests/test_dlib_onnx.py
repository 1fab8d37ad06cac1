"""Parity of our dlib -> ONNX conversion against dlib itself, plus the conversion cache.

dlib (``dlib-bin``) is only the oracle here; the project runs the converted ONNX model.
"""

from __future__ import annotations

import hashlib
import io
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ers_spark.errors import ModelError
from ers_spark.models import dlib_convert
from ers_spark.models.dlib_convert import (
    BUILTIN_ONNX_NAME,
    build_onnx,
    builtin_dlib_dat_path,
    ensure_builtin_onnx,
    read_dlib_resnet,
)
from ers_spark.models.onnx_runner import OnnxEmbedder
from ers_spark.models.preprocess import decode_batch, prepare_arrays
from ers_spark.models.spec import load_model_spec

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"



@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return ensure_builtin_onnx(tmp_path_factory.mktemp("model_cache"))


@pytest.fixture(scope="module")
def spec():
    return load_model_spec("dlib_resnet_v1")


@pytest.fixture(scope="module")
def embedder(converted, spec) -> OnnxEmbedder:
    return OnnxEmbedder(converted[0], spec)


@pytest.fixture(scope="module")
def dlib_tools():
    """(detector, 5-point predictor, dlib's own face recogniser: the oracle, dlib module)."""
    dlib = pytest.importorskip("dlib", reason="dlib-bin is the parity oracle: pip install 'ers-spark[dev]'")
    import face_recognition_models as frm

    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(frm.pose_predictor_five_point_model_location())
    facerec = dlib.face_recognition_model_v1(frm.face_recognition_model_location())
    return detector, predictor, facerec, dlib


def _chips(img: np.ndarray, tools, upsample: int = 1) -> list[np.ndarray]:
    detector, predictor, _, dlib = tools
    img = np.ascontiguousarray(img)
    return [
        np.asarray(dlib.get_face_chip(img, predictor(img, r), size=150, padding=0.25))
        for r in detector(img, upsample)
    ]


def _orl_chips(tools, count: int = 10) -> list[np.ndarray]:
    chips = []
    for s in range(1, count + 1):
        grey = np.asarray(Image.open(DATA / "orl_faces" / f"s{s}" / f"{(s % 10) + 1}.pgm"))
        rgb = np.repeat(grey[:, :, None], 3, axis=2)
        found = _chips(rgb, tools, upsample=2)
        if found:
            chips.append(found[0])
        else:  # not detected: a plain resize still exercises the network end to end
            chips.append(np.asarray(Image.fromarray(rgb).resize((150, 150), Image.Resampling.BILINEAR)))
    return chips


def _assert_parity(chips: list[np.ndarray], embedder: OnnxEmbedder, spec, facerec) -> tuple[float, float]:
    ref = np.array([np.asarray(facerec.compute_face_descriptor(c)) for c in chips], dtype=np.float64)
    unit, norms = embedder.embed(prepare_arrays(chips, spec))
    ours = unit.astype(np.float64) * norms[:, None]
    cos = np.sum(ours * ref, axis=1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    max_abs = float(np.abs(ours - ref).max())
    assert cos.min() >= 0.9999, cos
    assert max_abs <= 1e-3
    np.testing.assert_allclose(norms, np.linalg.norm(ref, axis=1), rtol=1e-4)
    return float(cos.min()), max_abs


def test_parity_astronaut(embedder, spec, dlib_tools):
    from skimage import data

    img = data.astronaut()
    chips = _chips(img, dlib_tools)
    assert chips, "dlib found no face in skimage's astronaut"
    detector, predictor, facerec, _ = dlib_tools
    # the aligned-chip overload equals dlib's full pipeline on the photo
    shape = predictor(img, detector(img, 1)[0])
    np.testing.assert_allclose(
        np.asarray(facerec.compute_face_descriptor(img, shape)),
        np.asarray(facerec.compute_face_descriptor(chips[0])), atol=1e-6,
    )
    _assert_parity(chips, embedder, spec, facerec)


@pytest.mark.skipif(not (DATA / "orl_faces").is_dir(), reason=f"real face data absent: {DATA / 'orl_faces'}")
def test_parity_orl_faces(embedder, spec, dlib_tools):
    chips = _orl_chips(dlib_tools)
    _assert_parity(chips, embedder, spec, dlib_tools[2])


@pytest.mark.skipif(not (DATA / "deepface_photos").is_dir(),
                    reason=f"real face data absent: {DATA / 'deepface_photos'}")
def test_parity_deepface_photos(embedder, spec, dlib_tools):
    chips: list[np.ndarray] = []
    for name in ("img1.jpg", "img2.jpg", "img3.jpg", "couple.jpg"):
        path = DATA / "deepface_photos" / name
        if path.is_file():
            chips += _chips(np.asarray(Image.open(path).convert("RGB")), dlib_tools)
    if not chips:
        pytest.skip("no face detected in the deepface photos tried")
    _assert_parity(chips, embedder, spec, dlib_tools[2])


def test_decode_batch_matches_arrays(embedder, spec, dlib_tools):
    """Lossless bytes through decode_batch give the same batch as the arrays themselves."""
    from skimage import data

    chips = _chips(data.astronaut(), dlib_tools)
    blobs = []
    for c in chips:
        buf = io.BytesIO()
        Image.fromarray(c).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    batch, ok, reasons = decode_batch([*blobs, b"\x89PNG broken"], spec)
    assert ok.tolist() == [True] * len(chips) + [False]
    assert reasons[-1].startswith("undecodable image:")
    np.testing.assert_array_equal(batch, prepare_arrays(chips, spec))


def test_batch_size_does_not_change_results(embedder, spec, dlib_tools):
    from skimage import data

    chips = _chips(data.astronaut(), dlib_tools) * 3
    batch = prepare_arrays(chips, spec)
    unit_all, norms_all = embedder.embed(batch)
    unit_one, norms_one = embedder.embed(batch[:1])
    np.testing.assert_allclose(unit_all[0], unit_one[0], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(unit_all, axis=1), 1.0, atol=1e-5)


def test_reader_structure():
    net = read_dlib_resnet(builtin_dlib_dat_path())
    kinds = [layer.kind for layer in net.layers]
    assert kinds.count("con") == 29 and kinds.count("add_prev") == 14 and kinds.count("fc") == 1
    assert net.embedding_dim == 128
    assert net.input_size == (150, 150)
    np.testing.assert_allclose(net.input_mean, (122.782, 117.001, 104.298), atol=1e-4)
    first = net.layers[0]
    assert first.kind == "con" and first.weights["W"].shape == (32, 3, 7, 7)
    assert first.attrs["pad"] == (0, 0)  # dlib: no padding when the stride is not 1
    model = build_onnx(net)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["embedding"]
    assert model.opset_import[0].version == 17


def test_reader_primitives():
    """dlib's compact ints and (mantissa, exponent) floats, as dlib writes them."""
    blob = bytes([
        0x82, 0x2C, 0x01,  # int -300
        0x01, 0x00,  # int 0
        0x81, 0xC0, 0x81, 0x07,  # float -1.5 = -192 * 2**-7
        0x01, 0x00, 0x02, 0x00, 0x7D,  # float +inf (exponent 32000)
        0x01, 0x03, 0x61, 0x62, 0x63,  # string "abc"
        0x31, 0x30,  # bools
    ])
    r = dlib_convert._Reader(blob, "mem")
    assert r.read_int() == -300 and r.read_int() == 0
    assert r.read_float() == -1.5 and r.read_float() == float("inf")
    assert r.read_string() == "abc"
    assert r.read_bool() is True and r.read_bool() is False
    with pytest.raises(ModelError, match="unexpected end of file at byte 21"):
        r.read_int()
    with pytest.raises(ModelError, match="bad integer control byte 0x82"):
        dlib_convert._Reader(bytes([0x82, 0x2C, 0x01]), "mem").read_uint()


def test_truncated_dat_gives_one_line_model_error(tmp_path):
    data = builtin_dlib_dat_path().read_bytes()
    bad = tmp_path / "cut.dat"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError) as err:
        read_dlib_resnet(bad)
    assert "unexpected end of file" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ModelError, match="cannot read dlib model"):
        read_dlib_resnet(tmp_path / "missing.dat")


def test_cache_is_reused(tmp_path, monkeypatch):
    path, sha = ensure_builtin_onnx(tmp_path)
    assert path == tmp_path / BUILTIN_ONNX_NAME
    sha_file = tmp_path / (BUILTIN_ONNX_NAME + ".sha256")
    assert sha_file.read_text().split()[0] == sha == hashlib.sha256(path.read_bytes()).hexdigest()
    mtime = path.stat().st_mtime_ns

    def no_convert(*args, **kwargs):
        raise AssertionError("converted again although the cache is valid")

    monkeypatch.setattr(dlib_convert, "convert_dlib_to_onnx", no_convert)
    assert ensure_builtin_onnx(tmp_path) == (path, sha)
    assert path.stat().st_mtime_ns == mtime
    monkeypatch.undo()

    # a damaged cache file is detected by its checksum and rebuilt
    path.write_bytes(b"garbage")
    assert ensure_builtin_onnx(tmp_path) == (path, sha)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha


def test_concurrent_workers_get_one_whole_file(tmp_path):
    results: list[tuple[Path, str]] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(ensure_builtin_onnx(tmp_path))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({sha for _, sha in results}) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [BUILTIN_ONNX_NAME, BUILTIN_ONNX_NAME + ".sha256"]


def test_align_faces_matches_dlib_chips(dlib_tools):
    from skimage import data

    from ers_spark.models.align import align_faces

    img = data.astronaut()
    chips = align_faces(img)
    expected = _chips(img, dlib_tools)
    assert len(chips) == len(expected) >= 1
    assert all(c.shape == (150, 150, 3) and c.dtype == np.uint8 for c in chips)
    assert any(np.array_equal(chips[0], e) for e in expected)
