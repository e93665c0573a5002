"""The MLflow room: plain records, the durable spool, the courier that delivers them, and
reads of studies. Only this folder imports mlflow."""
