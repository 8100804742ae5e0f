"""Models of the size people align, on CPU with gloo: FSDP2 against DDP, DCP checkpoints resumed with another number of
workers, a killed FSDP worker, LoRA (adapters, the merged export, the demo's accuracy), the memory plan. Real Ray
Train workers (2 CPUs), real MLflow sqlite stores, real transformers models (the demo's tiny Llama, a tiny Qwen2)."""
import ast
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_qwen2, small_config
from dpo_ray.config import load_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
REL = 1e-5  # fp32 on both sides: FSDP's reduce-scatter and DDP's all-reduce sum in other orders


def test_library_never_imports_the_pipeline():
    """Imports run one way: pipeline/ (stages, driver, command line) uses dpo_ray/, never the reverse."""
    for f in sorted((ROOT / "dpo_ray").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.split(".")[0] == "pipeline"], f"dpo_ray/{f.name} imports {names}"


@pytest.fixture(scope="module")
def models(tmp_path_factory, demo_model):
    return {"llama": demo_model, "qwen2": build_qwen2(tmp_path_factory.mktemp("qwen2"), demo_model, hidden=128, layers=2)}


@pytest.fixture(scope="module")
def refs(tmp_path_factory, ray_local, cache_dir, small_pairs, models):
    """fp32, 2-worker configs with each model's reference log-probs cached."""
    from pipeline import prepare, reference
    from pipeline.context import Context

    out = {}
    for arch, path in models.items():
        tmp = tmp_path_factory.mktemp(arch)
        cfg = load_config(None, small_config(tmp, cache_dir, small_pairs, **{
            "train.bf16": "false", "train.num_workers": "2", "train.max_steps": "4", "train.checkpoint_every": "4", "model.policy": path}))
        ctx = Context.for_models(cfg, path, rejects_file=tmp / "rejects.jsonl")
        out[arch] = cfg, reference.score_reference(cfg, ctx, prepare.prepare_pairs(cfg, ctx)), path
    return out


def train(cfg, ref, model, tmp_path: Path, name: str, **sets):
    """One real training stage (TorchTrainer) with `sets` applied; returns (result, {metric: [per-step values]})."""
    from mlflow.tracking import MlflowClient

    from dpo_ray.tracking import ensure_experiment
    from pipeline.context import Context
    from pipeline.train import fit

    cfg = cfg.model_copy(deep=True)
    cfg.output_dir = str(tmp_path / name)
    for k, v in sets.items():
        setattr(cfg.train, k, v)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(ensure_experiment(uri, "big-models"), run_name=name).info.run_id
    result = fit(cfg, Context.for_models(cfg, model, uri=uri, cpus_per_worker=0.5), ref, run_id)  # 2 workers x 0.5 CPU leave 1 of the 2 for Ray Data
    assert result.error is None
    history = {k: [m.value for m in sorted(client.get_metric_history(run_id, f"train/{k}"), key=lambda m: m.step)]
               for k in ("loss", "grad_norm", "rewards/margins")}
    history["steps"] = [m.step for m in sorted(client.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)]
    return result, history


def rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm())


