"""GPU device mapping, ONNX Runtime checks, the GPU discovery script, and what ships to executors."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ers_spark.errors import ModelError, user_error_from_executor
from ers_spark.runtime.shipping import build_code_zip
from ers_spark.models import devices
from ers_spark.models.devices import check_onnxruntime, cuda_device_index

REPO = Path(__file__).resolve().parents[1]
DISCOVERY = REPO / "deploy" / "spark" / "gpu_discovery.sh"
UUID_A, UUID_B = "GPU-8f3c2a10-0000-1111-2222-333344445555", "GPU-1b2c3d4e-6666-7777-8888-999900001111"


@pytest.mark.parametrize(
    ("addresses", "visible", "expected"),
    [
        (None, None, None),
        ([], "0,1", None),
        (["3"], None, 3),
        (["3"], "", 3),
        (["3"], "2,3", 1),  # CUDA renumbers the visible devices: address 3 is the second one
        (["2"], "2,3", 0),
        (["0"], "0", 0),
        ([UUID_B], f"{UUID_A},{UUID_B}", 1),
        (["1", "2"], "0,1,2", 1),  # a task with several GPUs runs on its first
    ],
)
def test_cuda_device_index(addresses, visible, expected) -> None:
    assert cuda_device_index(addresses, visible) == expected


@pytest.mark.parametrize(
    ("addresses", "visible", "message"),
    [(["3"], "0,1", "not in CUDA_VISIBLE_DEVICES=0,1"), ([UUID_A], None, "not a CUDA index")],
)
def test_cuda_device_index_refuses_what_it_cannot_map(addresses, visible, message) -> None:
    with pytest.raises(ModelError, match=message):
        cuda_device_index(addresses, visible)


def test_check_onnxruntime_with_fakes() -> None:
    check_onnxruntime(False, ["CPUExecutionProvider"], ["onnxruntime"])
    check_onnxruntime(True, ["CUDAExecutionProvider", "CPUExecutionProvider"], ["onnxruntime-gpu"])
    with pytest.raises(ModelError, match="both onnxruntime and onnxruntime-gpu are installed"):
        check_onnxruntime(False, ["CPUExecutionProvider"], ["onnxruntime", "onnxruntime-gpu"])
    with pytest.raises(ModelError, match="offers only CPUExecutionProvider"):
        check_onnxruntime(True, ["CPUExecutionProvider"], ["onnxruntime"])


def _tiny_spec_and_model(tmp_path: Path):
    from ers_spark.models.spec import ModelSpec
    from onnx_builders import tiny_embedding_model

    model = tiny_embedding_model(tmp_path / "tiny.onnx", size=32, dim=8)
    spec = ModelSpec.from_dict({"name": "tiny", "onnx_path": str(model), "input_height": 32, "input_width": 32,
                                "mean": [0.0] * 3, "std": [1.0] * 3, "embedding_dim": 8})
    return spec, model


def test_cuda_required_without_cuda_provider_fails(tmp_path, monkeypatch) -> None:
    """embed.device=cuda: a missing CUDA provider is an error, never a silent CPU run."""
    import onnxruntime as ort

    from ers_spark.models.onnx_runner import OnnxEmbedder

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(devices, "installed_onnxruntimes", lambda: ["onnxruntime"])
    spec, model = _tiny_spec_and_model(tmp_path)
    with pytest.raises(ModelError, match="embed.device=cuda but this ONNX Runtime offers only CPUExecutionProvider"):
        OnnxEmbedder(model, spec, device_id=0, require_gpu=True).session
    fallback = OnnxEmbedder(model, spec, device_id=0, require_gpu=False)
    assert fallback.runtime == "cpu CPUExecutionProvider (gpu 0 given, not used)"
    assert OnnxEmbedder(model, spec).runtime == "cpu CPUExecutionProvider"


def test_cuda_provider_dropped_at_session_start_fails(tmp_path, monkeypatch) -> None:
    """ONNX Runtime silently drops a CUDA provider that fails to start: the session's providers are checked."""
    import onnxruntime as ort

    from ers_spark.models.onnx_runner import OnnxEmbedder

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(devices, "installed_onnxruntimes", lambda: ["onnxruntime-gpu"])
    real_session = ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession", lambda path, sess_options=None, providers=None:
                        real_session(path, sess_options=sess_options, providers=["CPUExecutionProvider"]))
    spec, model = _tiny_spec_and_model(tmp_path)
    with pytest.raises(ModelError, match="could not start CUDAExecutionProvider on device 1"):
        OnnxEmbedder(model, spec, device_id=1, require_gpu=True).session


