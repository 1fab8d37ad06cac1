"""Write small synthetic stage tables (crops, embeddings, a UIC) straight into Delta for stage tests."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import numpy as np

from ers_spark.lake.contracts import CROPS, EMBEDDINGS, UI_CENTROIDS, UI_MEMBERS
from ers_spark.lake.tables import append, merge_insert_new

T0 = datetime(2026, 1, 1)


def write_embeddings(spark, cfg, ids, emb, identities=None, model=("synthetic", "1"), with_crops=True) -> None:
    """Embeddings (and matching crop rows with 1-byte fake images) for ``ids``."""
    rows = [
        (i, [float(x) for x in v], 1.0, model[0], model[1], T0, None) for i, v in zip(ids, np.asarray(emb, np.float32))
    ]
    merge_insert_new(spark, cfg, EMBEDDINGS, spark.createDataFrame(rows, EMBEDDINGS.schema))
    if with_crops:
        idents = identities if identities is not None else [None] * len(ids)
        crops = [(i, f"/data/{p or 'none'}/{i}.png", p, 1, 1, "png", b"x", T0) for i, p in zip(ids, idents)]
        merge_insert_new(spark, cfg, CROPS, spark.createDataFrame(crops, CROPS.schema))


def write_uic(spark, cfg, centroid, members, model=("synthetic", "1"), gamma=None, minutes=0) -> str:
    """Append a ui_centroids row (and its members) as locate-ui would; return its uic_id."""
    uic_id = uuid.uuid4().hex
    row = (
        uic_id, model[0], model[1], "test", 0.3, len(members), [len(members)], 0.1,
        [float(x) for x in centroid], 0, gamma, "fixed" if gamma is not None else None, T0 + timedelta(minutes=minutes),
        None, None,  # cluster_params, gamma_params: made outside locate-ui/score, so never reused by them
    )
    append(spark, cfg, UI_CENTROIDS, spark.createDataFrame([row], UI_CENTROIDS.schema))
    merge_insert_new(spark, cfg, UI_MEMBERS, spark.createDataFrame([(uic_id, m) for m in members], UI_MEMBERS.schema))
    return uic_id
