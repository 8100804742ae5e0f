"""`dpo-ray iterate`: the pairing (pure, hand-computed tables), the prompts, then one real 2-round iteration.

The end-to-end part runs the driver once on a real local Ray runtime, a real MLflow sqlite store and the demo model
(random weights; a function judge from tests/judges_for_tests.py), interrupted right after round 1's training and run
again with the same config, and asserts on that one run: the resume (nothing generated or trained twice), round 2
trained from round 1's weights with the reference the config names, the pairs and their provenance, the parent and
child MLflow runs with the round metrics; and that the same seed gives the same samples and pairs again.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from dpo_ray.pairing import build_pairs

NAN = float("nan")


def samples(table: dict[str, list]) -> list[dict]:
    """{prompt_id: [score of sample 0, 1, ...]} -> sample dicts (reply text "p<id>-s<k>")."""
    return [{"prompt_id": pid, "sample": k, "reply": f"{pid}-s{k}", "score": s} for pid, scores in table.items() for k, s in enumerate(scores)]


# ---- pairing: pure, no Ray

def test_best_worst_pairs_by_hand():
    made = build_pairs(samples({
        "a": [0.2, 0.9, 0.5, 0.9],   # best: sample 1 (the first of the two 0.9s), worst: sample 0
        "b": [0.5, 0.5, 0.5, 0.5],   # every reply ties: dropped, counted
        "c": [NAN, 0.3, 0.7, 0.3],   # sample 0 unscored (the judge failed): left out; best 2, worst 1
        "d": [NAN, 0.4, NAN, NAN],   # one scored reply: too few
    }), "best_worst", 0.0, round_no=3)
    assert made.pairs == [
        {"round": 3, "prompt_id": "a", "chosen": "a-s1", "rejected": "a-s0", "chosen_score": 0.9, "rejected_score": 0.2,
         "chosen_sample": 1, "rejected_sample": 0, "margin": pytest.approx(0.7)},
        {"round": 3, "prompt_id": "c", "chosen": "c-s2", "rejected": "c-s1", "chosen_score": 0.7, "rejected_score": 0.3,
         "chosen_sample": 2, "rejected_sample": 1, "margin": pytest.approx(0.4)},
    ]
    assert made.counts() == {"pairs": 2, "prompts": 4, "prompts_paired": 2, "ties_dropped": 1, "below_margin": 0,
                             "too_few_replies": 1, "unscored_replies": 4}


def test_all_pairs_above_the_margin_by_hand():
    table = samples({"a": [1.0, 0.5, 0.75], "b": [0.6, 0.5]})
    every = build_pairs(table, "all", 0.0, round_no=1)
    assert [(p["prompt_id"], p["chosen_sample"], p["rejected_sample"]) for p in every.pairs] == [("a", 0, 1), ("a", 0, 2), ("a", 2, 1), ("b", 0, 1)]
    wide = build_pairs(table, "all", 0.25, round_no=1)  # only a's 1.0 over 0.5 differs by more than 0.25
    assert [(p["prompt_id"], p["chosen_sample"], p["rejected_sample"]) for p in wide.pairs] == [("a", 0, 1)]
    assert wide.counts()["below_margin"] == 1 and wide.counts()["ties_dropped"] == 0
    narrow = build_pairs(table, "best_worst", 0.25)
    assert len(narrow.pairs) == 1 and narrow.below_margin == 1


def test_pairing_refuses_unknown_modes_and_skips_empty_replies():
    with pytest.raises(ValueError, match="best_worst, all"):
        build_pairs([], "tournament")
    made = build_pairs([{"prompt_id": "a", "sample": 0, "reply": "  ", "score": 1.0},
                        {"prompt_id": "a", "sample": 1, "reply": "x", "score": 0.0},
                        {"prompt_id": "a", "sample": 2, "reply": "y", "score": 0.5}])
    assert [(p["chosen"], p["rejected"]) for p in made.pairs] == [("y", "x")] and made.unscored == 1


def test_prompts_of_every_layout(demo_tokenizer):
    from dpo_ray.config import Config
    from pipeline.iterate import prompt_ids, prompt_of

    cfg = Config()
    msgs = [{"role": "user", "content": "Tell me about the fox."}]
    assert prompt_of({"prompt": "Tell me about the fox."}, cfg) == msgs
    assert prompt_of({"prompt": msgs}, cfg) == msgs
    assert prompt_of({"prompt": "q", "chosen": "a", "rejected": "b"}, cfg) == [{"role": "user", "content": "q"}]
    assert prompt_of({"chosen": msgs + [{"role": "assistant", "content": "a"}], "rejected": msgs + [{"role": "assistant", "content": "b"}]}, cfg) == msgs
    assert prompt_of({"prompt": ""}, cfg) is None and prompt_of({"text": "x"}, cfg) is None
    text = demo_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)  # as prepare renders a prompt
    assert prompt_ids(demo_tokenizer, json.dumps(msgs), cfg) == demo_tokenizer(text, add_special_tokens=False)["input_ids"]
    short = cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_prompt_length": 3})})
    assert prompt_ids(demo_tokenizer, json.dumps(msgs), short) == demo_tokenizer(text, add_special_tokens=False)["input_ids"][-3:]


def test_rounds_take_other_prompts_and_offline_pairs_are_drawn_per_round(small_pairs):
    from dpo_ray.config import Config
    from dpo_ray.data import to_pair
    from pipeline.artifacts import fingerprint
    from pipeline.iterate import offline_pairs, round_prompts

    cfg = Config.model_validate({"data": {"train": [str(small_pairs)]}, "iterate": {"max_prompts": 4, "seed": 1}})
    train = [{"prompt_id": str(i)} for i in range(10)]
    r1, r2, r3 = (round_prompts(cfg, train, r) for r in (1, 2, 3))
    assert len(r1) == len(r2) == 4 and not {p["prompt_id"] for p in r1} & {p["prompt_id"] for p in r2}
    assert len({p["prompt_id"] for p in r1 + r2 + r3}) == 10  # round 3 wraps around: every prompt seen
    assert round_prompts(cfg.model_copy(update={"iterate": cfg.iterate.model_copy(update={"max_prompts": None})}), train, 2) == train
    a, again, other = offline_pairs(cfg, 5, 1, set()), offline_pairs(cfg, 5, 1, set()), offline_pairs(cfg, 5, 2, set())
    assert len(a) == 5 and a == again and a != other  # drawn by (seed, round)
    assert all(to_pair(x).layout == "conversational_implicit" for x in a)  # a layout prepare reads
    held = {fingerprint("prompt", json.dumps(x["chosen"][:-1], ensure_ascii=False)) for x in a}  # their prompts' ids
    assert not [x for x in offline_pairs(cfg, 5, 1, held) if x in a]  # pairs of held-out prompts are never drawn


def test_no_prompts_is_one_line(tmp_path, cache_dir, demo_model):
    from dpo_ray.config import load_config
    from pipeline.iterate import IterateError, iterate

    empty = tmp_path / "prompts.jsonl"
    empty.write_text('{"prompt": ""}\n{"other": 1}\n')
    cfg = load_config("configs/iterate-demo.yaml", [f"output_dir={tmp_path / 'out'}", f"cache_dir={cache_dir}", "model.policy=demo:tiny-llama",
                                                    f"iterate.prompts={json.dumps([str(empty)])}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}"])
    with pytest.raises(IterateError, match=r"iterate: no prompts in .*prompts.jsonl \(2 records, 2 without a usable prompt"):
        iterate(cfg)


# ---- one real iteration: 2 rounds, interrupted after round 1's training and continued

def iterate_sets(tmp: Path, cache: Path, data: Path, **extra) -> list[str]:
    from conftest import small_config

    return small_config(tmp, cache, data, **{
        "data.max_length": "64", "train.max_steps": "2", "train.checkpoint_every": "2", "mlflow.system_metrics": "false",
        "eval.judge.function": "tests.judges_for_tests:words", "eval.generate.max_new_tokens": "10", "eval.generate.do_sample": "false",
        "iterate.rounds": "2", "iterate.samples_per_prompt": "2", "iterate.max_prompts": "8", "iterate.max_new_tokens": "10",
        "iterate.eval_prompts": "4", "iterate.reference": "initial", **extra})


class Interrupt(KeyboardInterrupt):
    pass


@pytest.fixture(scope="module")
def iteration(tmp_path_factory, cache_dir, small_pairs, demo_model, ray_local):
    from dpo_ray.config import load_config
    from pipeline.iterate import iterate

    tmp = tmp_path_factory.mktemp("iterate")
    # with registry.name: the output model goes through the champion/challenger gate like any run's
    cfg = load_config("configs/iterate-demo.yaml", iterate_sets(tmp, cache_dir, small_pairs, **{"registry.name": "iterate-test",
                                                                                              "iterate.keep_optimizer": "true"}))
    seen = []

    def stop_after_round_1_training(r, phase):
        seen.append((r, phase))
        if (r, phase) == (1, "train"):
            raise Interrupt("as Ctrl+C right after round 1's training")

    with pytest.raises(Interrupt):
        iterate(cfg, on_phase=stop_after_round_1_training)
    r1 = tmp / "out" / "rounds" / "round-1"
    before = {f.name: f.stat().st_mtime_ns for f in r1.iterdir() if f.is_file()}
    after_interrupt = list(seen)
    summary = iterate(cfg, on_phase=lambda r, phase: seen.append((r, phase)))
    return {"cfg": cfg, "tmp": tmp, "out": tmp / "out", "summary": summary, "before": before, "phases": seen,
            "after_interrupt": after_interrupt, "demo_model": demo_model}


@pytest.mark.slow
def test_rerun_continues_at_round_1_evaluation(iteration):
    assert iteration["after_interrupt"] == [(1, "generate"), (1, "judge"), (1, "pairs"), (1, "train")]
    # the rerun's first phase is round 1's evaluation; then round 2 in full
    assert iteration["phases"][4:] == [(1, "evaluate")] + [(2, p) for p in ("generate", "judge", "pairs", "train", "evaluate")]
    r1 = iteration["out"] / "rounds" / "round-1"
    for name in ("samples.parquet", "scored.parquet", "pairs.jsonl", "generate.json", "judge.json", "pairs.json", "train.json"):
        assert (r1 / name).stat().st_mtime_ns == iteration["before"][name], f"{name} was written again"
    assert "evaluate.json" not in iteration["before"] and (r1 / "evaluate.json").exists()


@pytest.mark.slow
def test_round_2_trains_from_round_1_with_the_initial_reference(iteration):
    from dpo_ray.model import fingerprint_model

    rounds = iteration["out"] / "rounds"
    t1, t2 = (json.loads((rounds / f"round-{r}" / "train.json").read_text()) for r in (1, 2))
    assert t1["policy_start"] == iteration["demo_model"] and t1["policy_start_checksum"] == fingerprint_model(iteration["demo_model"])
    assert t2["policy_start"] == t1["model_dir"] and t2["policy_start_checksum"] == t1["model_checksum"]
    assert t2["policy_start_checksum"] == fingerprint_model(t1["model_dir"])  # the weights on disk are still round 1's
    assert t2["model_checksum"] != t1["model_checksum"] != t1["policy_start_checksum"]  # each round trained
    assert t1["reference"] == t2["reference"] == iteration["demo_model"]  # iterate.reference: initial
    assert t2["reference_checksum"] == fingerprint_model(iteration["demo_model"])
    assert t1["train"]["steps"] == t2["train"]["steps"] == 2
    # iterate.keep_optimizer: round 2 started with round 1's AdamW state, so its step counts run on from 2 to 4
    adam_steps = lambda t: {float(v["step"]) for v in torch.load(Path(t["train"]["checkpoint"]) / "optimizer.pt", weights_only=True)["state"].values()}  # noqa: E731
    assert adam_steps(t1) == {2.0} and adam_steps(t2) == {4.0}
    s = iteration["summary"]
    assert Path(s["model_dir"]).is_dir() and s["selected_round"] == 2
    assert fingerprint_model(s["model_dir"]) == t2["model_checksum"]
    assert s["registry"]["decision"] == "promoted" and s["registry"]["reason"] == "no champion yet"  # the first version


@pytest.mark.slow
def test_pairs_are_best_against_worst_with_provenance(iteration):
    from dpo_ray.judges import last_user
    from tests.judges_for_tests import words

    for r in (1, 2):
        d = iteration["out"] / "rounds" / f"round-{r}"
        scored = pd.read_parquet(d / "scored.parquet")
        pairs = pd.read_parquet(d / "pairs.parquet")
        assert len(scored) == 8 * 2 and (scored.error == "").all()
        # the judge's own scores, recomputed here
        assert scored.score.tolist() == pytest.approx([words(last_user(p), x) for p, x in zip(scored.prompt_json, scored.reply)])
        again = build_pairs(scored.to_dict("records"), "best_worst", 0.0, r)
        assert pairs.drop(columns=["prompt_json"]).to_dict("records") == again.pairs and len(again.pairs) >= 1
        assert (pairs["round"] == r).all() and (pairs.chosen_score > pairs.rejected_score).all()
        lines = [json.loads(x) for x in (d / "pairs.jsonl").read_text().splitlines()]
        assert [(x["prompt_id"], x["round"], x["chosen_score"], x["rejected_score"], x["chosen"][0]["content"]) for x in lines] == \
            list(zip(pairs.prompt_id, pairs["round"], pairs.chosen_score, pairs.rejected_score, pairs.chosen))
        marker = json.loads((d / "pairs.json").read_text())
        assert marker["pairs"] == len(pairs) and marker["ties_dropped"] + marker["prompts_paired"] + marker["too_few_replies"] == 8


@pytest.mark.slow
def test_a_pairwise_judge_pairs_by_its_round_robin(iteration):
    """With eval.judge.pairwise_function a round's replies are scored by a round robin per prompt in both orders: with
    2 samples a prompt, each reply's score is its two-order win probability against the other, k(k-1) = 2 calls."""
    from dpo_ray.config import with_overrides
    from dpo_ray.judges import last_user
    from pipeline.iterate import score_samples
    from tests.judges_for_tests import pairwise_words_prefers_a

    samples = pd.read_parquet(iteration["out"] / "rounds" / "round-1" / "samples.parquet")
    cfg = with_overrides(iteration["cfg"], {"eval.judge.function": None,
                                            "eval.judge.pairwise_function": "tests.judges_for_tests:pairwise_words_prefers_a"}, "test")
    scored = score_samples(cfg, samples, use_gpu=False)
    p = lambda q, a, b: (pairwise_words_prefers_a(q, a, b) + 1 - pairwise_words_prefers_a(q, b, a)) / 2  # noqa: E731
    other = {(r.prompt_id, r.sample): r.reply for r in samples.itertuples()}
    want = [p(last_user(r.prompt_json), r.reply, other[(r.prompt_id, 1 - r.sample)]) for r in samples.itertuples()]
    assert scored.score.tolist() == pytest.approx(want) and (scored.error == "").all()
    made = build_pairs(scored.to_dict("records"), "best_worst", 0.0, 1)
    assert all(x["chosen_score"] > x["rejected_score"] and x["chosen_score"] == pytest.approx(1 - x["rejected_score"]) for x in made.pairs)


