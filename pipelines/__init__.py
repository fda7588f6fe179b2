"""The RIMA Kubeflow pipeline: definition, compile, submit and local run.

Use it from a checkout of the repository (the repository root on ``sys.path``), e.g.
``python -m pipelines compile`` (:mod:`pipelines.cli`). Nothing here is needed inside the image;
it imports ``rima_core`` and ``components``, never the other way round.
"""

from pipelines.rima_pipeline import ClusterOptions, build_pipeline, rima_pipeline

__all__ = ["ClusterOptions", "build_pipeline", "rima_pipeline"]
