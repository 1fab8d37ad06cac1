"""The torch backend opens PyTorch's own formats and ONNX graphs (through onnx2torch) and embeds as ONNX Runtime does.

Parity is checked on the converted dlib network and on an ArcFace-shaped network (PRelu, residual blocks,
BatchNorm1d head) built here with random weights and saved three ways: ONNX (torch's exporter), TorchScript
(``.pt``) and ``torch.export`` (``.pt2``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pickle
import warnings

import numpy as np
import pytest

from ers_spark.config import load_config
from ers_spark.distributed.inference import resolve_model
from ers_spark.errors import ConfigError, ModelError
from ers_spark.models.dlib_convert import ensure_builtin_onnx
from ers_spark.models.onnx_runner import OnnxEmbedder
from ers_spark.models.preprocess import prepare_arrays
from ers_spark.models.spec import ModelSpec, load_model_spec

HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(
    not HAS_TORCH, reason="torch is not installed (optional: pip install 'ers-spark[torch]')"
)
PARITY = 0.9999  # cosine between torch's and ONNX Runtime's embeddings, fp32


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


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1)


@pytest.mark.skipif(HAS_TORCH, reason="torch is installed; the missing-torch message is not reachable")
def test_missing_torch_message(model_path, spec):
    from ers_spark.models.torch_runner import TorchEmbedder

    with pytest.raises(ModelError, match=r"torch backend needs torch: pip install 'ers-spark\[torch\]'"):
        TorchEmbedder(model_path, spec)


@needs_torch
def test_dlib_network_through_onnx2torch_matches_onnx_runtime(model_path, spec, batch):
    from ers_spark.models.torch_runner import TorchEmbedder

    ref_unit, ref_norms = OnnxEmbedder(model_path, spec).embed(batch)
    emb = TorchEmbedder(model_path, spec, device="cpu")
    unit, norms = emb.embed(batch)
    assert unit.shape == ref_unit.shape == (3, 128)
    assert _cosines(unit, ref_unit).min() >= PARITY
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-3)
    clone = pickle.loads(pickle.dumps(emb))
    assert clone._module is None
    np.testing.assert_allclose(clone.embed(batch)[0], unit, atol=1e-6)
    half, _ = TorchEmbedder(model_path, spec, device="cpu", fp16=True).embed(batch)
    assert _cosines(half, ref_unit).min() >= 0.999  # fp16 checked on CPU too, so machines without a GPU test it


@needs_torch
def test_torch_matches_onnx_cuda_fp16(model_path, spec, batch):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device for torch")
    from ers_spark.models.torch_runner import TorchEmbedder

    ref_unit, _ = OnnxEmbedder(model_path, spec).embed(batch)
    for fp16 in (False, True):
        unit, _ = TorchEmbedder(model_path, spec, device="cuda:0", fp16=fp16).embed(batch)
        assert _cosines(unit, ref_unit).min() >= 0.999


# ------------------------------------------------------------------ an ArcFace-shaped network, three formats


def _arcface_like_module():
    """A small IResNet-style network: Conv-BN-PReLU stem, two residual blocks with PRelu, BN-Dropout-FC-BN head."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(cout), nn.PReLU(cout), nn.Conv2d(cout, cout, 3, 2, 1, bias=False),
                                      nn.BatchNorm2d(cout))
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            return self.body(x) + self.down(x)

    class ArcFaceLike(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.PReLU(8))
            self.blocks = nn.Sequential(Block(8, 16), Block(16, 32), Block(32, 32))
            self.head = nn.Sequential(nn.BatchNorm2d(32), nn.Dropout(0.4), nn.Flatten(),
                                      nn.Linear(32 * 14 * 14, 64), nn.BatchNorm1d(64))

        def forward(self, x):
            return self.head(self.blocks(self.stem(x)))

    torch.manual_seed(7)
    module = ArcFaceLike()
    for m in module.modules():  # random, non-trivial running statistics, so BatchNorm is not an identity
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return module.eval()


