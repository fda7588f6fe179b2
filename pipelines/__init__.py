"""The RIMA Kubeflow pipeline: definition, compile, submit and local run.

Import it from a checkout of the repository (the repository root on ``sys.path``); ``rima
pipeline ...`` does that itself. Nothing here is needed inside the image.
"""

from pipelines.rima_pipeline import ClusterOptions, build_pipeline, rima_pipeline

__all__ = ["ClusterOptions", "build_pipeline", "rima_pipeline"]
