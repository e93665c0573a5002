"""The study's runs table as a saved view of MLflow's UI: the trials, best first, with a column
for each objective, the honest final, honest autostop and oracle numbers, and each searched
parameter, opened in the UI's model-training workflow.

MLflow 3.17's UI (mlflow/server/js/build/static/js, the experiment page's shared-view hook
and saved-view envelope) loads the experiment tag `mlflow.sharedViewState.<KEY>` when the
URL carries `viewStateShareKey=<KEY>`: a JSON envelope `{name, createdAt, updatedAt, state}`
whose `state` (a JSON string) holds the search facets (`searchFilter`, `orderByKey`,
`orderByAsc`) and the table's UI state (`selectedColumns` and `columnOrder`, keys such
as metrics.`fit/psnr_ema`). The URL must carry no facet of its own, or the view is not applied.
The workflow (GenAI or model training) is the URL's `workflowType` (`genai` or
`machine_learning`); without it the UI takes the user's last choice, GenAI by default, and
ignores the experiment's `mlflow.experimentKind` tag.
"""
from __future__ import annotations

import json
import time
import urllib.parse

from mlflow.tracking import MlflowClient

from study.tracking.keys import to_mlflow
from study.tracking.records import ROLE_TAG

VIEW_KEY = "dip-trials"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
WORKFLOW = "machine_learning"
HONEST = ("psnr_ema", "psnr_autostop", "psnr_best")  # honest final, honest autostop, oracle


def view_state(objectives: list[tuple[str, str]], searched: list[str]) -> dict[str, object]:
    """The saved view: trial runs only, the first objective best first, its columns."""
    metrics = list(dict.fromkeys([m for m, _ in objectives] + list(HONEST)))
    first, direction = objectives[0]
    # What the trial tried, then how it did (the objective first), then its duration.
    columns = [*(f"params.`{p}`" for p in searched), *(f"metrics.`{to_mlflow(m)}`" for m in metrics),
               "attributes.`Duration`"]
    return {
        "searchFilter": f"tags.`{ROLE_TAG}` = 'trial'",
        "orderByKey": f"metrics.`{to_mlflow(first)}`", "orderByAsc": direction == "min",
        "selectedColumns": columns, "columnOrder": columns,
    }


def save_trials_view(client: MlflowClient, experiment_id: str, objectives: list[tuple[str, str]],
                     searched: list[str]) -> None:
    now = int(time.time() * 1000)
    envelope = {"name": "trials, best first", "createdAt": now, "updatedAt": now,
                "state": json.dumps(view_state(objectives, searched))}
    client.set_experiment_tag(experiment_id, VIEW_TAG, json.dumps(envelope))


def has_trials_view(uri: str, experiment_id: str) -> bool:
    """Whether the study's experiment has the saved view (a study older than it has not).
    Only a sqlite store is asked (`ui` serves those): a server elsewhere may be away, and
    MLflow's client retries for minutes; its studies are taken as having it."""
    if not uri.startswith("sqlite:///"):
        return True
    try:
        return VIEW_TAG in MlflowClient(tracking_uri=uri).get_experiment(experiment_id).tags
    except Exception:  # noqa: BLE001 - a store away or of another study: the plain link
        return False


def trials_link(base: str, experiment_id: str) -> str:
    """The saved view's link, in the model-training workflow."""
    query = urllib.parse.urlencode({"viewStateShareKey": VIEW_KEY, "workflowType": WORKFLOW})
    return f"{base}/#/experiments/{experiment_id}/runs?{query}"
