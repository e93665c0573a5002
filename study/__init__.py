"""The DIP study service. Rooms: config (the config objects), engine/ (one trial, no Ray,
MLflow or Optuna), space (Optuna), cluster/ (Ray), tracking/ (MLflow), studydir (the study
folder), service/report/export (a study), cli/ (the command line)."""