def test_torch_cuda_required_without_cuda_fails(tmp_path) -> None:
    torch = pytest.importorskip("torch", reason="torch is optional: pip install 'ers-spark[torch]'")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the missing-CUDA error cannot happen here")
    from ers_spark.models.torch_runner import TorchEmbedder

    spec, model = _tiny_spec_and_model(tmp_path)
    with pytest.raises(ModelError, match="torch device cuda:0 requested but torch"):
        TorchEmbedder(model, spec, device="cuda:0").module


def _fake_nvidia_smi(folder: Path, lines: str, status: int = 0) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    stub = folder / "nvidia-smi"
    stub.write_text(f"#!/bin/sh\ncase \"$*\" in *uuid*) printf '{UUID_A}\\n{UUID_B}\\n';; *) printf '{lines}';; esac\n"
                    f"exit {status}\n")
    stub.chmod(0o755)
    return {"PATH": f"{folder}:/usr/bin:/bin"}


def test_gpu_discovery_script_reports_nvidia_smi_devices(tmp_path) -> None:
    env = _fake_nvidia_smi(tmp_path / "bin", "0\\n1\\n 2 \\n")
    out = subprocess.run([str(DISCOVERY)], capture_output=True, text=True, env=env, check=True).stdout
    assert json.loads(out) == {"name": "gpu", "addresses": ["0", "1", "2"]}
    out = subprocess.run([str(DISCOVERY)], capture_output=True, text=True, env={**env, "ERS_GPU_ADDRESS": "uuid"},
                         check=True).stdout
    assert json.loads(out) == {"name": "gpu", "addresses": [UUID_A, UUID_B]}


def test_gpu_discovery_script_fails_loudly_without_nvidia_smi(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    result = subprocess.run([str(DISCOVERY)], capture_output=True, text=True, env={"PATH": f"{tmp_path / 'empty'}:/bin"})
    assert result.returncode == 1 and "nvidia-smi not found" in result.stderr and result.stdout == ""
    env = _fake_nvidia_smi(tmp_path / "bin", "", status=9)
    failed = subprocess.run([str(DISCOVERY)], capture_output=True, text=True, env=env)
    assert failed.returncode == 1 and "nvidia-smi failed" in failed.stderr


def test_code_zip_is_importable_on_its_own(tmp_path) -> None:
    """The --py-files zip carries the package and its configs; a bare interpreter imports from it."""
    zip_path = build_code_zip(tmp_path)
    names = set(zipfile.ZipFile(zip_path).namelist())
    assert {"ers_spark/__init__.py", "ers_spark/stages/embed.py", "ers_spark/conf/local.yaml",
            "ers_spark/conf/models/dlib_resnet_v1.yaml"} <= names
    assert build_code_zip(tmp_path / "again").read_bytes() == zip_path.read_bytes()  # deterministic
    code = "import ers_spark.errors as e; print(e.__file__)"
    # -S: no site-packages, so the installed (editable) copy cannot be found; only the zip can
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(zip_path)}, cwd=tmp_path).stdout
    assert out.strip().startswith(str(zip_path))


def test_executor_error_becomes_one_line() -> None:
    trace = (
        "org.apache.spark.api.python.PythonException: Traceback (most recent call last):\n"
        '  File "/work/app-1/0/ers_spark.zip/ers_spark/stages/embed.py", line 210, in embed_batches\n'
        "ers_spark.errors.ModelError: embed.device=cuda but this ONNX Runtime offers only CPUExecutionProvider\n"
        "\tat org.apache.spark.api.python.BasePythonRunner$ReaderIterator.handlePythonException\n"
    )
    err = user_error_from_executor(RuntimeError(trace))
    assert isinstance(err, ModelError)
    assert str(err) == "embed.device=cuda but this ONNX Runtime offers only CPUExecutionProvider (raised on an executor)"
    assert user_error_from_executor(RuntimeError("java.lang.OutOfMemoryError")) is None
