"""Which device a Spark task runs its model on, and which ONNX Runtime is installed.

Spark gives a task GPU *addresses* (from the discovery script, e.g.
``deploy/spark/gpu_discovery.sh``); CUDA wants a device *index* among the devices
this process can see. When ``CUDA_VISIBLE_DEVICES`` is set, CUDA renumbers the
listed devices 0..n-1, so the index is the address's position in that list.

Example
-------
>>> cuda_device_index(["3"], visible_devices="2,3")
1
>>> cuda_device_index(["3"], visible_devices=None)
3
>>> cuda_device_index(None, visible_devices="0") is None  # no GPU given to the task
True
"""

from __future__ import annotations

import importlib.metadata
import os

from ers_spark.errors import ModelError

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")
INSTALL_HINT = "pip install 'ers-spark[cpu]' (CPU) or 'ers-spark[gpu]' (CUDA), not both"


def cuda_device_index(addresses: list[str] | None, visible_devices: str | None = None) -> int | None:
    """CUDA device index for a task's Spark GPU addresses (the first one), or None without a GPU.

    Parameters
    ----------
    addresses : list of str, optional
        ``TaskContext.get().resources()["gpu"].addresses``.
    visible_devices : str, optional
        The value of ``CUDA_VISIBLE_DEVICES`` (ids or ``GPU-...`` UUIDs); None or empty when unset.

    Raises
    ------
    ModelError
        The address is not in ``CUDA_VISIBLE_DEVICES``, or is not an index when that is unset.
    """
    if not addresses:
        return None
    address = str(addresses[0]).strip()
    visible = [v.strip() for v in (visible_devices or "").split(",") if v.strip()]
    if visible:
        if address in visible:
            return visible.index(address)
        raise ModelError(
            f"Spark gave this task GPU {address!r}, which is not in CUDA_VISIBLE_DEVICES={visible_devices}; "
            "make the discovery script report the same ids (or UUIDs) the resource manager puts there"
        )
    try:
        return int(address)
    except ValueError as exc:
        raise ModelError(
            f"Spark gave this task GPU {address!r}, which is not a CUDA index, and CUDA_VISIBLE_DEVICES is unset; "
            "make the discovery script report indices"
        ) from exc


def task_gpu_addresses() -> list[str] | None:
    """The GPU addresses Spark assigned to the running task (None outside a task or without GPUs)."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    gpus = ctx.resources().get("gpu") if ctx is not None else None
    return list(gpus.addresses) if gpus is not None else None


def task_cuda_index() -> int | None:
    """:func:`cuda_device_index` for the running Spark task and this process's ``CUDA_VISIBLE_DEVICES``."""
    return cuda_device_index(task_gpu_addresses(), os.environ.get("CUDA_VISIBLE_DEVICES"))


def installed_onnxruntimes() -> list[str]:
    """Which ONNX Runtime distributions are installed (both own the same ``onnxruntime/`` folder)."""
    found = []
    for name in ORT_DISTRIBUTIONS:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def onnxruntime_report() -> dict[str, object]:
    """Installed ONNX Runtime distributions and the execution providers it offers (for the run log)."""
    distributions = installed_onnxruntimes()
    try:
        import onnxruntime as ort

        providers = list(ort.get_available_providers())
        version = ort.__version__
    except ImportError:
        providers, version = [], None
    return {"distributions": distributions, "version": version, "providers": providers}


def check_onnxruntime(require_cuda: bool, available_providers: list[str] | None = None,
                      distributions: list[str] | None = None) -> None:
    """Fail with one line when ONNX Runtime cannot do what was asked.

    Raises
    ------
    ModelError
        No ONNX Runtime; both CPU and GPU wheels installed over each other; or CUDA
        required and ``CUDAExecutionProvider`` missing.
    """
    distributions = installed_onnxruntimes() if distributions is None else distributions
    if len(distributions) > 1:
        raise ModelError(
            "both onnxruntime and onnxruntime-gpu are installed; they share one package folder and the CUDA "
            f"provider can vanish: pip uninstall -y onnxruntime onnxruntime-gpu, then {INSTALL_HINT}"
        )
    if available_providers is None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ModelError(f"ONNX Runtime is not installed: {INSTALL_HINT}") from exc
        available_providers = list(ort.get_available_providers())
    if require_cuda and CUDA_PROVIDER not in available_providers:
        raise ModelError(
            f"embed.device=cuda but this ONNX Runtime offers only {', '.join(available_providers)} "
            f"(no {CUDA_PROVIDER}): install onnxruntime-gpu ({INSTALL_HINT}) with a matching CUDA, or use embed.device=auto"
        )
