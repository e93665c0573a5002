"""The study service: one trial (config, images, metrics, trial), and the study around it
(space: Optuna, tune: Ray, tracking: MLflow, service/export: orchestration)."""
