"""Score stage: broadcast the UI centroid and compute every image's ERS = min(1, 1 - <f_UI, f_i>).

gamma (the recognizability threshold) is per model: a fixed ``score.gamma``
wins; otherwise the gamma stored with the UIC is reused when it was calibrated
with the same score settings (else calibrated again: the log names what changed); otherwise it is
calibrated (with identity labels: the paper's TinyFace procedure, minimum
false rejects at the target false accept rate when unsure pairs count as
rejected; without labels: best balanced accuracy between UI members and the
rest) and stored with its UIC in ``ui_centroids``. Scores are MERGEd on
(image_id, model): a new UIC re-scores every row, and the previous scores stay
readable through Delta time travel. The ERS columns and the calibration sample are built by
:mod:`ers_spark.distributed.ers` and :mod:`ers_spark.distributed.calibration`.
"""

from __future__ import annotations

import logging
from typing import Any
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, FloatType

from ers_spark.core import ers as ers_math
from ers_spark.core.calibration import calibrate_gamma_held_out, calibrate_gamma_unlabelled
from ers_spark.config import ErsConfig, ScoreConfig
from ers_spark.distributed.calibration import identity_sample
from ers_spark.distributed.ers import enhanced_udf, ers_raw_column
from ers_spark.lake.contracts import (
    CENTROID,
    CREATED_AT,
    EMBEDDING,
    EMBEDDINGS,
    ENHANCED_EMBEDDING,
    ERS,
    ERS_RAW,
    GAMMA,
    GAMMA_METHOD,
    GAMMA_PARAMS,
    IDENTITY,
    IMAGE_ID,
    MODEL_NAME,
    MODEL_VERSION,
    RECOGNIZABLE,
    SCORED_AT,
    SCORES,
    UI_CENTROIDS,
    UI_MEMBERS,
    UIC_ID,
)
from ers_spark.errors import ContractError
from ers_spark.distributed.sampling import seeded_sample
from ers_spark.lake.tables import (
    StageRun,
    changed_settings,
    ensure_table,
    latest_model,
    merge_sync,
    of_model,
    read_table,
    settings_json,
    table_exists,
    table_version,
)

STAGE_NAME = "score"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Centroid:
    """One row of ui_centroids, as the score and clean stages use it."""

    uic_id: str
    model_name: str
    model_version: str
    vector: np.ndarray
    gamma: float | None
    gamma_method: str | None
    gamma_settings: str | None


def select_centroid(spark: SparkSession, cfg: ErsConfig, model: tuple[str, str], uic_id: str | None) -> Centroid:
    """The requested UIC, or the newest one for this model; a clear error when there is none."""
    centroids = read_table(spark, cfg, UI_CENTROIDS, hint="run `ers-spark locate-ui` first")
    if uic_id is not None:
        rows = centroids.where(F.col(UIC_ID) == uic_id).collect()
        if not rows:
            raise ContractError(f"score.uic_id={uic_id!r} is not in ui_centroids; list them with "
                                "`ers-spark sql \"SELECT uic_id, model_name, created_at FROM ers.ui_centroids\"`")
        row = rows[0]
        if (row[MODEL_NAME], row[MODEL_VERSION]) != model:
            raise ContractError(
                f"UIC {uic_id} belongs to model {row[MODEL_NAME]} {row[MODEL_VERSION]}, but the embeddings are "
                f"{model[0]} {model[1]}; re-derive it with `ers-spark locate-ui --from-members {uic_id}`"
            )
    else:
        row = (
            centroids.where(of_model(model))
            .orderBy(F.col(CREATED_AT).desc())
            .first()
        )
        if row is None:
            raise ContractError(
                f"no UI centroid for model {model[0]} {model[1]} in ui_centroids: run `ers-spark locate-ui` first"
            )
    return Centroid(
        uic_id=row[UIC_ID],
        model_name=row[MODEL_NAME],
        model_version=row[MODEL_VERSION],
        vector=ers_math.normalize_rows(np.asarray([row[CENTROID]], dtype=np.float32))[0],
        gamma=row[GAMMA],
        gamma_method=row[GAMMA_METHOD],
        gamma_settings=row[GAMMA_PARAMS],
    )


