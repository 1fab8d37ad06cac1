"""A Python worker holds one model: the one of its current task's device (Spark reuses workers across tasks)."""

from __future__ import annotations

import dataclasses

from ers_spark.config import load_config
from ers_spark.distributed import inference
from ers_spark.models.spec import load_model_spec


def test_a_worker_keeps_one_model_and_drops_it_for_another_device(monkeypatch):
    opened = []

    def fake_open(params, emb, path, device_id):
        opened.append(device_id)
        return object()

    monkeypatch.setattr(inference, "open_embedder", fake_open)
    monkeypatch.setattr(inference, "local_model_path", lambda params: "/m.onnx")
    monkeypatch.setattr(inference, "_EMBEDDER", [])
    params = inference.ModelFile(spec=load_model_spec("dlib_resnet_v1"), model_path="/m.onnx",
                                 model_sha256="0" * 64, model_version="1")
    emb = load_config().embed
    first = inference.get_embedder(params, emb, 0)
    assert inference.get_embedder(params, emb, 0) is first and opened == [0]  # loaded once
    other = inference.get_embedder(params, emb, 1)  # a later task on GPU 1
    assert other is not first and opened == [0, 1]
    assert [e for _, e in inference._EMBEDDER] == [other]  # GPU 0's model dropped
    fp16 = inference.get_embedder(params, dataclasses.replace(emb, backend="torch", fp16=True), 1)
    assert fp16 is not other and len(inference._EMBEDDER) == 1 and opened == [0, 1, 1]
