"""Alignment declared by the model spec: the geometry against brute force, the ArcFace template on a real face,
and what `embed.align` resolves to (auto / true / false) and the version it embeds under."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from PIL import Image

from ers_spark.config import load_config
from ers_spark.distributed.inference import resolve_alignment, resolve_model
from ers_spark.errors import ConfigError
from ers_spark.models.align import ARCFACE_TEMPLATE_112, similarity_transform
from ers_spark.models.spec import FaceAlignment, ModelSpec, load_model_spec
from onnx_builders import tiny_embedding_model


def _least_squares_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The same fit as a plain linear least squares in (a, b, tx, ty): x' = a x - b y + tx, y' = b x + a y + ty."""
    rows = []
    for (x, y) in src:
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
    (a, b, tx, ty), *_ = np.linalg.lstsq(np.array(rows), dst.reshape(-1), rcond=None)
    return np.array([[a, -b, tx], [b, a, ty]])


@pytest.mark.parametrize("seed", range(5))
def test_similarity_transform_equals_least_squares(seed):
    rng = np.random.default_rng(seed)
    src = rng.uniform(0, 200, size=(5, 2))
    angle, scale = rng.uniform(-0.6, 0.6), rng.uniform(0.3, 2.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = scale * src @ rotation.T + rng.uniform(-50, 50, 2) + rng.normal(0, 2.0, size=(5, 2))
    np.testing.assert_allclose(similarity_transform(src, dst), _least_squares_similarity(src, dst), atol=1e-8)


def test_five_point_template_puts_the_landmarks_on_arcfaces_template():
    """The astronaut's face cut onto InsightFace's 112 px template: the landmarks found again on the chip are
    where the fitted similarity sends the photo's landmarks (the warp goes the right way), and they lie on
    the template up to the fit's residual (a real face is not the template's mean face)."""
    pytest.importorskip("dlib")
    import skimage.data

    from ers_spark.models.align import aligned_chip, detected_faces, five_points

    alignment = FaceAlignment("five_point_template")
    photo = skimage.data.astronaut()
    chip, faces = aligned_chip(photo, alignment, 112)
    assert chip.shape == (112, 112, 3) and faces == 1
    source = five_points(detected_faces(photo, alignment)[0])
    matrix = similarity_transform(source, ARCFACE_TEMPLATE_112)
    expected = source @ matrix[:, :2].T + matrix[:, 2]
    (shape,) = detected_faces(np.asarray(Image.fromarray(chip).resize((448, 448))), alignment)
    found = five_points(shape) / 4.0
    assert np.abs(found - expected).max() < 2.5, (found, expected)
    assert np.linalg.norm(found - ARCFACE_TEMPLATE_112, axis=1).mean() < 6.0


def test_dlib_chip_is_dlibs_own_face_chip():
    dlib = pytest.importorskip("dlib")
    import face_recognition_models
    import skimage.data

    from ers_spark.models.align import aligned_chip

    img = skimage.data.astronaut()
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(face_recognition_models.pose_predictor_five_point_model_location())
    (rect,) = detector(img, 0)  # upsampled once, dlib also finds the badge on her suit: found without first
    expected = dlib.get_face_chip(img, predictor(img, rect), size=150, padding=0.25)
    chip, faces = aligned_chip(img, FaceAlignment("dlib_chip"), 150)
    assert faces == 1 and np.array_equal(chip, expected)


def test_specs_declare_the_alignment_their_network_was_trained_on():
    assert load_model_spec("dlib_resnet_v1").alignment == FaceAlignment("dlib_chip", 0.25)
    assert load_model_spec("arcface_r100_example").alignment == FaceAlignment("five_point_template")


@pytest.mark.parametrize(
    ("alignment", "message"),
    [
        ({"method": "mtcnn"}, "model.alignment.method must be one of dlib_chip, five_point_template, got 'mtcnn'"),
        ({"method": "dlib_chip", "padding": 2}, "model.alignment.padding must be a number in [0, 1], got 2"),
        ("dlib", "model.alignment must be null or a mapping with method (and padding), got 'dlib'"),
    ],
)
def test_a_bad_alignment_in_a_spec_is_one_line(alignment, message):
    spec = {"name": "x", "onnx_path": "/m.onnx", "input_height": 112, "input_width": 112, "mean": 0, "std": 1,
            "embedding_dim": 8, "alignment": alignment}
    with pytest.raises(ConfigError) as err:
        ModelSpec.from_dict(spec, "x.yaml")
    assert str(err.value) == f"x.yaml: {message}"


def test_alignment_needs_square_chips():
    spec = {"name": "x", "onnx_path": "/m.onnx", "input_height": 112, "input_width": 96, "mean": 0, "std": 1,
            "embedding_dim": 8, "alignment": {"method": "five_point_template"}}
    with pytest.raises(ConfigError, match="model.alignment cuts square chips; the input is 96x112"):
        ModelSpec.from_dict(spec, "x.yaml")


@pytest.mark.parametrize(("setting", "expected"), [("auto", "dlib_chip"), ("true", "dlib_chip"), ("false", None)])
def test_embed_align_follows_the_spec_unless_overridden(setting, expected):
    emb = load_config(overrides=[f"embed.align={setting}"]).embed
    found = resolve_alignment(load_model_spec("dlib_resnet_v1"), emb)
    assert (found.method if found else None) == expected


def test_embed_align_true_on_a_spec_without_alignment_is_a_config_error(tmp_path):
    model = tiny_embedding_model(tmp_path / "m.onnx", size=112, dim=16)
    spec = tmp_path / "plain.yaml"
    spec.write_text(yaml.safe_dump({"name": "plain", "onnx_path": str(model), "input_height": 112,
                                    "input_width": 112, "mean": 0, "std": 1, "embedding_dim": 16}))
    assert resolve_model(load_config(overrides=[f"embed.model={spec}"]).embed).alignment is None  # auto: none
    with pytest.raises(ConfigError, match="^embed.align=true but model 'plain' declares no alignment"):
        resolve_model(load_config(overrides=[f"embed.model={spec}", "embed.align=true"]).embed)


def test_embed_align_rejects_other_words():
    with pytest.raises(ConfigError, match="embed.align must be auto, true or false, got 'yes please'"):
        load_config(overrides=["embed.align=yes please"])


def test_the_version_names_the_alignment():
    aligned = resolve_model(load_config().embed)
    plain = resolve_model(load_config(overrides=["embed.align=false"]).embed)
    assert aligned.model_version == plain.model_version + "+dlib_chip150p0.25"


def test_the_version_names_backend_and_precision():
    """Embeddings of one model run two ways never share a version (they differ a little)."""
    onnx = resolve_model(load_config().embed).model_version
    torch16 = resolve_model(load_config(overrides=["embed.backend=torch", "embed.fp16=true"]).embed).model_version
    torch32 = resolve_model(load_config(overrides=["embed.backend=torch"]).embed).model_version
    assert "+onnx-fp32+" in onnx and "+torch-fp16+" in torch16 and "+torch-fp32+" in torch32
    assert len({onnx, torch16, torch32}) == 3
