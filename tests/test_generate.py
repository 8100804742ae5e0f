"""Generations beside the reference's and the judge's win rate (pipeline/generate.py, dpo_ray/generation.py,
dpo_ray/judges.py): real models, real Ray Data actor pools, win rates recomputed here from the table."""
import json
import logging
import math

import pandas as pd
import pytest
import torch

from conftest import small_config
from dpo_ray.config import load_config

pytestmark = pytest.mark.slow
PROMPTS = 16  # prompts of the generation runs here; 16 new tokens each


def demo_prompts(tok, n=12):
    from dpo_ray.demo import generate_pairs

    return [tok.apply_chat_template(p["chosen"][:-1], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
            for p in generate_pairs(n, seed=7)]


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(demo_model, demo_tokenizer):
    from dpo_ray.generation import Settings, cut_at_stop, generate, stop_token_ids
    from dpo_ray.model import load_model

    model = load_model(demo_model).eval()
    tok = demo_tokenizer
    prompts = demo_prompts(tok)
    assert len({len(p) for p in prompts}) > 3  # padding really happens
    stops = stop_token_ids(tok, model)
    assert tok.eos_token_id in stops and tok.convert_tokens_to_ids("<|im_end|>") in stops
    greedy = Settings(max_new_tokens=24)
    batched = generate(model, prompts, tok.pad_token_id, stops, greedy)
    for p, got in zip(prompts, batched):  # plain HF generate, one prompt, no padding at all
        with torch.inference_mode():
            alone = model.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id)
        assert got == cut_at_stop(alone[0, len(p):].tolist(), stops)
    sampled = Settings(max_new_tokens=24, do_sample=True, temperature=1.0, seed=3)
    first, again = (generate(model, prompts, tok.pad_token_id, stops, sampled, batch_index=1) for _ in range(2))
    assert first == again  # the same seed, the same replies
    assert first != generate(model, prompts, tok.pad_token_id, stops, sampled.__class__(**{**sampled.__dict__, "seed": 4}), 1)
    assert first != batched


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ray_local, cache_dir, small_pairs, demo_model):
    """The small data prepared and scored, a 'policy' that differs from the reference (the demo model, its weights
    moved by seeded noise), the generation settings of these tests."""
    from dpo_ray.model import load_model
    from pipeline import prepare, reference
    from pipeline.context import Context

    tmp = tmp_path_factory.mktemp("generate")
    sets = small_config(tmp, tmp / "cache", small_pairs, **{"eval.generate.prompts": str(PROMPTS), "eval.generate.max_new_tokens": "16",
                                                         "eval.generate.batch_size": "6", "data.eval_fraction": "0.2"})
    cfg = load_config(None, sets)
    ctx = Context.for_models(cfg, demo_model, rejects_file=tmp / "rejects.jsonl")
    ref = reference.score_reference(cfg, ctx, prepare.prepare_pairs(cfg, ctx))
    policy = load_model(demo_model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * p.std() * torch.randn(p.shape, generator=g))
    policy.save_pretrained(tmp / "policy")
    return tmp, sets, ref, str(tmp / "policy")


def run_generate(setup, demo_model, *extra):
    from pipeline import generate
    from pipeline.context import Context

    tmp, sets, ref, policy = setup
    cfg = load_config(None, sets + list(extra))
    return generate.generate_and_judge(cfg, Context.for_models(cfg, demo_model), ref, policy)


@pytest.fixture(scope="module")
def judged(setup, demo_model, demo_tokenizer):
    """One generation run with a function judge, its log, and its table with each row's prompt messages again."""
    from pipeline.generate import select_prompts

    handler, logger = _Capture(), logging.getLogger("dpo_ray")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        metrics, table = run_generate(setup, demo_model, "eval.judge.function=tests.judges_for_tests:words")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    prompts = {p["row_id"]: p["prompt_json"] for p in select_prompts(setup[2], PROMPTS, demo_tokenizer)}
    return metrics, table.assign(prompt_json=[prompts[i] for i in table.row_id]), "\n".join(handler.lines)


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def by_hand(pol, ref) -> float:
    return sum(1.0 if a > b else 0.0 if a < b else 0.5 for a, b in zip(pol, ref)) / len(pol)


