"""Part of stage 4, evaluate: what the trained model now says, beside the reference, and a judge's win rate.

For eval.generate.prompts held-out prompts (the eval split's first by row id) the trained policy and the reference
each write a reply (dpo_ray.generation.Generator on a Ray Data actor pool, one GPU per actor when there are GPUs).
The reference's replies are cached like its log-probs: <cache_dir>/generations/<key>/replies.parquet, key = the
reference weights, the prompts' tokens and the generation settings; a second run over the same data generates only for
the policy. With eval.judge, every reply is scored (dpo_ray.judges) and eval/win_rate is the fraction of prompts where
the policy's reply scores higher (ties 0.5). Returns metrics and the eval_generations table for MLflow.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dpo_ray.generation import Generator, settings_of
from dpo_ray import stats
from dpo_ray.judges import (FunctionJudge, JudgeError, PairwiseFunctionJudge, PairwiseModelJudge, RewardModelJudge, both_orders,
                            last_user, load_function, verdict)
from dpo_ray.model import fingerprint_model, load_tokenizer

from . import console
from .artifacts import complete_dir, fingerprint
from .lease import cache_claim
from .placement import actor_resources, plan_pool
from .reference import read_split, scoring_bf16
from .storage import open_location

log = logging.getLogger("dpo_ray")
VERSION = 1  # bump when the reference replies' cache format or the generation code changes
PREVIEW_CHARS = 2000  # of each text in the table: replies are read whole up to this
REPLY_COLUMNS = ("reply", "tokens", "stopped")


def select_prompts(ref, n: int, tokenizer) -> list[dict]:
    """The first n eval rows by row id: row_id, prompt_ids (the prepared prompt tokens, the template's generation
    prompt included), prompt_json and the data's chosen reply as text. Read in batches: bounded by n, not the split."""
    ds = read_split(ref.parts, "eval", ref.drop_ids)
    if ds is None or n == 0:
        return []
    keep = None
    for batch in ds.select_columns(["row_id", "chosen_input_ids", "chosen_loss_mask", "prompt_json"]).iter_batches(batch_format="pandas", batch_size=1024):
        keep = (batch if keep is None else pd.concat([keep, batch])).sort_values("row_id", kind="stable").head(n)
    rows = []
    for r in keep.itertuples():
        mask = list(r.chosen_loss_mask)
        start = mask.index(1) if 1 in mask else len(mask)
        ids = [int(i) for i in r.chosen_input_ids]
        rows.append({"row_id": r.row_id, "prompt_ids": ids[:start], "prompt_json": r.prompt_json,
                     "chosen": tokenizer.decode(ids[start:], skip_special_tokens=True).strip()})
    return rows


def prompts_digest(prompts: list[dict]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps([p["row_id"], p["prompt_ids"]]).encode())
    return h.hexdigest()