def whole_rel(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over all tensors of two state dicts together."""
    num = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in b)
    return (num / sum(float(b[k].double().norm() ** 2) for k in b)) ** 0.5


def final_weights(result) -> dict:
    with result.checkpoint.as_directory() as d:
        return load_file(str(Path(d) / "model.safetensors"))


@pytest.fixture(scope="module")
def llama_runs(refs, tmp_path_factory):
    """The tiny Llama's 4-step runs on 2 workers that several tests read: {strategy: (result, history)}. fsdp
    checkpoints every 2 steps (the DCP resume test starts from its step 2); the cadence changes no number."""
    cfg, ref, model = refs["llama"]
    tmp = tmp_path_factory.mktemp("llama-runs")
    return {"ddp": train(cfg, ref, model, tmp, "ddp", strategy="ddp"),
            "fsdp": train(cfg, ref, model, tmp, "fsdp", strategy="fsdp", checkpoint_every=2)}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fsdp_matches_ddp(refs, arch, tmp_path, request):
    """2 workers each, same seed and data, fp32: per-step losses, gradient norms (a gradient summed instead of averaged
    across workers would double them: Adam alone would hide it) and the final weights agree to 1e-5."""
    cfg, ref, model = refs[arch]
    if arch == "llama":
        runs = request.getfixturevalue("llama_runs")
        (ddp, h_ddp), (fsdp, h_fsdp) = runs["ddp"], runs["fsdp"]
    else:
        ddp, h_ddp = train(cfg, ref, model, tmp_path, "ddp", strategy="ddp")
        fsdp, h_fsdp = train(cfg, ref, model, tmp_path, "fsdp", strategy="fsdp")
    assert h_ddp["steps"] == h_fsdp["steps"] == [1, 2, 3, 4]
    for k in ("loss", "grad_norm", "rewards/margins"):
        for s, (a, b) in enumerate(zip(h_fsdp[k], h_ddp[k]), 1):
            assert abs(a - b) <= REL * abs(b) + 1e-7, (k, s, a, b)
    assert h_fsdp["loss"][-1] < h_fsdp["loss"][0]  # it trained
    w_ddp, w_fsdp = final_weights(ddp), final_weights(fsdp)
    assert w_ddp.keys() == w_fsdp.keys()
    assert whole_rel(w_fsdp, w_ddp) < REL / 10
    # every tensor to 1e-5, but a key bias: its gradient is zero in exact arithmetic (q.(k+b) shifts all of a query's
    # scores alike), so it is rounding noise that Adam scales to full steps (measured on Qwen2: 3.5e-5 there, 5e-7 elsewhere)
    worst = max((rel(w_fsdp[k], w_ddp[k]), k) for k in w_ddp if not k.endswith("k_proj.bias"))
    assert worst[0] < REL, worst
    start = load_file(str(Path(model) / "model.safetensors"))
    assert min(rel(w_fsdp[k], start[k]) for k in w_ddp if w_ddp[k].dim() == 2) > 1e-4  # every matrix moved


def test_compiled_layers_under_ddp_match_eager(refs, llama_runs, tmp_path):
    """train.compile through Ray Train on 2 DDP workers, fp32: the per-step losses, gradient norms and margins and the
    final weights equal the eager ddp run's; the workers compiled once (MLflow: recompiles 0 at every step)."""
    from mlflow.tracking import MlflowClient

    cfg, ref, model = refs["llama"]
    eager, h_eager = llama_runs["ddp"]
    compiled, h_compiled = train(cfg, ref, model, tmp_path, "ddp-compiled", strategy="ddp", compile=True)
    assert h_compiled["steps"] == h_eager["steps"] == [1, 2, 3, 4]
    for k in ("loss", "grad_norm", "rewards/margins"):
        for s, (a, b) in enumerate(zip(h_compiled[k], h_eager[k]), 1):
            assert abs(a - b) <= REL * abs(b) + 1e-7, (k, s, a, b)
    w_eager, w_compiled = final_weights(eager), final_weights(compiled)
    assert whole_rel(w_compiled, w_eager) < REL  # measured 3.4e-6: the compiled graph adds in another order, and AdamW
    # moves a weight by ~lr whatever its gradient's size (tests/test_compile.py)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("big-models").experiment_id], "attributes.run_name = 'ddp-compiled'")[0]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train/recompiles")] == [0.0] * 4
    assert client.get_metric_history(run.info.run_id, "train/compile_seconds")[0].value > 0


def test_fsdp_with_lora_matches_ddp_with_lora(refs, tmp_path):
    """LoRA through Ray Train on 2 workers, fp32, dropout 0: with fsdp (the adapters sharded with their layers, the
    frozen base too) and with ddp, the per-step losses, gradient norms and margins and the final adapters agree to 1e-5;
    the checkpoints hold the adapters only, and every lora_B has left zero."""
    from dpo_ray.config import LoraConfig

    cfg, ref, model = refs["llama"]
    lora = LoraConfig(r=8, alpha=16, dropout=0.0)
    ddp, h_ddp = train(cfg, ref, model, tmp_path, "ddp-lora", strategy="ddp", lora=lora)
    fsdp, h_fsdp = train(cfg, ref, model, tmp_path, "fsdp-lora", strategy="fsdp", lora=lora)
    assert h_ddp["steps"] == h_fsdp["steps"] == [1, 2, 3, 4]
    for k in ("loss", "grad_norm", "rewards/margins"):
        for s, (a, b) in enumerate(zip(h_fsdp[k], h_ddp[k]), 1):
            assert abs(a - b) <= REL * abs(b) + 1e-7, (k, s, a, b)
    adapters = []
    for result in (ddp, fsdp):
        with result.checkpoint.as_directory() as d:
            assert not (Path(d) / "model.safetensors").exists()
            adapters.append(load_file(str(Path(d) / "adapter" / "adapter_model.safetensors")))
    a_ddp, a_fsdp = adapters
    assert a_ddp.keys() == a_fsdp.keys() and len(a_ddp) == 2 * 7 * 4  # A and B of q k v o gate up down, 4 layers
    assert whole_rel(a_fsdp, a_ddp) < REL  # measured 1.4e-6 (whole), 7.2e-6 (worst tensor)
    worst = max((rel(a_fsdp[k], a_ddp[k]), k) for k in a_ddp)
    assert worst[0] < REL, worst
    assert min(float(a_fsdp[k].abs().max()) for k in a_fsdp if ".lora_B." in k) > 0


def test_dcp_resume_with_another_number_of_workers(refs, llama_runs, tmp_path):
    """A: fsdp on 2 workers, 4 steps. B resumes A's step-2 DCP checkpoint on 1 worker (2x the pairs per worker, so the
    same pairs per step); C resumes B's step-3 checkpoint on 2 workers. Every resumed step equals A's: loss and
    gradient norm (B's is a single process: A's averaged gradients equal it)."""
    cfg, ref, model = refs["llama"]
    a, h_a = llama_runs["fsdp"]
    ckpts = sorted(p for p in Path(a.path).glob("checkpoint_*") if p.is_dir())
    by_step = {json.loads((c / "state.json").read_text())["step"]: c for c in ckpts}
    assert {c.name for c in (by_step[2] / "dcp").iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp"}  # both ranks' shards
    b, h_b = train(cfg, ref, model, tmp_path, "b", strategy="fsdp", num_workers=1, batch_size_per_worker=8, checkpoint_every=1,
                   resume_from=str(by_step[2]))
    assert h_b["steps"] == [3, 4]
    b_by_step = {json.loads((c / "state.json").read_text())["step"]: c for c in Path(b.path).glob("checkpoint_*") if c.is_dir()}
    c, h_c = train(cfg, ref, model, tmp_path, "c", strategy="fsdp", num_workers=2, resume_from=str(b_by_step[3]))
    assert h_c["steps"] == [4]
    for k in ("loss", "grad_norm"):
        assert rel(h_b[k], h_a[k][2:]) < REL, (k, h_b[k], h_a[k])
        assert rel(h_c[k], h_a[k][3:]) < REL, (k, h_c[k], h_a[k])
    assert whole_rel(final_weights(c), final_weights(a)) < REL / 10


def test_resume_from_a_checkpoint_of_another_strategy_is_refused(refs, llama_runs, tmp_path):
    from pipeline.train import TrainingError

    cfg, ref, model = refs["llama"]
    a, _ = llama_runs["ddp"]
    with pytest.raises(TrainingError, match="written with train.strategy=ddp"):
        train(cfg, ref, model, tmp_path, "fsdp", strategy="fsdp", resume_from=a.checkpoint.path)


def test_killed_fsdp_worker_resumes_to_the_same_weights(refs, tmp_path):
    """A worker SIGKILLed after the first DCP checkpoint: Ray Train restarts the group from it and the run ends with
    the weights of an uninterrupted one."""
    from test_faults import kill_workers_after_first_checkpoint

    cfg, ref, model = refs["llama"]
    sets = {"strategy": "fsdp", "max_steps": 8, "checkpoint_every": 3, "max_failures": 1}
    straight, _ = train(cfg, ref, model, tmp_path, "straight", **sets)
    watcher, killed = kill_workers_after_first_checkpoint(tmp_path / "killed" / "ray_train")
    result, history = train(cfg, ref, model, tmp_path, "killed", **sets)
    watcher.join(timeout=1)
    assert killed, "no training worker was found to kill"
    assert result.metrics["step"] == 8 and history["steps"][-1] == 8
    w_straight, w_killed = final_weights(straight), final_weights(result)
    for k in w_straight:  # as the DDP test in test_faults asks
        torch.testing.assert_close(w_killed[k], w_straight[k], atol=1e-6, rtol=0)


def test_memory_plan_refuses_before_loading_anything(tmp_path, small_pairs, ray_local):
    """A GPU of 8 MB cannot hold the tiny Llama's fp32 weights and AdamW state (1.1M parameters x 12 bytes): the run
    stops before prepare, the reference model or any worker, naming the options that fit."""
    from pipeline.placement import ResourceError
    from pipeline.run import run

    cache = tmp_path / "cache"
    cfg = load_config(None, small_config(tmp_path, cache, small_pairs, **{"train.gpu_memory_gb": str(8 / 1024)}))
    with pytest.raises(ResourceError) as e:
        run(cfg, ("prepare", "reference", "train"))
    text = str(e.value)
    assert "parameters and optimizer state need 0.0 GB per GPU (ddp, 1 worker(s)), a GPU has 0.0 GB" in text, text
    assert "train.strategy=fsdp with train.num_workers>=2" in text and "train.lora" in text and "cpu_offload=true" in text, text
    assert not (cache / "prepared").exists() and not (cache / "reference").exists()
    assert not (Path(cfg.output_dir) / "ray_train").exists()


def test_lora_demo(tmp_path, cache_dir, demo_model, ray_local):
    """The demo with `train.lora.r=8`: held-out reward accuracy >= 0.75; the merged export is exactly the base plus each
    adapter's product (computed here in float64) and every other weight bit-identical to the base; the adapter loads
    with peft on the base and computes what the merged model does; both are logged to MLflow."""
    from mlflow.tracking import MlflowClient
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipeline.run import run

    sets = [f"output_dir={tmp_path / 'out'}", f"cache_dir={cache_dir}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "train.lora.r=8", "train.log_every=20", "train.max_steps=80",  # a third of the demo's epoch: the suite's minutes
            # the random-weights start at the from-scratch lr, without generations (the demo itself starts from its SFT copy)
            "model.policy=demo:tiny-llama", "train.lr=3e-3", "train.nll_weight=0", "eval.generate.prompts=0"]
    summary = run(load_config(ROOT / "configs" / "demo.yaml", sets))
    assert summary["eval"]["rewards/accuracies"] >= 0.75, summary["eval"]
    plan, gb = summary["memory_plan_gb"], 1024**3
    assert 0 < plan["trainable"] < plan["params"] / 10  # the adapters: 7% of the tiny model, far less of a real one
    from dpo_ray.forward import use_bf16

    base = 2 if use_bf16("auto", "cpu") else 4  # bf16 on this CPU: the frozen base is kept in bf16 (parallel.bf16_base)
    assert plan["per_worker"]["parameters"] == pytest.approx((4 * plan["trainable"] + base * (plan["params"] - plan["trainable"])) / gb, rel=1e-3)
    assert plan["per_worker"]["optimizer"] == pytest.approx(8 * plan["trainable"] / gb, rel=1e-3)  # AdamW on the adapters only

    out = Path(summary["output_dir"])
    base, merged = load_file(str(Path(demo_model) / "model.safetensors")), load_file(str(out / "model" / "model.safetensors"))
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    targets = {k.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight"): k for k in adapter if ".lora_A." in k}
    assert len(targets) == 7 * 4  # q k v o gate up down in each of the 4 layers ("all-linear": not the LM head)
    assert base.keys() == merged.keys()
    for key, w in base.items():
        if key in targets:
            a, b = adapter[targets[key]].double(), adapter[targets[key].replace("lora_A", "lora_B")].double()
            assert b.abs().max() > 0  # trained (B starts at zero)
            assert rel(merged[key], w.double() + scale * b @ a) < 1e-6, key
        else:
            assert torch.equal(merged[key], w), key  # embeddings, norms: untouched
    ids = torch.randint(0, 900, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        via_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_model), str(out / "adapter")).eval()(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(out / "model").eval()(ids).logits
    assert rel(plain, via_peft) < 1e-5

    client = MlflowClient(summary["tracking_uri"])
    logged = {a.path for a in client.list_artifacts(summary["mlflow_run_id"], "adapter")}
    assert "adapter/adapter_model.safetensors" in logged and "adapter/adapter_config.json" in logged