def test_function_judge_win_rate_and_the_cached_reference(setup, judged, demo_model, caplog):
    from dpo_ray import stats
    from dpo_ray.generation import Generator
    from tests.judges_for_tests import words

    metrics, table, log_text = judged
    assert len(table) == PROMPTS and list(table.row_id) == sorted(table.row_id)
    assert "generate: reference: 16 prompts" in log_text and metrics["eval/generation/reference_cache_hit"] == 0
    assert (table.policy != table.reference).any()  # two different models
    assert metrics["eval/generation/length_policy"] == pytest.approx(table.policy_tokens.mean())
    assert metrics["eval/generation/tokens_per_second"] > 0
    # the win rate by hand: the function applied here to each (prompt, reply) of the table
    pol = [words(p, r) for p, r in zip(table.prompt, table.policy)]
    ref = [words(p, r) for p, r in zip(table.prompt, table.reference)]
    assert list(table.judge_policy) == pytest.approx(pol) and list(table.judge_reference) == pytest.approx(ref)
    assert metrics["eval/win_rate"] == pytest.approx(by_hand(pol, ref))
    verdicts = [1.0 if a > b else 0.0 if a < b else 0.5 for a, b in zip(pol, ref)]  # its interval and p from the verdicts by hand
    assert (metrics["eval/win_rate_ci_low"], metrics["eval/win_rate_ci_high"]) == stats.bootstrap_interval(verdicts)
    assert metrics["eval/win_rate_p"] == stats.sign_test(verdicts) and metrics["eval/win_rate_ci_low"] <= metrics["eval/win_rate"]
    assert metrics["eval/judge/policy_mean"] == pytest.approx(sum(pol) / len(pol))
    assert set(table.verdict) <= {"policy", "reference", "tie"} and (table.judge_error == "").all()

    caplog.set_level(logging.INFO, logger="dpo_ray")  # a second run over the same prompts: the reference's replies come from the cache
    again, table2 = run_generate(setup, demo_model, "eval.judge.function=tests.judges_for_tests:words")
    assert "generate: reference: cache hit" in caplog.text and "generate: reference: 16 prompts" not in caplog.text
    assert again["eval/generation/reference_cache_hit"] == 1
    assert list(table2.reference) == list(table.reference) and list(table2.policy) == list(table.policy)
    assert again["eval/win_rate"] == metrics["eval/win_rate"]

    # sampled: the table the Ray actors wrote equals the same batches generated here, in this process
    _, sampled = run_generate(setup, demo_model, "eval.generate.do_sample=true", "eval.generate.seed=5")
    assert list(sampled.policy) != list(table.policy)
    settings = dict(max_new_tokens=16, do_sample=True, temperature=1.0, top_p=1.0, seed=5)
    here = Generator(setup[3], demo_model, "", settings)
    prompts = {p["row_id"]: p["prompt_ids"] for p in __import__("pipeline.generate", fromlist=["x"]).select_prompts(setup[2], PROMPTS, here.tokenizer)}
    ids = list(sampled.row_id)
    batches = {"row_ids": [ids[i:i + 6] for i in range(0, PROMPTS, 6)], "prompt_ids": [[prompts[r] for r in ids[i:i + 6]] for i in range(0, PROMPTS, 6)],
               "batch_index": list(range(len(range(0, PROMPTS, 6))))}
    assert here(batches)["reply"] == list(sampled.policy)


