"""The study report, in one room: `document` writes report.md (make_report), `tables` its
rows and tables, `images` its images and the classical baseline, `pareto_section` its
Pareto front. It reads trials through study/tracking/ and never imports mlflow or optuna."""
from study.report.document import image_facts, make_report

__all__ = ["image_facts", "make_report"]
