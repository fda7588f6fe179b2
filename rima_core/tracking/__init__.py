"""What a run records and where: MLflow runs and tags (``mlflow_runs``), the git provenance of
the code, MLflow Projects run names, the one naming scheme of every reported number
(``metric_names``) and which numbers are headline numbers. Imported by the runs that log."""