def test_reward_model_judge_win_rate_by_hand(setup, judged, demo_tokenizer):
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    from dpo_ray.judges import messages
    from pipeline import generate

    tmp, sets, ref, policy = setup
    _, table, _ = judged
    config = LlamaConfig(vocab_size=len(demo_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, num_labels=1, pad_token_id=demo_tokenizer.pad_token_id)
    torch.manual_seed(1)
    rm = AutoModelForSequenceClassification.from_config(config).eval()
    rm.save_pretrained(tmp / "rm")
    demo_tokenizer.save_pretrained(tmp / "rm")
    scored = generate.head_to_head(load_config(None, sets + [f"eval.judge.reward_model={tmp / 'rm'}"]), table, use_gpu=False)

    def score(prompt_json, reply):  # one conversation at a time, no padding
        text = demo_tokenizer.apply_chat_template(messages(prompt_json) + [{"role": "assistant", "content": reply}], tokenize=False)
        with torch.inference_mode():
            return rm(**demo_tokenizer(text, add_special_tokens=False, return_tensors="pt")).logits[0, 0].item()

    pol = [score(p, r) for p, r in zip(table.prompt_json, table.policy)]
    refs = [score(p, r) for p, r in zip(table.prompt_json, table.reference)]
    assert list(scored.judge_policy) == pytest.approx(pol, abs=1e-4) and list(scored.judge_reference) == pytest.approx(refs, abs=1e-4)
    assert len(set(pol + refs)) > PROMPTS  # real scores, not a constant
    assert list(scored.verdict) == ["policy" if a > b else "reference" if a < b else "tie" for a, b in zip(pol, refs)]


def test_a_judge_that_raises(setup, judged, demo_model):
    from dpo_ray.judges import JudgeError
    from pipeline import generate

    tmp, sets, ref, policy = setup
    _, table, _ = judged
    cfg = lambda *extra: load_config(None, sets + list(extra))  # noqa: E731
    scored = generate.head_to_head(cfg("eval.judge.function=tests.judges_for_tests:fails_on_planets", "data.max_bad_fraction=0.9"), table, False)
    failed = scored.judge_error != ""
    planets = scored.prompt.str.contains("Mercury|Venus|Mars|Jupiter|Saturn|Neptune")
    assert failed.any() and list(failed) == list(planets)  # exactly the rows it raised on are marked
    assert scored.judge_error[failed].str.contains(r"ValueError: no planets here \(judges_for_tests.py:\d+ in fails_on_planets\)").all()
    assert all(math.isnan(x) for x in scored.judge_policy[failed]) and set(scored.verdict[failed]) == {""}
    assert (scored.judge_policy[~failed] == table.judge_policy[~failed]).all()
    with pytest.raises(JudgeError) as e:  # over the limit (the default 1% of the prompts): the stage stops
        generate.head_to_head(cfg("eval.judge.function=tests.judges_for_tests:fails_on_planets"), table, False)
    assert f"failed on {failed.sum()} of 16 prompts" in str(e.value) and "data.max_bad_fraction=0.01" in str(e.value)
    with pytest.raises(JudgeError, match=r"failed on 16 of 16 prompts.*the first: row .*: KeyError: .*judges_for_tests.py:\d+ in always_fails"):
        generate.head_to_head(cfg("eval.judge.function=tests.judges_for_tests:always_fails"), table, False)
    with pytest.raises(JudgeError, match="cannot import module 'no_such_module'"):  # before any model work
        run_generate(setup, demo_model, "eval.judge.function=no_such_module:score")
    assert json.loads(table.drop(columns=["prompt_json"]).to_json(orient="records"))  # what MLflow's log_table writes


def test_pairwise_function_judge_in_both_orders_cancels_its_position_bias(setup, judged):
    from pipeline import generate
    from tests.judges_for_tests import pairwise_words_prefers_a, words

    tmp, sets, ref, policy = setup
    _, table, _ = judged
    cfg = load_config(None, sets + ["eval.judge.pairwise_function=tests.judges_for_tests:pairwise_words_prefers_a"])
    scored = generate.head_to_head(cfg, table, use_gpu=False)
    first = [pairwise_words_prefers_a(p, a, b) for p, a, b in zip(table.prompt, table.policy, table.reference)]
    second = [1 - pairwise_words_prefers_a(p, b, a) for p, a, b in zip(table.prompt, table.policy, table.reference)]
    assert list(scored.judge_policy_first) == pytest.approx(first) and list(scored.judge_policy_second) == pytest.approx(second)
    assert list(scored.win) == pytest.approx([(a + b) / 2 for a, b in zip(first, second)])
    # the verdicts by hand: the pull to A cancels, the words() preference is what is left (0.5 on ties)
    want = [0.7 if words(p, a) > words(p, b) else 0.3 if words(p, a) < words(p, b) else 0.5 for p, a, b in zip(table.prompt, table.policy, table.reference)]
    assert list(scored.win) == pytest.approx(want)
    m = generate.win_metrics(scored)
    assert m["win_rate"] == pytest.approx(sum(want) / len(want)) and m["win_rate_ci_low"] <= m["win_rate"] <= m["win_rate_ci_high"]
    assert m["judge/policy_first_rate"] > m["judge/policy_second_rate"]  # the position pull, logged per order
    # identical replies: 0.5 on every prompt after the two orders are averaged, though every single call said A
    same = generate.head_to_head(cfg, table.assign(reference=table.policy), use_gpu=False)
    assert list(same.win) == [0.5] * len(table) and set(same.verdict) == {"tie"}
    assert list(same.judge_policy_first) == pytest.approx([0.7] * len(table)) and list(same.judge_policy_second) == pytest.approx([0.3] * len(table))
    assert generate.win_metrics(same)["judge/position_disagreement"] == 1.0
    # iterate's use: a round robin among each prompt's replies (here three: policy, reference, the data's chosen) in both
    # orders; a reply's score is its mean win probability over the other two
    rows = pd.DataFrame([{"prompt_id": r.row_id, "prompt_json": r.prompt_json, "reply": getattr(r, who), "prompt": r.prompt}
                         for r in table.itertuples() for who in ("policy", "reference", "chosen")])
    got = generate.tournament_scores(cfg, rows, use_gpu=False)
    p = lambda q, a, b: (pairwise_words_prefers_a(q, a, b) + 1 - pairwise_words_prefers_a(q, b, a)) / 2  # noqa: E731
    want = [sum(p(r.prompt, r.reply, o.reply) for o in rows[rows.prompt_id == r.prompt_id].itertuples() if o.Index != r.Index) / 2
            for r in rows.itertuples()]
    assert list(got.score) == pytest.approx(want) and list(got.reply) == list(rows.reply) and (got.error == "").all()


def biased_chat_judge(path, tokenizer, label_a: int):
    """A tiny Llama chat model built offline that leans to label A by construction: residual dimension 0 holds a
    constant no layer writes to, and label A's output row reads it; the rest of the weights are random, so the
    verdict still depends on the text."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(3)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 20.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[label_a, 0] = 0.2
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def test_pairwise_model_judge_reads_the_label_probabilities_of_a_hand_forward(setup, judged, demo_tokenizer):
    from dpo_ray.judges import conversation, label_ids
    from pipeline import generate

    tmp, sets, ref, policy = setup
    _, table, _ = judged
    a_id, b_id = label_ids(demo_tokenizer, ("A", "B"))
    model = biased_chat_judge(tmp / "pairwise", demo_tokenizer, a_id)
    cfg = load_config(None, sets + [f"eval.judge.pairwise_model={tmp / 'pairwise'}", "eval.judge.batch_size=5"])
    scored = generate.head_to_head(cfg, table, use_gpu=False)

    def p_a(prompt_json, a, b):  # one text, no padding, the softmax over the two labels
        text = cfg.eval.judge.pairwise_prompt.format(prompt=conversation(prompt_json), a=a, b=b)
        ids = demo_tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        with torch.inference_mode():
            logits = model(torch.tensor([list(ids)])).logits[0, -1].double()
        return torch.softmax(logits[[a_id, b_id]], 0)[0].item()

    first = [p_a(p, x, y) for p, x, y in zip(table.prompt_json, table.policy, table.reference)]
    second = [1 - p_a(p, y, x) for p, x, y in zip(table.prompt_json, table.policy, table.reference)]
    assert list(scored.judge_policy_first) == pytest.approx(first, abs=1e-5) and list(scored.judge_policy_second) == pytest.approx(second, abs=1e-5)
    assert len({round(x, 6) for x in first}) > 1  # it reads the texts, not a constant
    assert min(first) > 0.5 > max(second)  # the built-in pull to A: every single call says A
    same = generate.head_to_head(cfg, table.assign(reference=table.policy), use_gpu=False)
    assert list(same.win) == pytest.approx([0.5] * len(table), abs=1e-6)  # averaged over both orders: no gain from position