@pytest.mark.slow
def test_mlflow_parent_and_child_runs(iteration):
    from mlflow.tracking import MlflowClient

    s = iteration["summary"]
    client = MlflowClient(s["tracking_uri"])
    parent = client.get_run(s["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["dpo_ray.iterate"] == "true"
    assert parent.data.params["iterate.rounds"] == "2" and parent.data.params["iterate.pairing"] == "best_worst"
    curve = client.get_metric_history(parent.info.run_id, "round/win_rate_vs_initial")
    assert sorted(m.step for m in curve) == [1, 2] and all(0 <= m.value <= 1 for m in curve)
    for key in ("round/win_rate_vs_previous", "round/judge_mean", "round/length", "round/pairs", "round/ties_dropped",
                "round/generate_seconds", "round/judge_seconds", "round/train_seconds", "round/evaluate_seconds", "round/tokens_per_second"):
        assert key in parent.data.metrics, key
    assert parent.data.tags["registry.decision"] == "promoted" and "eval/rewards/accuracies" in parent.data.metrics
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"rounds.json", "win_rate.png", "config.yaml", "iterate_summary.json"} <= arts
    rounds = json.loads(Path(client.download_artifacts(parent.info.run_id, "rounds.json")).read_text())
    assert len(rounds["data"]) == 2
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.tags["dpo_ray.round"] for c in children) == ["1", "2"]
    for c in children:
        r = int(c.data.tags["dpo_ray.round"])
        assert c.info.status == "FINISHED"
        assert c.info.run_id == s["rounds"][r - 1]["mlflow_run_id"]
        assert c.data.params["model.policy"] == json.loads((iteration["out"] / "rounds" / f"round-{r}" / "train.json").read_text())["policy_start"]
        assert {"round/win_rate_vs_initial", "round/win_rate_vs_previous", "round/pairs", "round/judge_mean", "train/loss"} <= set(c.data.metrics)
        names = {a.path for a in client.list_artifacts(c.info.run_id)}
        assert {"generations.json", "pairs.json", "pairs.jsonl", "eval_generations.json", "curves.png"} <= names, names
    for key in ("win_rate_vs_initial", "win_rate_vs_previous", "pairs", "ties_dropped", "generate_seconds", "train_seconds"):
        assert all(math.isfinite(r[f"round/{key}"]) for r in s["rounds"]), key


