"""Table contracts: the column names and schemas of every Delta table, in one place.

Each stage checks its input against the contract of the table it reads with
:func:`check_contract`, which names every missing or mistyped column.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import DataFrame
from pyspark.sql.types import (
    ArrayType,
    BinaryType,
    BooleanType,
    DataType,
    DoubleType,
    FloatType,
    IntegerType,
    LongType,
    MapType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from ers_spark.errors import ContractError

# column names shared by several tables
IMAGE_ID = "image_id"
SOURCE_PATH = "source_path"
IDENTITY = "identity"
WIDTH = "width"
HEIGHT = "height"
FORMAT = "format"
BYTES = "bytes"
INGESTED_AT = "ingested_at"
EMBEDDING = "embedding"
RAW_NORM = "raw_norm"
MODEL_NAME = "model_name"
MODEL_VERSION = "model_version"
RUNTIME = "runtime"  # runs: JSON of where tasks ran (device, model copy, code origin)
EMBEDDED_AT = "embedded_at"
ALIGNED = "aligned"  # embeddings: true = a detected, aligned face chip; false = a centred resize (no face found); null = align off
UIC_ID = "uic_id"
METHOD = "method"
EPS = "eps"
MEMBER_COUNT = "member_count"
TOP_CLUSTER_SIZES = "top_cluster_sizes"
MEAN_MEMBER_DISTANCE = "mean_member_distance"
CENTROID = "centroid"
INPUT_VERSION = "input_table_version"
GAMMA = "gamma"
GAMMA_METHOD = "gamma_method"
CREATED_AT = "created_at"
CLUSTER_PARAMS = "cluster_params"  # JSON: the locate-ui settings a UIC was made with
GAMMA_PARAMS = "gamma_params"  # JSON: the score settings its stored gamma was calibrated with
ERS = "ers"
ERS_RAW = "ers_raw"
RECOGNIZABLE = "recognizable"
ENHANCED_EMBEDDING = "enhanced_embedding"
SCORED_AT = "scored_at"
STAGE = "stage"
REASON = "reason"
DETAIL = "detail"
QUARANTINED_AT = "quarantined_at"
SUBCENTER_ANGLE = "subcenter_angle_deg"
CLEANED_AT = "cleaned_at"
RUN_ID = "run_id"
PARAMS = "params"
COUNTS = "counts"
INPUT_VERSIONS = "input_versions"
OUTPUT_VERSIONS = "output_versions"
SECONDS = "seconds"
STARTED_AT = "started_at"
IMPORTED_AT = "imported_at"

# quarantine reasons
REASON_UNDECODABLE = "undecodable"
REASON_EMPTY = "empty_file"
REASON_EMBED_FAILED = "embed_failed"
REASON_UNRECOGNIZABLE = "unrecognizable"
REASON_LABEL_NOISE = "label_noise"
REASON_NO_FACE = "no_face"
REASON_IDENTITY_CONFLICT = "identity_conflict"  # same bytes as a crop labelled with another identity
# import-embeddings: rows of a user's vector table that cannot become embeddings
REASON_NULL_ID = "null_id"
REASON_EMPTY_VECTOR = "empty_vector"  # null or zero-length vector
REASON_WRONG_DIMENSION = "wrong_dimension"  # not the dimension of the model's stored rows (or the input's majority)
REASON_NON_FINITE = "non_finite"  # a NaN or infinite component
REASON_ZERO_VECTOR = "zero_vector"  # norm 0: no direction to compare
REASON_DUPLICATE_ID = "duplicate_id"  # one id, several different rows (vector, identity or path)
REASON_CHANGED_VECTOR = "changed_vector"  # differs from the vector stored for this id and model version


@dataclass(frozen=True)
class TableContract:
    """A Delta table's name, schema and merge key."""

    name: str
    schema: StructType
    key: tuple[str, ...] = (IMAGE_ID,)

    @property
    def columns(self) -> list[str]:
        return [f.name for f in self.schema.fields]

    @property
    def cluster_by(self) -> tuple[str, ...]:
        """Delta liquid clustering columns: image_id wherever the table has it (every MERGE joins on it)."""
        return (IMAGE_ID,) if IMAGE_ID in self.columns else ()


def _fields(*fields: tuple[str, DataType, bool]) -> StructType:
    return StructType([StructField(name, dtype, nullable) for name, dtype, nullable in fields])


CROPS = TableContract(
    "crops",
    _fields(
        (IMAGE_ID, StringType(), False),
        (SOURCE_PATH, StringType(), True),
        (IDENTITY, StringType(), True),
        (WIDTH, IntegerType(), False),
        (HEIGHT, IntegerType(), False),
        (FORMAT, StringType(), False),
        (BYTES, BinaryType(), False),
        (INGESTED_AT, TimestampType(), False),
    ),
)

