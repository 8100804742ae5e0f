"""Scheduled retraining and the MLflow Model Registry, against a real `mlflow server` on 127.0.0.1.

First run: a base model trains and becomes the champion. A new data file arrives: `retrain` starts from
models:/NAME@champion, registers a challenger, compares it with the champion on the same eval set, moves
the alias. The same inputs again: nothing to do. An overlapping invocation is refused by the lock. The
registered model is an MLflow transformers model that `mlflow models serve` serves; versions registered before
that (a plain HF folder) still download and load.
"""
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import MlflowServer, free_port, small_config
from dpo_ray.config import load_config
from pipeline.artifacts import LockedError

pytestmark = pytest.mark.slow
NAME = "dpo-test"


def rest(server, method, path, body=None):
    req = urllib.request.Request(server.uri + path, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, cache_dir, small_pairs, demo_model, ray_local, mlflow_server):
    """The first run of the registry: a base model trains on day 1's data and becomes the champion (v1)."""
    from pipeline.run import run

    tmp_path = tmp_path_factory.mktemp("registry")
    data = tmp_path / "incoming"
    data.mkdir()
    lines = small_pairs.read_text().splitlines(keepends=True)
    (data / "day1.jsonl").write_text("".join(lines[:120]))
    base = small_config(tmp_path, cache_dir, data, **{"mlflow.tracking_uri": mlflow_server.uri, "registry.name": NAME,
                                                      "mlflow.experiment": "retrain"})
    return SimpleNamespace(tmp_path=tmp_path, data=data, lines=lines, base=base, summary=run(load_config("configs/demo.yaml", base)))


def test_register_retrain_promote_and_lock(first_run, cache_dir, mlflow_server):
    import mlflow
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextGenerationPipeline

    from pipeline import register
    from pipeline.run import run

    tmp_path, data, lines, base, first = first_run.tmp_path, first_run.data, first_run.lines, first_run.base, first_run.summary
    reg = first["registry"]
    assert reg["decision"] == "promoted" and reg["champion_version"] is None and reg["challenger_version"] == "1"

    client = MlflowClient(mlflow_server.uri)
    assert client.get_model_version_by_alias(NAME, "champion").version == "1"
    run1 = client.get_run(first["mlflow_run_id"])
    assert run1.info.status == "FINISHED" and run1.data.tags["registry.decision"] == "promoted"
    assert {"config.yaml", "curves.png", "summary.json"} <= {a.path for a in client.list_artifacts(run1.info.run_id)}
    # the model is one of the run's Logged models, with the run's eval metrics, and the registered version's source
    models = client.search_logged_models([run1.info.experiment_id])
    assert [(m.name, m.source_run_id, m.status.name) for m in models] == [("model", run1.info.run_id, "READY")]
    model = client.get_logged_model(models[0].model_id)
    linked = {m.key: m.value for m in model.metrics}
    assert linked["eval/rewards/accuracies"] == pytest.approx(first["eval"]["rewards/accuracies"])
    assert all(k.startswith("eval/") for k in linked) and model.params["train.beta"] == "0.1"
    assert [o.model_id for o in run1.outputs.model_outputs] == [model.model_id]
    assert client.get_model_version(NAME, "1").source == f"models:/{model.model_id}"
    assert [(v["name"], str(v["version"])) for v in json.loads(model.tags["mlflow.modelVersions"])] == [(NAME, "1")]
    assert run1.info.run_name.startswith("tiny-llama-data") and "-sigmoid-b0.1-lr0.003" in run1.info.run_name
    # the same facts through the REST API
    alias = rest(mlflow_server, "GET", f"/api/2.0/mlflow/registered-models/alias?name={NAME}&alias=champion")
    assert alias["model_version"]["version"] == "1" and alias["model_version"]["run_id"] == first["mlflow_run_id"]
    found = rest(mlflow_server, "POST", "/api/2.0/mlflow/runs/search", {"experiment_ids": [run1.info.experiment_id]})
    metrics = {m["key"]: m["value"] for m in found["runs"][0]["data"]["metrics"]}
    assert metrics["eval/rewards/accuracies"] == pytest.approx(first["eval"]["rewards/accuracies"]) and "train/loss" in metrics

    # the registered champion loads as MLflow transformers model, and from_pretrained on its download
    with register.tracking_uri(mlflow_server.uri):  # as a user loads it: tracking URI set, then a models:/ URI
        pipe = mlflow.transformers.load_model(f"models:/{NAME}@champion")
    assert isinstance(pipe, TextGenerationPipeline) and pipe.tokenizer.chat_template
    path, version = register.download(mlflow_server.uri, f"models:/{NAME}@champion", tmp_path / "dl")
    assert version == "1"
    AutoModelForCausalLM.from_pretrained(path)
    assert AutoTokenizer.from_pretrained(path).chat_template == pipe.tokenizer.chat_template

    # new data arrives; the scheduler retrains from the champion
    (data / "day2.jsonl").write_text("".join(lines[120:]))
    # the gate decides on a pairwise judge's win rate here: the champion's replies are generated, and the judge compares
    # them with the challenger's on each prompt in both orders; it promotes only when the 95% interval lies above 0.5
    retrain_sets = base + [f"model.policy=models:/{NAME}@champion", "output_dir=" + str(tmp_path / "retrain"), "registry.metric=win_rate",
                           "eval.generate.prompts=8", "eval.generate.max_new_tokens=12", "eval.judge.function=null",
                           "eval.judge.pairwise_function=tests.judges_for_tests:pairwise_words_prefers_a"]
    second = run(load_config("configs/demo.yaml", retrain_sets), retrain=True)
    reg = second["registry"]
    assert reg["challenger_version"] == "2" and reg["champion_version"] == "1" and reg["metric"] == "win_rate"
    assert reg["challenger_score"] == second["eval"]["win_rate"]
    assert reg["champion_score"] == 0.5  # the champion is this run's reference: its replies are the reference's, all ties
    # so the head-to-head is the challenger against the reference again: the same verdicts, the same interval
    assert reg["comparison_difference"] == pytest.approx(second["eval"]["win_rate"]) and reg["comparison_items"] == 8
    assert (reg["comparison_ci_low"], reg["comparison_ci_high"]) == (second["eval"]["win_rate_ci_low"], second["eval"]["win_rate_ci_high"])
    want = "promoted" if reg["comparison_ci_low"] > 0.5 else "kept_champion"
    assert reg["decision"] == want and client.get_model_version_by_alias(NAME, "champion").version == ("2" if want == "promoted" else "1")
    assert f"win rate over champion v1 {reg['comparison_difference']:.3f}, 95% interval [" in reg["reason"] and "from 8 prompts" in reg["reason"]
    assert client.get_model_version_by_alias(NAME, "challenger").version == "2"
    assert second["data"]["rows_read"] == 240 and second["reference_model_dir"].endswith(f"{NAME}-v1")
    run2 = client.get_run(second["mlflow_run_id"])
    assert run2.info.run_name.startswith(f"{NAME}@champion-data")
    assert run2.data.metrics["registry/champion_score"] == 0.5 and run2.data.tags["registry.decision"] == want
    assert run2.data.metrics["registry/comparison_ci_low"] == reg["comparison_ci_low"] and run2.data.tags["registry.reason"] == reg["reason"]
    assert "eval/judge/position_disagreement" in run2.data.metrics

    # the same inputs again (the starting model now being the champion that retrain produced): nothing to do
    scored = sorted((cache_dir / "reference").iterdir())
    third = run(load_config("configs/demo.yaml", retrain_sets), retrain=True)
    assert sorted((cache_dir / "reference").iterdir()) == scored  # not even the new champion's reference pass
    assert third["skipped"] and len(client.search_model_versions(f"name='{NAME}'")) == 2

    # an overlapping invocation is refused and changes nothing
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from pipeline.artifacts import exclusive\n"
        f"with exclusive(Path({str(tmp_path / 'retrain')!r})):\n    print('held', flush=True); time.sleep(120)")],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=r"in use by another dpo-ray run \(pid \d+ since"):
            run(load_config("configs/demo.yaml", retrain_sets), retrain=True)
    finally:
        holder.kill()
        holder.wait()
    assert len(client.search_model_versions(f"name='{NAME}'")) == 2