@pytest.fixture(scope="module")
def arcface_files(tmp_path_factory: pytest.TempPathFactory):
    """The same random network saved as ONNX, TorchScript and a torch.export program; its own outputs."""
    import torch

    folder = tmp_path_factory.mktemp("arcface_like")
    module = _arcface_like_module()
    example = torch.randn(2, 3, 112, 112)
    paths = {suffix: folder / f"arcface_like{suffix}" for suffix in (".onnx", ".pt", ".pt2")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's and tracer's deprecation notices
        # opset 17: onnx2torch 1.5 converts Identity up to opset 16-17 only (ArcFace releases are opset 11-13)
        torch.onnx.export(module, (example,), str(paths[".onnx"]), dynamo=False, opset_version=17,
                          input_names=["data"], output_names=["embedding"],
                          dynamic_axes={"data": {0: "n"}, "embedding": {0: "n"}})
        torch.jit.trace(module, example).save(str(paths[".pt"]))
    batch_dim = torch.export.Dim("n", min=1, max=1024)
    torch.export.save(torch.export.export(module, (example,), dynamic_shapes=({0: batch_dim},)), str(paths[".pt2"]))
    return module, paths


def _arcface_spec(**path) -> ModelSpec:
    base = dataclasses.replace(load_model_spec("arcface_r100_example"), embedding_dim=64, onnx_path=None)
    return dataclasses.replace(base, **path).validate()


@pytest.fixture(scope="module")
def arcface_batch() -> np.ndarray:
    rng = np.random.default_rng(3)
    return prepare_arrays([rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(5)],
                          _arcface_spec(onnx_path="x.onnx"))


@needs_torch
@pytest.mark.parametrize("suffix", [".onnx", ".pt", ".pt2"])
def test_arcface_like_network_matches_onnx_runtime_in_every_format(arcface_files, arcface_batch, suffix):
    import torch

    from ers_spark.models.torch_runner import TorchEmbedder

    module, paths = arcface_files
    onnx_spec = _arcface_spec(onnx_path=str(paths[".onnx"]))
    ref_unit, ref_norms = OnnxEmbedder(paths[".onnx"], onnx_spec).embed(arcface_batch)
    spec = onnx_spec if suffix == ".onnx" else _arcface_spec(torch_path=str(paths[suffix]))
    unit, norms = TorchEmbedder(paths[suffix], spec, device="cpu").embed(arcface_batch)
    assert _cosines(unit, ref_unit).min() >= PARITY
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-3)
    with torch.inference_mode():  # and both equal the network itself
        own = module(torch.from_numpy(arcface_batch)).numpy()
    assert _cosines(unit, own / np.linalg.norm(own, axis=1, keepdims=True)).min() >= PARITY
    half, _ = TorchEmbedder(paths[suffix], spec, device="cpu", fp16=True).embed(arcface_batch)
    assert _cosines(half, ref_unit).min() >= 0.999


@needs_torch
def test_onnx_runtime_refuses_a_pytorch_spec_before_any_work(arcface_files, tmp_path):
    _, paths = arcface_files
    spec_file = tmp_path / "mine.yaml"
    spec_file.write_text(f"name: mine\ntorch_path: {paths['.pt2']}\ninput_height: 112\ninput_width: 112\n"
                         "mean: 127.5\nstd: 127.5\nembedding_dim: 64\n")
    with pytest.raises(ConfigError) as err:
        resolve_model(load_config(overrides=[f"embed.model={spec_file}"]).embed)
    assert str(err.value) == (f"model 'mine' is a PyTorch file (model.torch_path={paths['.pt2']}), which ONNX Runtime "
                              "cannot run: set embed.backend=torch")
    model = resolve_model(load_config(overrides=[f"embed.model={spec_file}", "embed.backend=torch"]).embed)
    assert model.model_path == str(paths[".pt2"]) and "+torch-fp32" in model.model_version


@needs_torch
@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("broken.pt", b"not a zip", "torch backend cannot load {path} as a TorchScript: "),
        ("broken.pt2", b"not a zip", "torch backend cannot load {path} as a torch.export program: "),
        ("broken.onnx", b"\x08\x07garbage", "torch backend cannot load {path} as a ONNX graph via onnx2torch: "),
        ("model.h5", b"keras", "torch backend cannot open {path}: expected one of .onnx (ONNX graph via onnx2torch), "
                               ".pt (TorchScript), .pt2 (torch.export program)"),
    ],
)
def test_unreadable_model_fails_with_one_line(tmp_path, name, content, message):
    from ers_spark.models.torch_runner import load_torch_module

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ModelError) as err:
        load_torch_module(path)
    assert str(err.value).startswith(message.format(path=path)) and "\n" not in str(err.value)
