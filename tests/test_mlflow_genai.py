"""pipeline/mlflow_genai.py: the generations table as the run's MLflow GenAI evaluation, read back through MLflow's API
(one trace per prompt, both replies, the judges' assessments equal to the table's values), on a real sqlite store."""
import math

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from dpo_ray.tracking import RunLogger, ensure_experiment
from pipeline.mlflow_genai import log_generations

KIND = "reward model /models/rm"


def pointwise() -> pd.DataFrame:
    t = pd.DataFrame({
        "row_id": [f"pairs.jsonl:{i}" for i in range(5)],
        # rows 0 and 3: the same prompt and replies, judged differently (a sampling judge): each keeps its own values
        "prompt": ["What is 2+2?", "Name a color.", "Say hi.", "What is 2+2?", "Capital of Peru?"],
        "chosen": ["4", "Blue.", "Hi!", "Four.", "Lima."],
        "reference": ["5", "Dog.", "Hello.", "5", "Lima."],
        "policy": ["4", "Blue.", "Hi!", "4", "Lima, Peru."],
        "reference_tokens": [1, 2, 2, 1, 2], "policy_tokens": [1, 2, 2, 3, 3],
        "judge_policy": [2.0, 1.5, float("nan"), 1.0, 0.5],
        "judge_reference": [-1.0, 0.5, 0.3, 1.0, 0.9],
        "judge_error": ["", "", "policy reply: ValueError: the judge broke", "", ""],
    })
    t["win"] = [1.0, 1.0, float("nan"), 0.5, 0.0]
    t["verdict"] = ["policy", "policy", "", "tie", "reference"]
    return t


@pytest.fixture(scope="module")
def store(tmp_path_factory):  # one store for the module: creating its tables is most of a test's time
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    exp = ensure_experiment(uri, "genai")
    client = MlflowClient(uri)
    return uri, exp, client


def traces_of(uri, exp, run_id):
    return MlflowClient(uri).search_traces(locations=[exp], run_id=run_id)


def check(table, traces, judges):
    assert len(traces) == len(table)  # one trace per prompt
    by_row = {t.info.tags["row_id"]: t for t in traces}
    assert set(by_row) == set(table.row_id)
    for r in table.to_dict(orient="records"):
        t = by_row[r["row_id"]]
        assert t.data.spans[0].inputs == {"prompt": r["prompt"]}
        assert t.data.spans[0].outputs == {"policy": r["policy"], "reference": r["reference"]}  # both replies
        got = {a.name: a for a in t.info.assessments}
        assert set(got) == set(judges) | {"chosen"}
        assert got["chosen"].expectation.value == r["chosen"]
        for name in judges:
            a = got[name]
            assert a.source.source_id == KIND and a.source.source_type == "LLM_JUDGE"
            want = r[name]
            if (isinstance(want, float) and math.isnan(want)) or want == "":
                assert a.feedback.value is None and a.feedback.error.error_message == r["judge_error"]
            else:
                assert a.feedback.value == want and a.feedback.error is None


def test_pointwise_table_is_the_runs_evaluation(store):
    uri, exp, client = store
    run_id = client.create_run(exp, run_name="train").info.run_id
    before = mlflow.get_tracking_uri()
    table = pointwise()

    log_generations(RunLogger(uri, run_id), table, KIND)

    check(table, traces_of(uri, exp, run_id), ["verdict", "win", "judge_policy", "judge_reference"])
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"  # the training run goes on: MLflow's end of the run is undone
    assert run.data.metrics["judge_policy/mean"] == pytest.approx(table.judge_policy.mean())  # NaN left out
    assert run.data.metrics["win/mean"] == pytest.approx(table.win.mean())
    assert mlflow.active_run() is None and mlflow.get_tracking_uri() == before
    # the Evaluation runs page's row: the run is an evaluation run with the dataset it was given
    assert run.data.tags["mlflow.runType"] == "genai_evaluate" and run.inputs.dataset_inputs

    # evaluated again (a resumed evaluate stage): the view has this table's rows once, as eval_generations.json does
    again = table.assign(judge_reference=[-2.0, 0.0, 0.1, 0.5, 0.2])
    log_generations(RunLogger(uri, run_id), again, KIND)
    check(again, traces_of(uri, exp, run_id), ["verdict", "win", "judge_policy", "judge_reference"])


def test_pairwise_columns_and_no_judge(store):
    uri, exp, client = store
    pairwise = pointwise().drop(columns=["judge_policy", "judge_reference"]).assign(
        judge_policy_first=[0.9, 0.8, float("nan"), 0.5, 0.2], judge_policy_second=[0.7, 0.9, float("nan"), 0.5, 0.1])
    run_id = client.create_run(exp).info.run_id
    log_generations(RunLogger(uri, run_id), pairwise, KIND)
    check(pairwise, traces_of(uri, exp, run_id), ["verdict", "win", "judge_policy_first", "judge_policy_second"])

    plain = pointwise()[["row_id", "prompt", "chosen", "reference", "policy", "reference_tokens", "policy_tokens"]]
    run_id = client.create_run(exp).info.run_id
    log_generations(RunLogger(uri, run_id), plain, None)
    check(plain, traces_of(uri, exp, run_id), [])


def test_a_failure_is_a_warning(store, caplog):
    uri, exp, client = store
    log_generations(RunLogger(uri, "0" * 32), pointwise(), KIND)  # no such run: MLflow raises, the pipeline goes on
    assert "evaluation view was not logged" in caplog.text
    assert mlflow.active_run() is None
