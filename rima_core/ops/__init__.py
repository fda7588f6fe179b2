"""After a run: the MLflow model registry (registration, the comparison and promotion of
versions), the served pyfunc model with its input checks, and the model card."""
