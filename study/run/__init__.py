"""The run: what ``python -m study.launch`` drives besides the plan and the evidence: the searcher, per-cell
scheduling, resources, MLflow tracking and the model registry, the live progress, the checks made before any
work, the cohort's preprocessing, external checkpoints and the end-of-study summary. Imports the plan, the
evidence and the core; never the commands (``study.launch``, ``study.report``, ...)."""