@pytest.mark.slow
def test_the_same_seed_gives_the_same_samples_and_pairs(iteration, demo_tokenizer):
    """Round 1's samples again through the same actor-pool path and seed: the same replies, so the same pairs; another
    seed: other replies."""
    import torch

    from dpo_ray.generation import Settings, generate, stop_token_ids
    from dpo_ray.model import load_model
    from pipeline.iterate import generate_samples, sampling

    cfg, d = iteration["cfg"], iteration["out"] / "rounds" / "round-1"
    scored = pd.read_parquet(d / "scored.parquet")
    prompts = scored.drop_duplicates("prompt_id")
    ids = {p["prompt_id"]: p for p in ({"prompt_id": pid, "prompt_json": pj} for pid, pj in zip(prompts.prompt_id, prompts.prompt_json))}
    from pipeline.iterate import prompt_ids

    plist = [{**ids[pid], "prompt_ids": prompt_ids(demo_tokenizer, ids[pid]["prompt_json"], cfg)} for pid in prompts.prompt_id]
    again, _ = generate_samples(cfg, plist, iteration["demo_model"], iteration["demo_model"], False, 1)
    assert again.reply.tolist() == scored.reply.tolist()
    assert again.row_id.tolist() == [f"{pid}#{k}" for pid in prompts.prompt_id for k in range(2)]
    rescored = again.assign(score=scored.score.to_numpy())
    assert build_pairs(rescored.to_dict("records"), "best_worst", 0.0, 1).pairs == \
        pd.read_parquet(d / "pairs.parquet").drop(columns=["prompt_json"]).to_dict("records")
    # another seed (round 2's, or the same round with another iterate.seed) samples other replies: checked in-process
    model = load_model(iteration["demo_model"], dtype=torch.float32).eval()
    batch = [p["prompt_ids"] for p in plist for _ in range(2)]
    stop = stop_token_ids(demo_tokenizer, model)
    draw = lambda s: generate(model, batch, demo_tokenizer.pad_token_id, stop, s)  # noqa: E731
    s1 = sampling(cfg, 1)
    assert draw(s1) == draw(s1)
    assert draw(s1) != draw(Settings(**{**s1.__dict__, "seed": s1.seed + 1}))
    assert sampling(cfg, 2).seed != s1.seed


@pytest.mark.slow
def test_every_prompt_tied_stops_the_round_in_one_line(iteration, cache_dir, small_pairs):
    from dpo_ray.config import load_config
    from pipeline.iterate import IterateError, iterate

    tmp = iteration["tmp"] / "tied"
    cfg = load_config("configs/iterate-demo.yaml", iterate_sets(tmp, cache_dir, small_pairs, **{
        "eval.judge.function": "tests.judges_for_tests:constant", "iterate.rounds": "1", "iterate.max_prompts": "4"}))
    with pytest.raises(IterateError, match=r"round 1: every prompt's replies tied by the judge \(4 of 4 prompts"):
        iterate(cfg)
    assert (tmp / "out" / "rounds" / "round-1" / "judge.json").exists() and not (tmp / "out" / "rounds" / "round-1" / "pairs.json").exists()