def score_dataframe(embeddings: DataFrame, centroid: Centroid, gamma: float, enhanced: bool) -> DataFrame:
    """Scores for every embedding row of the centroid's model."""
    raw = ers_raw_column(EMBEDDING, centroid.vector)
    scored = embeddings.select(IMAGE_ID, EMBEDDING, raw.alias(ERS_RAW)).select(
        IMAGE_ID,
        EMBEDDING,
        F.least(F.col(ERS_RAW), F.lit(1.0)).alias(ERS),
        ERS_RAW,
    )
    enhanced_col = enhanced_udf(centroid.vector)(F.col(EMBEDDING)) if enhanced else F.lit(None)
    return scored.select(
        IMAGE_ID,
        ERS,
        ERS_RAW,
        (F.col(ERS) >= F.lit(gamma)).alias(RECOGNIZABLE),
        F.lit(centroid.uic_id).alias(UIC_ID),
        F.lit(gamma).alias(GAMMA),
        F.lit(centroid.model_name).alias(MODEL_NAME),
        F.lit(centroid.model_version).alias(MODEL_VERSION),
        enhanced_col.cast(ArrayType(FloatType())).alias(ENHANCED_EMBEDDING),
        F.current_timestamp().alias(SCORED_AT),
    )


@dataclass(frozen=True)
class GammaChoice:
    """A gamma, how it was found, and what the calibration measured (for the run record and the log)."""

    gamma: float
    method: str
    details: dict[str, Any]


def _calibrate_with_identities(sample: pd.DataFrame, centroid: Centroid, params: ScoreConfig) -> GammaChoice:
    """The paper's gamma on the calibration identities, checked on the held-out ones (as ``evaluate`` does)."""
    emb = np.stack(sample[EMBEDDING].to_numpy()).astype(np.float32)
    calibration, check = calibrate_gamma_held_out(
        emb, sample[IDENTITY].to_numpy(), ers_math.ers_scores(emb, centroid.vector), target_far=params.target_far,
        calibration_share=params.calibration_share, seed=params.seed,
    )
    details: dict[str, Any] = {"rows": len(sample), "identities": int(sample[IDENTITY].nunique()),
                               "calibration_frr": calibration.frr, "calibration_far": calibration.far,
                               "held_out": None if check is None else asdict(check)}
    if check is None:
        log.info("score: gamma = %.4f (FRR %.3f at FAR %.3f on the calibration identities; the held-out ones "
                 "cannot support FAR %g)", calibration.gamma, calibration.frr, calibration.far, params.target_far)
    else:
        log.info("score: gamma = %.4f; on %d held-out genuine pairs FRR at FAR %g goes from %.3f to %.3f "
                 "with unsure pairs rejected (%.1f%% of genuine pairs unsure)", calibration.gamma, check.genuine_pairs,
                 params.target_far, check.frr_baseline, check.frr_unsure_as_reject, 100 * check.unsure_rate_genuine)
    return GammaChoice(calibration.gamma, calibration.method, details)


def _calibrate_unlabelled(spark: SparkSession, cfg: ErsConfig, embeddings: DataFrame, centroid: Centroid,
                          params: ScoreConfig) -> GammaChoice:
    """Best balanced accuracy between UI members and the rest, on a seeded row sample (no error rates: see log)."""
    sample = seeded_sample(embeddings.select(IMAGE_ID, EMBEDDING), IMAGE_ID, params.calibration_sample_rows, params.seed)
    if table_exists(spark, cfg, UI_MEMBERS):
        members = read_table(spark, cfg, UI_MEMBERS).where(F.col(UIC_ID) == centroid.uic_id).select(IMAGE_ID, F.lit(True).alias("_ui"))
        sample = sample.join(members, IMAGE_ID, "left")
    else:
        sample = sample.withColumn("_ui", F.lit(None).cast("boolean"))
    pdf = sample.toPandas()
    ers = ers_math.ers_scores(np.stack(pdf[EMBEDDING].to_numpy()).astype(np.float32), centroid.vector)
    is_ui = pdf["_ui"].eq(True).to_numpy(dtype=bool)
    calibration = calibrate_gamma_unlabelled(ers[is_ui], ers[~is_ui])
    below_ui, below_rest = 1.0 - calibration.far, calibration.frr
    log.info("score: gamma = %.4f separates the UI cluster from the rest (no identities: not error rates, the UI "
             "defines both sides): %.1f%% of %d sampled UI members and %.1f%% of %d other rows fall below it",
             calibration.gamma, 100 * below_ui, int(is_ui.sum()), 100 * below_rest, int((~is_ui).sum()))
    details = {"rows": len(pdf), "ui_members_below_gamma": below_ui, "other_rows_below_gamma": below_rest}
    return GammaChoice(calibration.gamma, calibration.method, details)


