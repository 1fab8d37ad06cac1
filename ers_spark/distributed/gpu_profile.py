"""GPUs for the embed stage only: its ``mapInArrow`` runs under a Spark ``ResourceProfile`` (SPARK-46812).

Why: ``spark.task.resource.gpu.amount`` makes every task of every stage wait for a GPU slot, so ingest,
locate-ui, score and clean hold the cluster's GPUs idle. With ``embed.gpus_per_task`` only embed's tasks ask
for one; the other stages run on the default profile, which asks for none.

Two shapes, as Spark's stage-level scheduling offers them:

- dynamic allocation **off** (standalone, YARN, Kubernetes): a *task* profile. The executors you start carry
  the GPUs (``spark.executor.resource.gpu.amount`` and a discovery script); embed's tasks take
  ``gpus_per_task`` of them, every other task takes none.
- dynamic allocation **on** (YARN, Kubernetes, standalone): an *executor* profile too. Spark starts GPU
  executors (``embed.gpus_per_executor`` each) for the embed stage and the default CPU executors for the
  rest; idle GPU executors go back when embed ends.

Spark's local mode has no stage-level scheduling: a profile there is a configuration error, said before any
work (embed then runs on the driver's CPU or the GPU the whole process sees).
"""

from __future__ import annotations

from typing import Any, Mapping

from ers_spark.config import EmbedConfig
from ers_spark.errors import ConfigError

GPU = "gpu"

#: The Spark settings these decisions read (a classic or a Connect session answers ``spark.conf.get`` for each).
GPU_SETTINGS = ("spark.master", "spark.task.resource.gpu.amount", "spark.executor.resource.gpu.amount",
                "spark.executor.resource.gpu.discoveryScript", "spark.dynamicAllocation.enabled", "spark.task.cpus",
                "spark.executor.cores")


def gpu_settings(spark: Any) -> dict[str, str]:
    """The session's values of :data:`GPU_SETTINGS` that are set."""
    found = {key: spark.conf.get(key, None) for key in GPU_SETTINGS}
    return {key: str(value) for key, value in found.items() if value is not None}


def is_dynamic_allocation(settings: Mapping[str, str]) -> bool:
    return settings.get("spark.dynamicAllocation.enabled", "false").lower() == "true"


def check_gpu_request(settings: Mapping[str, str], emb: EmbedConfig) -> None:
    """Fail with one line when ``embed.gpus_per_task`` cannot work on this session, before any Spark work."""
    if emb.gpus_per_task is None:
        if emb.device == "cuda" and settings.get("spark.task.resource.gpu.amount") is None:
            raise ConfigError(
                "embed.device=cuda but Spark gives tasks no GPU: set embed.gpus_per_task (only embed's tasks "
                "ask for a GPU) or spark.task.resource.gpu.amount (every task does), or use embed.device=auto"
            )
        return
    master = settings.get("spark.master", "")
    if master.startswith("local"):
        raise ConfigError(
            f"embed.gpus_per_task={emb.gpus_per_task:g} needs a cluster manager (standalone, YARN, Kubernetes): "
            f"Spark's {master} has no stage-level scheduling; leave it null on one machine"
        )
    if settings.get("spark.task.resource.gpu.amount") is not None:
        raise ConfigError(
            "embed.gpus_per_task and spark.task.resource.gpu.amount are both set: the Spark setting makes every "
            "stage's tasks wait for a GPU; remove it and let embed's resource profile ask for them"
        )
    if not is_dynamic_allocation(settings) and settings.get("spark.executor.resource.gpu.amount") is None:
        raise ConfigError(
            f"embed.gpus_per_task={emb.gpus_per_task:g} with dynamic allocation off runs on the executors you "
            "start, which have no GPUs: set spark.executor.resource.gpu.amount and "
            "spark.executor.resource.gpu.discoveryScript (or enable dynamic allocation)"
        )


def embed_resource_profile(settings: Mapping[str, str], emb: EmbedConfig) -> Any:
    """The ResourceProfile embed's ``mapInArrow`` runs under, or None when embed asks for no GPU.

    The task request is ``gpus_per_task`` GPUs and ``spark.task.cpus`` cores; with dynamic allocation it also
    asks for executors of ``gpus_per_executor`` GPUs (``spark.executor.cores`` cores, the session's discovery
    script), so Spark starts GPU executors for this stage only.
    """
    if emb.gpus_per_task is None:
        return None
    from pyspark.resource import ExecutorResourceRequests, ResourceProfileBuilder, TaskResourceRequests

    tasks = TaskResourceRequests().cpus(int(settings.get("spark.task.cpus", 1))).resource(GPU, emb.gpus_per_task)
    builder = ResourceProfileBuilder().require(tasks)
    if is_dynamic_allocation(settings):
        executors = ExecutorResourceRequests().resource(
            GPU, emb.gpus_per_executor, discoveryScript=settings.get("spark.executor.resource.gpu.discoveryScript", ""))
        cores = settings.get("spark.executor.cores")
        builder.require(executors.cores(int(cores)) if cores else executors)
    return builder.build
