"""RIMA: robust incomplete-modality alignment via labeled optimal transport.

The library computes everything; the orchestrators (DVC, MLproject, Kubeflow) only pass paths
and parameters to :mod:`rima_core.pipeline.steps`.
"""

__version__ = "0.1.0"