EMBEDDINGS = TableContract(
    "embeddings",
    _fields(
        (IMAGE_ID, StringType(), False),
        (EMBEDDING, ArrayType(FloatType(), True), False),
        (RAW_NORM, FloatType(), False),
        (MODEL_NAME, StringType(), False),
        (MODEL_VERSION, StringType(), False),
        (EMBEDDED_AT, TimestampType(), False),
        (ALIGNED, BooleanType(), True),
    ),
    key=(IMAGE_ID, MODEL_NAME, MODEL_VERSION),
)

UI_CENTROIDS = TableContract(
    "ui_centroids",
    _fields(
        (UIC_ID, StringType(), False),
        (MODEL_NAME, StringType(), False),
        (MODEL_VERSION, StringType(), False),
        (METHOD, StringType(), False),
        (EPS, DoubleType(), True),
        (MEMBER_COUNT, LongType(), False),
        (TOP_CLUSTER_SIZES, ArrayType(LongType(), True), False),
        (MEAN_MEMBER_DISTANCE, DoubleType(), False),
        (CENTROID, ArrayType(FloatType(), True), False),
        (INPUT_VERSION, LongType(), True),
        (GAMMA, DoubleType(), True),
        (GAMMA_METHOD, StringType(), True),
        (CREATED_AT, TimestampType(), False),
        (CLUSTER_PARAMS, StringType(), True),
        (GAMMA_PARAMS, StringType(), True),
    ),
    key=(UIC_ID,),
)

UI_MEMBERS = TableContract(
    "ui_members",
    _fields(
        (UIC_ID, StringType(), False),
        (IMAGE_ID, StringType(), False),
    ),
    key=(UIC_ID, IMAGE_ID),
)

SCORES = TableContract(
    "scores",
    _fields(
        (IMAGE_ID, StringType(), False),
        (ERS, DoubleType(), False),
        (ERS_RAW, DoubleType(), False),
        (RECOGNIZABLE, BooleanType(), False),
        (UIC_ID, StringType(), False),
        (GAMMA, DoubleType(), False),
        (MODEL_NAME, StringType(), False),
        (MODEL_VERSION, StringType(), False),
        (ENHANCED_EMBEDDING, ArrayType(FloatType(), True), True),
        (SCORED_AT, TimestampType(), False),
    ),
    key=(IMAGE_ID, MODEL_NAME, MODEL_VERSION),
)

CLEANED = TableContract(
    "cleaned",
    _fields(
        (IMAGE_ID, StringType(), False),
        (SOURCE_PATH, StringType(), True),
        (IDENTITY, StringType(), True),
        (ERS, DoubleType(), False),
        (SUBCENTER_ANGLE, DoubleType(), True),
        (UIC_ID, StringType(), False),
        (MODEL_NAME, StringType(), False),
        (MODEL_VERSION, StringType(), False),
        (CLEANED_AT, TimestampType(), False),
    ),
)

QUARANTINE = TableContract(
    "quarantine",
    _fields(
        (IMAGE_ID, StringType(), False),
        (SOURCE_PATH, StringType(), True),
        (STAGE, StringType(), False),
        (REASON, StringType(), False),
        (DETAIL, StringType(), True),
        (ERS, DoubleType(), True),
        (UIC_ID, StringType(), True),
        (MODEL_VERSION, StringType(), True),
        (QUARANTINED_AT, TimestampType(), False),
    ),
    # a crop quarantined by embed under one model version is tried again under the next
    key=(IMAGE_ID, STAGE, SOURCE_PATH, MODEL_VERSION),
)

RUNS = TableContract(
    "runs",
    _fields(
        (RUN_ID, StringType(), False),
        (STAGE, StringType(), False),
        (PARAMS, StringType(), False),
        (INPUT_VERSIONS, MapType(StringType(), LongType(), True), False),
        (OUTPUT_VERSIONS, MapType(StringType(), LongType(), True), False),
        (COUNTS, MapType(StringType(), LongType(), False), False),
        (SECONDS, DoubleType(), False),
        (STARTED_AT, TimestampType(), False),
        (RUNTIME, StringType(), True),
    ),
    key=(RUN_ID,),
)

# evaluate stage (eval_* tables; the report reads them)
MODEL = "model"
PAIRS_SOURCE = "pairs_source"
PROTOCOL = "protocol"
METRIC = "metric"
OPERATING_POINT = "operating_point"
VALUE = "value"
COUNT = "count"
CURVE = "curve"
X = "x"
Y = "y"
POINT_INDEX = "point_index"

