"""The optional torch backend gives the same embeddings as ONNX Runtime on the converted model."""

from __future__ import annotations

import importlib.util
import pickle

import numpy as np
import pytest

from ers_spark.errors import ModelError
from ers_spark.models.dlib_convert import ensure_builtin_onnx
from ers_spark.models.onnx_runner import OnnxEmbedder
from ers_spark.models.preprocess import prepare_arrays
from ers_spark.models.spec import load_model_spec

HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(
    not HAS_TORCH, reason="torch is not installed (optional: pip install 'ers-spark[torch]')"
)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory):
    return ensure_builtin_onnx(tmp_path_factory.mktemp("torch_cache"))[0]


@pytest.fixture(scope="module")
def spec():
    return load_model_spec("dlib_resnet_v1")


@pytest.fixture(scope="module")
def batch(spec) -> np.ndarray:
    from skimage import data

    face = data.astronaut()[60:200, 160:290]  # roughly the face; alignment does not matter here
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(150, 150, 3), dtype=np.uint8)
    return prepare_arrays([face, noise, np.zeros((150, 150, 3), np.uint8)], spec)


@pytest.mark.skipif(HAS_TORCH, reason="torch is installed; the missing-torch message is not reachable")
def test_missing_torch_message(model_path, spec):
    from ers_spark.models.torch_runner import TorchEmbedder

    with pytest.raises(ModelError, match=r"torch backend needs torch: pip install 'ers-spark\[torch\]'"):
        TorchEmbedder(model_path, spec)


@needs_torch
def test_torch_matches_onnx_cpu(model_path, spec, batch):
    from ers_spark.models.torch_runner import TorchEmbedder

    ref_unit, ref_norms = OnnxEmbedder(model_path, spec).embed(batch)
    emb = TorchEmbedder(model_path, spec, device="cpu")
    unit, norms = emb.embed(batch)
    assert unit.shape == ref_unit.shape == (3, 128)
    cos = np.sum(unit * ref_unit, axis=1)
    assert cos.min() >= 0.999, cos
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-3)
    clone = pickle.loads(pickle.dumps(emb))
    assert clone._module is None
    np.testing.assert_allclose(clone.embed(batch)[0], unit, atol=1e-6)


@needs_torch
def test_torch_fp16_matches_onnx_on_cpu(model_path, spec, batch):
    """fp16 parity (cosine >= 0.999) checked on CPU too, so it is tested on machines without a GPU."""
    from ers_spark.models.torch_runner import TorchEmbedder

    ref_unit, _ = OnnxEmbedder(model_path, spec).embed(batch)
    unit, _ = TorchEmbedder(model_path, spec, device="cpu", fp16=True).embed(batch)
    assert np.sum(unit * ref_unit, axis=1).min() >= 0.999


@needs_torch
def test_torch_matches_onnx_cuda_fp16(model_path, spec, batch):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device for torch")
    from ers_spark.models.torch_runner import TorchEmbedder

    ref_unit, _ = OnnxEmbedder(model_path, spec).embed(batch)
    for fp16 in (False, True):
        unit, _ = TorchEmbedder(model_path, spec, device="cuda:0", fp16=fp16).embed(batch)
        assert np.sum(unit * ref_unit, axis=1).min() >= 0.999
