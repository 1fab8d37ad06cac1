"""Pure numpy/scipy math, one idea per module; the Spark stages wrap these functions.

* :mod:`~ers_spark.core.ers`: unit embeddings, the UI centroid, ERS scores, pooling, ERS-enhanced features;
* :mod:`~ers_spark.core.calibration`: gamma, the ERS below which an image is unrecognizable;
* :mod:`~ers_spark.core.pairs`: genuine and impostor pairs from identity labels;
* :mod:`~ers_spark.core.metrics`: verification and identification metrics with recognizability;
* :mod:`~ers_spark.core.clustering`: spherical k-means (faiss);
* :mod:`~ers_spark.core.subcentres`: sub-centres of an identity and label noise;
* :mod:`~ers_spark.core.linkage`: single linkage on eps-neighbour graphs;
* :mod:`~ers_spark.core.ui_cluster`: which cluster is the UI, and at which eps;
* :mod:`~ers_spark.core.cells`: capped cells, the groups locate-ui clusters exactly;
* :mod:`~ers_spark.core.projection`, :mod:`~ers_spark.core.synthetic`: a PCA map, synthetic data.

Nothing here imports pyspark (a test enforces it); the only project imports allowed are
:mod:`ers_spark.errors` and modules of this package.
"""
