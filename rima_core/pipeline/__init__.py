"""What the orchestrators call: one function per step (``steps``), the step table that DVC,
MLflow Projects and Kubeflow follow, the ``rima`` command line, the Kubeflow run config and
reports, and ``rima check-repro``."""