def test_champion_serves_chat(first_run, mlflow_server, tmp_path):
    """`mlflow models serve -m models:/NAME@champion` on 127.0.0.1 answers an OpenAI-style chat request with the
    champion's greedy reply, the one `mlflow.pyfunc.load_model` gives in process (the random tiny model's reply may
    be blank: MLflow strips whitespace)."""
    import mlflow

    from pipeline import register

    port, t0 = free_port(), time.time()
    log, bin_dir = tmp_path / "serve.log", str(Path(sys.executable).parent)  # serve runs `uvicorn` from PATH: the venv's
    proc = subprocess.Popen([str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion",
                             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.uri, "PATH": bin_dir + os.pathsep + os.environ["PATH"]},
                            stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                with urllib.request.urlopen(url + "/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.time() - t0 < 120, "mlflow models serve did not answer /ping in 120 s"
                time.sleep(0.5)
        started = time.time() - t0
        # top_k 1: greedy (the text-generation pipeline samples by default, at temperature 0.7)
        body = {"messages": [{"role": "user", "content": "What colour is the sky?"}], "max_tokens": 8, "top_k": 1}
        req = urllib.request.Request(url + "/invocations", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            reply = json.loads(r.read())
        print(f"serve: /ping after {started:.1f} s, reply after {time.time() - t0:.1f} s: {reply}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)  # mlflow and its uvicorn worker
        proc.wait(timeout=30)
    assert isinstance(reply, list) and len(reply) == 1  # one chat.completion per request
    reply, choice = reply[0], reply[0]["choices"][0]
    assert reply["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
    assert 1 <= reply["usage"]["completion_tokens"] <= 8 and reply["usage"]["prompt_tokens"] > 8  # the chat template applied
    with register.tracking_uri(mlflow_server.uri):
        local = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(body)
    assert local[0]["choices"][0]["message"]["content"] == choice["message"]["content"]


def test_version_registered_before_mlflow_models(mlflow_server, demo_model, tmp_path):
    """A version registered the old way (the HF folder as run artifact `model`, that folder its source) still
    downloads to a directory that transformers loads, weights unchanged."""
    import torch
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM

    from dpo_ray.model import load_tokenizer
    from dpo_ray.tracking import ensure_experiment
    from pipeline import register

    client, name = MlflowClient(mlflow_server.uri), "dpo-old-layout"
    run_id = client.create_run(ensure_experiment(mlflow_server.uri, "old-layout")).info.run_id
    client.log_artifacts(run_id, demo_model, "model")
    client.create_registered_model(name)
    mv = client.create_model_version(name, source=client.get_run(run_id).info.artifact_uri + "/model", run_id=run_id)
    client.set_registered_model_alias(name, "champion", mv.version)
    path, version = register.download(mlflow_server.uri, f"models:/{name}@champion", tmp_path)
    assert version == "1" and path == str(register.registry_dir(tmp_path, name, "1"))
    got, want = AutoModelForCausalLM.from_pretrained(path), AutoModelForCausalLM.from_pretrained(demo_model)
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), want.state_dict().values()))
    assert load_tokenizer(path).chat_template == load_tokenizer(demo_model).chat_template
