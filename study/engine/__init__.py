"""One trial without Ray, MLflow or Optuna: images, metrics, the packed training loop,
and the train and apply commands built on it."""
