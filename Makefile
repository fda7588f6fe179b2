# Shortcuts for the project's everyday commands; each runs from a plain shell (no activated
# virtualenv needed: the scripts create/reuse .venv, the other targets call .venv/bin directly).
VENV ?= .venv
TRACKING_URI ?= sqlite:///mlflow.db
MODEL ?= models:/rima@champion
PORT ?= 5001

.PHONY: repro test ui serve kfp venv

venv:  ## create/reuse .venv with the project installed
	bash -c 'source scripts/_venv.sh'

repro:  ## the whole pipeline on params.yaml (dvc repro)
	bash scripts/run_pipeline.sh

test:  ## lint + every test (what CI runs)
	bash scripts/test.sh

ui: venv  ## the MLflow UI on the local tracking database, loopback only
	MLFLOW_TRACKING_URI=$(TRACKING_URI) $(VENV)/bin/mlflow ui --backend-store-uri $(TRACKING_URI) -h 127.0.0.1 -p 5000

serve: venv  ## serve the champion model on 127.0.0.1:$(PORT)
	MLFLOW_TRACKING_URI=$(TRACKING_URI) PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/mlflow models serve -m $(MODEL) --env-manager local -h 127.0.0.1 -p $(PORT)

kfp: venv  ## compile the Kubeflow pipeline to rima_pipeline.yaml
	$(VENV)/bin/python -m pipelines compile --out rima_pipeline.yaml