def generate_replies(cfg, prompts: list[dict], model_path: str, tokenizer_path: str, who: str, use_gpu: bool,
                     settings=None) -> tuple[pd.DataFrame, dict]:
    """(one row per prompt: row_id, reply, tokens, stopped; {tokens, seconds, tokens_per_second}) from `model_path`.
    Batches of eval.generate.batch_size prompts, fixed here (not by Ray Data's blocks), so sampling is reproducible.
    `settings`: a dpo_ray.generation.Settings other than eval.generate's (iterate's sampling)."""
    import ray

    g, r = cfg.eval.generate, cfg.reference
    s = settings or settings_of(g)
    size = g.batch_size
    batches = [{"row_ids": [p["row_id"] for p in prompts[i:i + size]], "prompt_ids": [p["prompt_ids"] for p in prompts[i:i + size]],
                "batch_index": i // size} for i in range(0, len(prompts), size)]
    actors = plan_pool("generate", "generating actor", actor_resources(r.cpus_per_actor, 1 if use_gpu else 0), max(1, min(r.num_actors, len(batches))),
                       cfg.cluster.wait_for_resources_s)  # what the cluster holds now
    ds = ray.data.from_items(batches, override_num_blocks=len(batches)).map_batches(
        Generator, fn_constructor_kwargs=dict(model_path=model_path, tokenizer_path=tokenizer_path, prefix="",
                                              settings=s.__dict__, trust_remote_code=cfg.model.trust_remote_code,
                                              token=cfg.model.hf_token, bf16=scoring_bf16(cfg, use_gpu)),
        batch_size=1, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
        num_cpus=r.cpus_per_actor, num_gpus=1 if use_gpu else 0)
    log.info("generate: %s: %d prompts, up to %d new tokens each (%s), on %d actor(s)", who, len(prompts), s.max_new_tokens,
             f"sampled, temperature {s.temperature:g}, top_p {s.top_p:g}, seed {s.seed}" if s.do_sample else "greedy", actors)
    t0, last, parts, tokens, gen_seconds = time.time(), 0.0, [], 0, 0.0
    for batch in ds.iter_batches(batch_format="pandas", batch_size=None):
        parts.append(batch)
        tokens += int(batch["tokens"].sum())
        gen_seconds += float(batch["seconds"].sum())
        done, now = sum(len(p) for p in parts), time.time()
        if now - last > 5 or done == len(prompts):
            eta = (now - t0) / done * (len(prompts) - done)
            log.info("generate: %s: %d/%d prompts, %.0f tokens/s, ETA %.0f s", who, done, len(prompts), tokens / max(gen_seconds, 1e-9), eta)
            last = now
    df = pd.concat(parts).drop(columns=["seconds"]).set_index("row_id").loc[[p["row_id"] for p in prompts]].reset_index()
    return df, {"tokens": tokens, "seconds": round(gen_seconds, 3), "tokens_per_second": tokens / max(gen_seconds, 1e-9)}


def reference_replies(cfg, prompts: list[dict], reference_path: str, tokenizer_path: str, use_gpu: bool) -> tuple[pd.DataFrame, bool]:
    """The reference's replies, from the cache when these prompts were answered with these settings and weights before."""
    g = cfg.eval.generate
    key = fingerprint("generations", VERSION, fingerprint_model(reference_path), prompts_digest(prompts), settings_of(g).key(),
                      "bf16" if use_gpu and scoring_bf16(cfg, use_gpu) else "fp32")
    out = open_location(cfg.cache_dir) / "generations" / key
    with cache_claim(out, "the reference's replies") as claim:  # another run generating them: wait, then read them
        if (d := claim.done) is not None:
            log.info("generate: reference: cache hit (%s): the reference model is not run", out)
            return pq.read_table((d / "replies.parquet").path, filesystem=d.fs).to_pandas(), True
        df, speed = generate_replies(cfg, prompts, reference_path, tokenizer_path, "reference", use_gpu)
        with complete_dir(out) as tmp:
            pq.write_table(pa.Table.from_pandas(df, preserve_index=False), (tmp / "replies.parquet").path, filesystem=tmp.fs)
            (tmp / "key.json").write_text(json.dumps({"reference_model": reference_path, "settings": settings_of(g).key(),
                                                      "prompts": len(prompts), **speed}) + "\n")
    return df, False


def judge_name(j) -> str:
    return j.kind


def judge_pool(cfg, use_gpu: bool):
    """(callable class, constructor kwargs, GPUs per actor) of eval.judge's judge."""
    j, m = cfg.eval.judge, cfg.model
    if j.function:
        return FunctionJudge, {"spec": j.function}, 0
    if j.pairwise_function:
        return PairwiseFunctionJudge, {"spec": j.pairwise_function}, 0
    gpus = 1 if use_gpu else 0
    if j.reward_model:
        return RewardModelJudge, {"path": j.reward_model, "trust_remote_code": m.trust_remote_code, "token": m.hf_token,
                                  "max_length": j.max_length}, gpus
    return PairwiseModelJudge, {"path": j.pairwise_model, "template": j.pairwise_prompt, "labels": tuple(j.pairwise_labels),
                                "trust_remote_code": m.trust_remote_code, "token": m.hf_token, "max_length": j.max_length}, gpus


def run_judge(cfg, items: list[dict], use_gpu: bool) -> pd.DataFrame:
    """eval.judge over `items` (each with an `index`) on a Ray Data actor pool of its own (one GPU per actor for a model
    judge where there are GPUs): the judge's output rows, in the items' order."""
    import ray

    fn, kwargs, gpus = judge_pool(cfg, use_gpu)
    plan_pool("judge", "judge actor", actor_resources(cfg.reference.cpus_per_actor, gpus), 1, cfg.cluster.wait_for_resources_s)
    return ray.data.from_items(items).map_batches(fn, fn_constructor_kwargs=kwargs, batch_size=cfg.eval.judge.batch_size, batch_format="pandas",
                                                  compute=ray.data.ActorPoolStrategy(size=1), num_cpus=cfg.reference.cpus_per_actor,
                                                  num_gpus=gpus).to_pandas().sort_values("index").reset_index(drop=True)


def score_replies(cfg, rows: pd.DataFrame, use_gpu: bool) -> pd.DataFrame:
    """`rows` (any key columns, `prompt_json`, `reply`) with `score` (NaN where the judge failed) and `error` ("" or what
    raised) added, in the same order: eval.judge's pointwise judge (function or reward model). Counting failures is
    the caller's (see check_failures)."""
    log.info("judge: scoring %d replies with the %s", len(rows), judge_name(cfg.eval.judge))
    out = run_judge(cfg, [{"index": i, "prompt_json": str(p), "reply": str(r)} for i, (p, r) in enumerate(zip(rows.prompt_json, rows.reply))], use_gpu)
    rows = rows.reset_index(drop=True).copy()
    rows["score"], rows["error"] = out.score.astype(float).to_numpy(), out.error.astype(str).to_numpy()
    return rows


def compare_replies(cfg, rows: pd.DataFrame, use_gpu: bool) -> pd.DataFrame:
    """`rows` (any key columns, `prompt_json`, `x`, `y`) with the pairwise judge's verdict added, asked in both orders:
    `x_first` (P(x better) with x shown as A), `x_second` (with x shown as B), `win` (their mean: P(x better) with the
    position's pull cancelled; NaN when either failed) and `error`."""
    n = len(rows)
    log.info("judge: comparing %d pairs of replies in both orders (%d calls) with the %s", n, 2 * n, judge_name(cfg.eval.judge))
    items = [{"index": i, "prompt_json": str(p), "a": str(x), "b": str(y)} for i, (p, x, y) in enumerate(zip(rows.prompt_json, rows.x, rows.y))]
    items += [{"index": n + i, "prompt_json": str(p), "a": str(y), "b": str(x)} for i, (p, x, y) in enumerate(zip(rows.prompt_json, rows.x, rows.y))]
    out = run_judge(cfg, items, use_gpu)
    first, second = out.p_a.astype(float).to_numpy()[:n], out.p_a.astype(float).to_numpy()[n:]
    errors = [e1 or (e2 and f"{e2} (x shown second)") for e1, e2 in zip(out.error.astype(str)[:n], out.error.astype(str)[n:])]
    rows = rows.reset_index(drop=True).copy()
    rows["x_first"], rows["x_second"] = first, 1.0 - second
    rows["win"] = [both_orders(a, b) if not e else float("nan") for a, b, e in zip(first, second, errors)]
    rows["error"] = errors
    return rows


def tournament_scores(cfg, rows: pd.DataFrame, use_gpu: bool, group: str = "prompt_id") -> pd.DataFrame:
    """A pairwise judge's per-reply scores: within each `group` (the k replies to one prompt), every reply meets every
    other once, in both orders (compare_replies), and its `score` is its mean win probability over its k - 1
    opponents (a round robin: k(k-1)/2 comparisons, k(k-1) judge calls a prompt). A reply in a failed comparison has
    a NaN score and that `error`. `rows` has `group`, prompt_json and reply; the order is kept."""
    rows = rows.reset_index(drop=True)
    matches = [(i, j) for _, idx in rows.groupby(group, sort=False).groups.items() for a, i in enumerate(idx) for j in list(idx)[a + 1:]]
    log.info("judge: a round robin of %d replies to %d prompts: %d comparisons", len(rows), rows[group].nunique(), len(matches))
    table = pd.DataFrame({"prompt_json": [rows.prompt_json[i] for i, _ in matches], "x": [rows.reply[i] for i, _ in matches],
                          "y": [rows.reply[j] for _, j in matches]})
    out = compare_replies(cfg, table, use_gpu) if matches else table.assign(win=[], error=[])
    won = {i: [] for i in range(len(rows))}
    errors = {i: "" for i in range(len(rows))}
    for (i, j), w, e in zip(matches, out.win, out.error):
        won[i].append(w)
        won[j].append(1.0 - w)
        for k in (i, j):
            errors[k] = errors[k] or e
    rows = rows.copy()
    rows["score"] = [float("nan") if errors[i] or not won[i] else sum(won[i]) / len(won[i]) for i in range(len(rows))]
    rows["error"] = [errors[i] for i in range(len(rows))]
    return rows


def check_failures(cfg, errors: list[tuple[str, str]], total: int, what: str) -> None:
    """errors: (row, message) of the prompts the judge failed on, of `total`: a warning naming the first; more than
    data.max_bad_fraction of them stop the stage (JudgeError)."""
    if not errors:
        return
    log.warning("judge: the %s failed on %d of %d prompts (the first: row %s, %s)", what, len(errors), total, *errors[0])
    if len(errors) > cfg.data.max_bad_fraction * total:
        raise JudgeError(f"eval.judge: the {what} failed on {len(errors)} of {total} prompts, more than data.max_bad_fraction="
                         f"{cfg.data.max_bad_fraction:g} allows; the first: row {errors[0][0]}, {errors[0][1]}")


def verdict_name(win: float, x: str = "policy", y: str = "reference") -> str:
    return "" if not math.isfinite(win) else x if win > 0.5 else y if win < 0.5 else "tie"


def head_to_head(cfg, table: pd.DataFrame, use_gpu: bool, x: str = "policy", y: str = "reference") -> pd.DataFrame:
    """The judge's verdict of reply column `x` against column `y`, prompt by prompt (`table` has row_id, prompt_json and
    both columns): `win` (1 x better, 0 y better, 0.5 a tie; a pairwise judge's two-order mean in between; NaN when
    the judge failed), `judge_error`, `verdict` (x, y, tie or ""), and the judge's own columns: pointwise
    `judge_<x>` and `judge_<y>` (the scores), pairwise `judge_<x>_first` and `judge_<x>_second` (P(x better) with
    x shown first / second). Too many failed prompts stop the stage (check_failures)."""
    table = table.copy()
    if cfg.eval.judge.pairwise:
        out = compare_replies(cfg, table[["prompt_json"]].assign(x=table[x].to_numpy(), y=table[y].to_numpy()), use_gpu)
        table[f"judge_{x}_first"], table[f"judge_{x}_second"] = out.x_first.to_numpy(), out.x_second.to_numpy()
        table["win"], table["judge_error"] = out.win.to_numpy(), out.error.to_numpy()
    else:
        rows = pd.DataFrame([{"row_id": r.row_id, "who": who, "prompt_json": r.prompt_json, "reply": getattr(r, who)}
                             for r in table.itertuples() for who in (x, y)])
        out = score_replies(cfg, rows, use_gpu)
        scores = {(r.row_id, r.who): (float(r.score), r.error) for r in out.itertuples()}
        for who in (x, y):
            table[f"judge_{who}"] = [scores[(rid, who)][0] for rid in table.row_id]
        table["judge_error"] = [next((f"{who} reply: {scores[(rid, who)][1]}" for who in (x, y) if scores[(rid, who)][1]), "")
                                for rid in table.row_id]
        v = [verdict(a, b) for a, b in zip(table[f"judge_{x}"], table[f"judge_{y}"])]
        table["win"] = [float("nan") if w is None else w for w in v]
    table["verdict"] = [verdict_name(w, x, y) for w in table.win]
    check_failures(cfg, [(rid, e) for rid, e in zip(table.row_id, table.judge_error) if e], len(table), judge_name(cfg.eval.judge))
    return table


def win_metrics(table: pd.DataFrame, x: str = "policy", y: str = "reference") -> dict:
    """win_rate (the mean verdict over the prompts judged), its 95% interval (paired bootstrap over prompts, fixed seed:
    dpo_ray.stats) and sign-test p against 0.5, the judge's means or, pairwise, the two orders' rates and how often they
    disagree (the judge's position bias), the prompts judged and failed."""
    s = stats.summarize(table.win.to_numpy())
    finite = lambda c: table[c][table[c].map(math.isfinite)]  # noqa: E731
    m = {"win_rate": s["mean"], "win_rate_ci_low": s["ci_low"], "win_rate_ci_high": s["ci_high"], "win_rate_p": s["p"],
         "judge/prompts": float(s["n"]), "judge/failed_prompts": float((table.judge_error != "").sum())}
    if f"judge_{x}_first" in table:
        a, b = finite(f"judge_{x}_first"), finite(f"judge_{x}_second")
        both = table[table.judge_error == ""]
        m.update({f"judge/{x}_first_rate": float(a.mean()) if len(a) else float("nan"), f"judge/{x}_second_rate": float(b.mean()) if len(b) else float("nan"),
                  "judge/position_disagreement": float(((both[f"judge_{x}_first"] > 0.5) != (both[f"judge_{x}_second"] > 0.5)).mean()) if len(both) else float("nan")})
    else:
        for who in (x, y):
            m[f"judge/{who}_mean"] = float(finite(f"judge_{who}").mean()) if len(finite(f"judge_{who}")) else float("nan")
    return m


def model_replies(cfg, prompts: list[dict], model_dir: str, tokenizer_path: str, use_gpu: bool, ref_df: pd.DataFrame):
    """(table, metrics) for one model's replies beside the reference's: what run() and the registry's champion use. The
    table has the whole replies and prompt_json (preview() makes the MLflow table of it)."""
    pol_df, speed = generate_replies(cfg, prompts, model_dir, tokenizer_path, "policy", use_gpu)
    table = pd.DataFrame({
        "row_id": [p["row_id"] for p in prompts],
        "prompt": [last_user(p["prompt_json"]) for p in prompts],
        "chosen": [p["chosen"] for p in prompts],
        "reference": list(ref_df["reply"]),
        "policy": list(pol_df["reply"]),
        "reference_tokens": ref_df["tokens"].to_numpy(),
        "policy_tokens": pol_df["tokens"].to_numpy(),
        "prompt_json": [p["prompt_json"] for p in prompts],
    })
    metrics = {"generation/length_policy": float(table.policy_tokens.mean()), "generation/length_reference": float(table.reference_tokens.mean()),
               "generation/tokens_per_second": speed["tokens_per_second"], "generation/prompts": float(len(table))}
    if cfg.eval.judge is not None:
        table = head_to_head(cfg, table, use_gpu)
        metrics.update(win_metrics(table))
    return table, metrics


def preview(table: pd.DataFrame | None) -> pd.DataFrame | None:
    """The generations table as MLflow shows it (eval_generations.json): texts cut to PREVIEW_CHARS, no prompt_json."""
    if table is None:
        return None
    cut = lambda t: t if len(t) <= PREVIEW_CHARS else t[:PREVIEW_CHARS] + "…"  # noqa: E731
    return table.drop(columns=["prompt_json"]).assign(**{c: table[c].map(cut) for c in ("prompt", "chosen", "reference", "policy")})


def check_judge(cfg) -> None:
    """A function judge that cannot be imported is one line before any model work (JudgeError)."""
    j = cfg.eval.judge
    if j is not None and cfg.eval.generate.prompts:
        for key in ("function", "pairwise_function"):
            if getattr(j, key):
                load_function(getattr(j, key), key)


def win_line(m: dict, over: str = "the reference") -> str:
    """'win rate 0.664 [0.547, 0.773] over the reference, p 0.012 (sign test against 0.5)'."""
    return (f"win rate {m['win_rate']:.3f} [{m['win_rate_ci_low']:.3f}, {m['win_rate_ci_high']:.3f}] over {over}, "
            f"p {m['win_rate_p']:.3g} (95% interval, sign test against 0.5)")


@console.stage("generate", lambda r: " | ".join(f"{k} {r[0][k]:.3f}" for k in ("eval/win_rate", "eval/generation/tokens_per_second") if k in r[0]))
def generate_and_judge(cfg, ctx, ref, model_dir, prompts: list[dict] | None = None):
    """Held-out prompts answered by the model at `model_dir` and by the reference (its replies cached), and judged:
    (eval/generation/... and, with a judge, eval/win_rate, its interval and p, eval/judge/... metrics; the whole
    generations table: preview() makes the MLflow table); ({}, None) when generation is off or there is no eval split."""
    reference_path, tokenizer_path, use_gpu = ctx.reference_path, ctx.tokenizer_path, ctx.use_gpu
    g = cfg.eval.generate
    if g.prompts == 0:
        return {}, None
    check_judge(cfg)
    tok = load_tokenizer(tokenizer_path, cfg.model.trust_remote_code, cfg.model.hf_token)
    prompts = prompts if prompts is not None else select_prompts(ref, g.prompts, tok)
    if not prompts:
        log.warning("generate: no eval split; no generations")
        return {}, None
    ref_df, hit = reference_replies(cfg, prompts, reference_path, tokenizer_path, use_gpu)
    table, metrics = model_replies(cfg, prompts, str(model_dir), tokenizer_path, use_gpu, ref_df)
    metrics["generation/reference_cache_hit"] = float(hit)
    log.info("generate: %d prompts | policy %.1f tokens a reply, reference %.1f | %.0f tokens/s%s", len(table),
             metrics["generation/length_policy"], metrics["generation/length_reference"], metrics["generation/tokens_per_second"],
             f" | {win_line(metrics)}" if "win_rate" in metrics else "")
    return {f"eval/{k}": v for k, v in metrics.items()}, table