EVAL_RUNS = TableContract(
    "eval_runs",
    _fields(
        (RUN_ID, StringType(), False),
        (STARTED_AT, TimestampType(), False),
        (MODEL, StringType(), False),
        (UIC_ID, StringType(), False),
        (GAMMA, DoubleType(), True),
        (PARAMS, StringType(), False),
        (INPUT_VERSIONS, StringType(), False),
        (PAIRS_SOURCE, StringType(), False),
    ),
    key=(RUN_ID,),
)

EVAL_METRICS = TableContract(
    "eval_metrics",
    _fields(
        (RUN_ID, StringType(), False),
        (PROTOCOL, StringType(), False),
        (METHOD, StringType(), False),
        (METRIC, StringType(), False),
        (OPERATING_POINT, StringType(), False),
        (VALUE, DoubleType(), True),
        (COUNT, LongType(), True),
    ),
    key=(RUN_ID, PROTOCOL, METHOD, METRIC, OPERATING_POINT),
)

EVAL_CURVES = TableContract(
    "eval_curves",
    _fields(
        (RUN_ID, StringType(), False),
        (CURVE, StringType(), False),
        (METHOD, StringType(), False),
        (X, DoubleType(), False),
        (Y, DoubleType(), False),
        (POINT_INDEX, IntegerType(), False),
    ),
    key=(RUN_ID, CURVE, METHOD, POINT_INDEX),
)

# written by `ers-spark import-embeddings` (bring your own vectors): what the crops table holds for ingested
# images, without bytes; score, clean, evaluate and report read both through lake.tables.image_labels
IMPORTED_SOURCES = TableContract(
    "imported_sources",
    _fields(
        (IMAGE_ID, StringType(), False),
        (SOURCE_PATH, StringType(), True),
        (IDENTITY, StringType(), True),
        (MODEL_NAME, StringType(), False),
        (MODEL_VERSION, StringType(), False),
        (IMPORTED_AT, TimestampType(), False),
    ),
)

# the tables an image's identity and source path come from: crops (ingested images), imported_sources (vectors)
LABEL_TABLES = (CROPS, IMPORTED_SOURCES)

# kept apart from ALL_TABLES: `ers-spark run` never writes them
EVAL_TABLES: dict[str, TableContract] = {c.name: c for c in (EVAL_RUNS, EVAL_METRICS, EVAL_CURVES)}

ALL_TABLES: dict[str, TableContract] = {
    c.name: c for c in (CROPS, EMBEDDINGS, UI_CENTROIDS, UI_MEMBERS, SCORES, CLEANED, QUARANTINE, RUNS)
}

# every table ers-spark writes (`ers-spark maintain` and `ers-spark sql` go through them all)
LAKE_TABLES: dict[str, TableContract] = {**ALL_TABLES, IMPORTED_SOURCES.name: IMPORTED_SOURCES, **EVAL_TABLES}


def same_type(actual: DataType, expected: DataType) -> bool:
    """Types match ignoring nullability (Spark often loosens it on the way)."""
    if isinstance(expected, ArrayType):
        return isinstance(actual, ArrayType) and same_type(actual.elementType, expected.elementType)
    if isinstance(expected, MapType):
        return (
            isinstance(actual, MapType)
            and same_type(actual.keyType, expected.keyType)
            and same_type(actual.valueType, expected.valueType)
        )
    return type(actual) is type(expected)


def contract_problems(schema: StructType, required: dict[str, DataType]) -> list[str]:
    """Every missing or mistyped column, as human-readable phrases."""
    actual = {f.name: f.dataType for f in schema.fields}
    problems = []
    for name, dtype in required.items():
        if name not in actual:
            problems.append(f"missing column '{name}' ({dtype.simpleString()})")
        elif not same_type(actual[name], dtype):
            problems.append(
                f"column '{name}' is {actual[name].simpleString()}, expected {dtype.simpleString()}"
            )
    return problems


def check_columns(df: DataFrame, required: dict[str, DataType], what: str) -> None:
    """Raise :class:`ContractError` naming each missing or mistyped column of ``df``."""
    problems = contract_problems(df.schema, required)
    if problems:
        raise ContractError(f"{what} does not match its contract: {'; '.join(problems)}")


def check_contract(df: DataFrame, contract: TableContract, what: str | None = None) -> None:
    """Check ``df`` against a table contract (all its columns, ignoring nullability)."""
    required = {f.name: f.dataType for f in contract.schema.fields}
    check_columns(df, required, what or f"table '{contract.name}'")