def calibrate_gamma(spark: SparkSession, cfg: ErsConfig, embeddings: DataFrame, centroid: Centroid,
                    params: ScoreConfig) -> GammaChoice:
    """With identities (``auto`` when 2+ identities of 2+ images exist): the paper's rule; else the unlabelled one."""
    if params.calibration != "unlabelled":
        sample = identity_sample(spark, cfg, embeddings, params)
        if sample[IDENTITY].nunique() >= 2:
            return _calibrate_with_identities(sample, centroid, params)
        if params.calibration == "identities":
            raise ContractError(
                "score.calibration=identities needs crops or imported sources with at least 2 identities of 2+ images each; "
                "use score.calibration=unlabelled or set score.gamma"
            )
    return _calibrate_unlabelled(spark, cfg, embeddings, centroid, params)


def gamma_settings(params: ScoreConfig) -> dict[str, Any]:
    """The settings a calibrated gamma depends on; a stored gamma is reused only when they are unchanged."""
    return {"calibration": params.calibration, "target_far": params.target_far,
            "calibration_sample_rows": params.calibration_sample_rows,
            "calibration_share": params.calibration_share, "seed": params.seed}


def store_gamma(spark: SparkSession, cfg: ErsConfig, centroid: Centroid, gamma: float, method: str,
                settings: dict[str, Any]) -> None:
    """Write gamma and the settings it was calibrated with next to its UIC in ui_centroids (one row updated)."""
    table = ensure_table(spark, cfg, UI_CENTROIDS)
    table.update(
        condition=F.col(UIC_ID) == centroid.uic_id,
        set={GAMMA: F.lit(float(gamma)), GAMMA_METHOD: F.lit(method), GAMMA_PARAMS: F.lit(settings_json(settings))},
    )


def choose_gamma(spark: SparkSession, cfg: ErsConfig, embeddings: DataFrame, centroid: Centroid,
                 params: ScoreConfig) -> tuple[GammaChoice, list[str]]:
    """(gamma, settings that changed since the stored gamma was calibrated).

    The configured gamma; else the UIC's stored one if it was calibrated with today's settings; else calibrate.
    """
    if params.gamma is not None:
        return GammaChoice(params.gamma, "fixed", {}), []
    settings = gamma_settings(params)
    changed: list[str] = []
    if centroid.gamma is not None:
        changed = changed_settings(centroid.gamma_settings, settings)
        if not changed:
            return GammaChoice(float(centroid.gamma), str(centroid.gamma_method), {"reused": True}), []
        log.info("score: the gamma stored with UIC %s was calibrated with other settings (%s differ); calibrating again",
                 centroid.uic_id, ", ".join(changed))
    choice = calibrate_gamma(spark, cfg, embeddings, centroid, params)
    store_gamma(spark, cfg, centroid, choice.gamma, choice.method, settings)
    return choice, changed


def run_score(spark: SparkSession, cfg: ErsConfig) -> dict:
    """Run the score stage; counts: scored = recognizable + unrecognizable."""
    params = cfg.score
    embeddings_all = read_table(spark, cfg, EMBEDDINGS, hint="run `ers-spark embed` first")
    model = latest_model(embeddings_all)[:2]
    embeddings = embeddings_all.where(of_model(model))
    centroid = select_centroid(spark, cfg, model, params.uic_id)
    run = StageRun(STAGE_NAME, params={**asdict(params), "uic_id": centroid.uic_id, "model": list(model)})
    run.input_versions = {
        EMBEDDINGS.name: table_version(spark, cfg, EMBEDDINGS),
        UI_CENTROIDS.name: table_version(spark, cfg, UI_CENTROIDS),
    }
    choice, changed = choose_gamma(spark, cfg, embeddings, centroid, params)
    gamma = choice.gamma
    run.params.update(gamma=gamma, gamma_method=choice.method, gamma_settings_changed=changed,
                      gamma_calibration=choice.details)
    scores = score_dataframe(embeddings, centroid, gamma, params.enhanced)
    ensure_table(
        spark, cfg, SCORES,
        properties={"ers.uic_id": centroid.uic_id, "ers.gamma": f"{gamma:.6f}", "ers.model_version": model[1]},
    )
    changes = merge_sync(spark, cfg, SCORES, scores, compare=(UIC_ID, GAMMA, ENHANCED_EMBEDDING))
    totals = (
        read_table(spark, cfg, SCORES)
        .where(of_model(model))
        .agg(F.count(F.lit(1)).alias("n"), F.sum(F.col(RECOGNIZABLE).cast("long")).alias("ok"))
        .first()
    )
    scored, recognizable = int(totals["n"]), int(totals["ok"] or 0)
    run.counts = {
        "scored": scored,
        "recognizable": recognizable,
        "unrecognizable": scored - recognizable,
        "inserted": changes["inserted"],
        "rescored": changes["updated"],
    }
    return run.finish(spark, cfg, outputs=(SCORES, UI_CENTROIDS))
