"""embed.gpus_per_task: the checks before any work, and the ResourceProfile embed's mapInArrow runs under.

The profile itself on a cluster (embed's tasks get GPU addresses, the other stages' tasks ask for none) is
tested on the multi-host standalone cluster with fake GPUs (tests/test_multi_host.py).
"""

from __future__ import annotations

import dataclasses

import pytest

from ers_spark.config import load_config
from ers_spark.distributed.gpu_profile import check_gpu_request, embed_resource_profile, gpu_settings
from ers_spark.errors import ConfigError

STANDALONE = {"spark.master": "spark://master:7077", "spark.executor.resource.gpu.amount": "1"}
DYNAMIC = {"spark.master": "yarn", "spark.dynamicAllocation.enabled": "true", "spark.executor.cores": "4",
           "spark.executor.resource.gpu.discoveryScript": "/opt/gpu_discovery.sh"}


def _embed(**changes):
    return dataclasses.replace(load_config().embed, **changes)


@pytest.mark.parametrize(
    ("settings", "changes", "message"),
    [
        ({"spark.master": "local[2]"}, {"gpus_per_task": 0.5},
         "embed.gpus_per_task=0.5 needs a cluster manager (standalone, YARN, Kubernetes): Spark's local[2] has no "
         "stage-level scheduling; leave it null on one machine"),
        ({**STANDALONE, "spark.task.resource.gpu.amount": "1"}, {"gpus_per_task": 1.0},
         "embed.gpus_per_task and spark.task.resource.gpu.amount are both set: the Spark setting makes every "
         "stage's tasks wait for a GPU; remove it and let embed's resource profile ask for them"),
        ({"spark.master": "spark://master:7077"}, {"gpus_per_task": 0.25},
         "embed.gpus_per_task=0.25 with dynamic allocation off runs on the executors you start, which have no GPUs: "
         "set spark.executor.resource.gpu.amount and spark.executor.resource.gpu.discoveryScript (or enable dynamic "
         "allocation)"),
        (STANDALONE, {"device": "cuda"},
         "embed.device=cuda but Spark gives tasks no GPU: set embed.gpus_per_task (only embed's tasks ask for a "
         "GPU) or spark.task.resource.gpu.amount (every task does), or use embed.device=auto"),
    ],
)
def test_a_gpu_request_that_cannot_work_fails_in_one_line(settings, changes, message) -> None:
    with pytest.raises(ConfigError) as err:
        check_gpu_request(settings, _embed(**changes))
    assert str(err.value) == message


@pytest.mark.parametrize("settings", [STANDALONE, DYNAMIC, {"spark.master": "local[2]"}])
def test_no_gpus_per_task_means_no_profile(settings) -> None:
    check_gpu_request(settings, _embed())
    assert embed_resource_profile(settings, _embed()) is None


def test_task_profile_with_dynamic_allocation_off() -> None:
    emb = _embed(gpus_per_task=0.25)
    check_gpu_request(STANDALONE, emb)
    profile = embed_resource_profile(STANDALONE, emb)
    assert profile.taskResources["gpu"].amount == 0.25 and profile.taskResources["cpus"].amount == 1
    assert profile.executorResources == {}  # runs on the executors that exist


def test_executor_profile_with_dynamic_allocation() -> None:
    emb = _embed(gpus_per_task=0.5, gpus_per_executor=2)
    check_gpu_request(DYNAMIC, emb)
    profile = embed_resource_profile(DYNAMIC, emb)
    assert profile.taskResources["gpu"].amount == 0.5
    gpu = profile.executorResources["gpu"]
    assert (gpu.amount, gpu.discoveryScript) == (2, "/opt/gpu_discovery.sh")
    assert profile.executorResources["cores"].amount == 4


def test_config_bounds() -> None:
    with pytest.raises(ConfigError, match=r"embed.gpus_per_task must be null or in \(0, embed.gpus_per_executor=1\], "
                                          r"got 2.0"):
        load_config(overrides=["embed.gpus_per_task=2.0"])


@pytest.mark.spark
def test_settings_come_from_the_session(spark) -> None:
    settings = gpu_settings(spark)
    assert settings["spark.master"].startswith("local") and "spark.task.resource.gpu.amount" not in settings
