"""`dpo-ray iterate`: iterative (online) DPO, rounds of generate -> judge -> pair -> train -> evaluate.

Each round the current policy samples iterate.samples_per_prompt replies per prompt on a Ray Data actor pool
(pipeline/generate.py, seeded per round), eval.judge scores every reply (`score_samples`), dpo_ray/pairing.py builds
the pairs (best against worst, or all ordered pairs above a margin; ties dropped and counted) and writes them as a
JSONL file in a layout prepare reads. The round then runs the same stage sequence as `dpo-ray run`
(pipeline/sequence.py): the shared part (prepare, the cached reference: the initial model or the round's starting
policy) and the trained part (Ray Train from the previous round's weights, export), in its own MLflow run, a child of
the iterate run. After training, held-out prompts are answered by the new policy and judged against the initial
model's replies (cached) and the previous round's (`compare`).

Every phase of a round ends with a marker file (<output_dir>/rounds/round-<r>/<phase>.json, written atomically): the
same command again continues from the first unfinished phase; training itself resumes from its Ray Train checkpoint.
"""
from __future__ import annotations

import gzip
import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from dpo_ray.config import Config, masked, with_overrides
from dpo_ray.data import Reject, _bos, render, to_pair, validate
from dpo_ray.errors import UserError
from dpo_ray.generation import Settings
from dpo_ray.judges import load_function
from dpo_ray.model import fingerprint_model
from dpo_ray.pairing import build_pairs
from dpo_ray.tracking import RunLogger

from . import evaluate, generate, sequence, sources
from .artifacts import exclusive, fingerprint, keyed_state, resolve_data_files, write_json_atomic
from .context import Context, check_output_dir, preflight
from .export import replace_dir
from .lease import naming_run
from .mlflow_run import fail_run, iterate_parent_run, log_evaluation, log_model, masked_yaml, round_run
from .prepare import _split_of
from .runtime import ray_runtime

log = logging.getLogger("dpo_ray")
PHASES = ("generate", "judge", "pairs", "train", "evaluate")
# keys a rerun may change and still continue the same iteration: how many rounds, when to stop, which one is kept
CONTINUABLE = {"rounds", "stop_below", "select"}


class IterateError(UserError, RuntimeError):
    """An iteration that cannot go on: no prompts, every prompt tied, too few pairs, no judge."""


# ---- prompts

def read_records(path: Path):
    """The JSON objects of a .jsonl / .json (array) / .parquet file (gzip too), in order; undecodable lines skipped."""
    kind = sources.sniff(path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            yield from batch.to_pylist()
        return
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        if kind == "array":
            yield from (o for o in json.load(f) if isinstance(o, dict))
            return
        for line in f:
            if line.strip():
                try:
                    obj = json.loads(line.lstrip("\ufeff"))
                except json.JSONDecodeError:
                    continue
                if isinstance(obj, dict):
                    yield obj


def prompt_of(obj: dict, cfg: Config):
    """A record's prompt as prepare writes it (prompt_json's value): the messages before the reply, or a plain-text
    prompt without the chat template; None when the record has none usable."""
    columns = cfg.data.columns_map
    key = (columns or {}).get("prompt", "prompt")
    if not any(k in obj for k in ("chosen", "rejected", "conversations", *((columns or {}).get(c, "") for c in ("chosen", "rejected")))):
        p = obj.get(key)  # a prompt file: the prompt alone
        if isinstance(p, str) and p.strip():
            return [{"role": "user", "content": p}] if cfg.data.apply_chat_template else p
        if isinstance(p, list) and p and all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user", "assistant") for m in p) \
                and p[-1]["role"] == "user":
            return [{"role": m["role"], "content": m["content"]} for m in p]
        return None
    try:
        pair = to_pair(obj, columns, cfg.data.apply_chat_template)
        validate(pair)
    except Reject:
        return None
    return pair.text[0] if pair.text is not None else pair.chosen[:-1]


def load_prompts(cfg: Config, tokenizer) -> tuple[list[dict], list[dict], dict]:
    """(training prompts in file order, held-out prompts sorted by content hash, counts): each {prompt_id, prompt_json,
    prompt_ids}. Held out: data.eval_fraction of the distinct prompts, by content hash (as prepare splits pairs)."""
    files = resolve_data_files(cfg.iterate.prompts or cfg.data.train)
    seen, train, held, records, unusable = set(), [], [], 0, 0
    for f in files:
        for obj in read_records(f):
            records += 1
            p = prompt_of(obj, cfg)
            if p is None:
                unusable += 1
                continue
            pj = json.dumps(p, ensure_ascii=False)
            pid = fingerprint("prompt", pj)
            if pid in seen:
                continue
            seen.add(pid)
            (held if _split_of(pid, cfg.data.eval_fraction) == "eval" else train).append({"prompt_id": pid, "prompt_json": pj})
    held = sorted(held, key=lambda p: p["prompt_id"])[:cfg.iterate.eval_prompts]
    for p in train + held:
        p["prompt_ids"] = prompt_ids(tokenizer, p["prompt_json"], cfg)
    counts = {"files": [str(f) for f in files], "records": records, "unusable": unusable, "distinct": len(seen),
              "train_prompts": len(train), "held_out_prompts": len(held)}
    return train, held, counts


def prompt_ids(tokenizer, prompt_json: str, cfg: Config) -> list[int]:
    """The prompt's tokens as prepare makes them: the chat template with its generation prompt (or BOS + the plain
    text), cut from the left to data.max_prompt_length."""
    p = json.loads(prompt_json)
    if isinstance(p, str):
        ids = _bos(tokenizer) + tokenizer(p, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(render(tokenizer, p, True), add_special_tokens=False)["input_ids"]
    return ids[-cfg.data.prompt_budget:]


def round_prompts(cfg: Config, train: list[dict], r: int) -> list[dict]:
    """Round r's prompts: all, or with iterate.max_prompts the next ones of a fixed shuffle (wrapping around)."""
    m = cfg.iterate.max_prompts
    if m is None or m >= len(train):
        return train
    order = np.random.default_rng(cfg.iterate.seed).permutation(len(train))
    return [train[int(order[((r - 1) * m + i) % len(train)])] for i in range(m)]


# ---- generating and judging

def sampling(cfg: Config, r: int) -> Settings:
    it = cfg.iterate
    return Settings(max_new_tokens=it.max_new_tokens, do_sample=True, temperature=it.temperature, top_p=it.top_p, seed=it.seed * 1000 + r)


def generate_samples(cfg: Config, prompts: list[dict], model_path: str, tokenizer_path: str, use_gpu: bool, r: int,
                     settings: Settings | None = None) -> tuple[pd.DataFrame, dict]:
    """k sampled replies per prompt (row_id prompt_id#k) from `model_path`: one row each (prompt_id, sample, row_id,
    prompt_json, reply, tokens, stopped) and the speed. Batches are seeded by (seed, batch index): reproducible."""
    k = cfg.iterate.samples_per_prompt
    rows = [{"row_id": f"{p['prompt_id']}#{i}", "prompt_ids": p["prompt_ids"]} for p in prompts for i in range(k)]
    df, speed = generate.generate_replies(cfg, rows, model_path, tokenizer_path, f"round {r} policy", use_gpu, settings=settings or sampling(cfg, r))
    meta = pd.DataFrame([{"prompt_id": p["prompt_id"], "sample": i, "prompt_json": p["prompt_json"]} for p in prompts for i in range(k)])
    return pd.concat([meta, df.reset_index(drop=True)], axis=1), speed


def score_samples(cfg: Config, df: pd.DataFrame, use_gpu: bool) -> pd.DataFrame:
    """Every reply of `df` (prompt_id, prompt_json, reply) scored by eval.judge: `score` (NaN where the judge failed) and
    `error` added. A pointwise judge scores each reply; a pairwise judge plays a round robin among each prompt's replies
    (generate.tournament_scores: a reply's score is its mean win probability). All of iterate's scoring goes through here."""
    if cfg.eval.judge.pairwise:
        return generate.tournament_scores(cfg, df, use_gpu, group="prompt_id")
    return generate.score_replies(cfg, df, use_gpu)


def compare(cfg: Config, table: pd.DataFrame, use_gpu: bool, against: tuple[str, ...] = ("initial", "previous")) -> tuple[pd.DataFrame, dict]:
    """Held-out replies judged head to head: `table` has prompt_id, prompt_json, a `policy` column and one column of replies
    per name in `against`. Per prompt and name: `win_<name>` (1 the policy's reply is better, 0 worse, 0.5 a tie, a
    pairwise judge's two-order mean in between; NaN unjudged) and `error_<name>`; pointwise, the scores `judge_<who>`.
    Returns (the table, {name: generate.win_metrics: the win rate, its 95% interval and sign test, the judge's means})."""
    table = table.reset_index(drop=True).assign(row_id=lambda t: t.prompt_id)
    metrics = {}
    for name in against:
        out = generate.head_to_head(cfg, table[["row_id", "prompt_json", "policy", name]], use_gpu, x="policy", y=name)
        metrics[name] = generate.win_metrics(out, x="policy", y=name)
        table[f"win_{name}"], table[f"error_{name}"] = out.win.to_numpy(), out.judge_error.to_numpy()
        for c in ("judge_policy", f"judge_{name}"):
            if c in out:
                table[c] = out[c].to_numpy()
    return table, metrics


def finite_mean(values) -> float:
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    return sum(v) / len(v) if v else float("nan")


# ---- the pairs a round trains on

def pair_record(prompt_json: str, chosen: str, rejected: str) -> dict:
    """A pair in a layout prepare reads: conversational (prompt messages, the replies as assistant messages) or, for a
    plain-text prompt, standard strings."""
    p = json.loads(prompt_json)
    if isinstance(p, str):
        return {"prompt": p, "chosen": chosen, "rejected": rejected}
    return {"prompt": p, "chosen": [{"role": "assistant", "content": chosen}], "rejected": [{"role": "assistant", "content": rejected}]}


def offline_pairs(cfg: Config, n: int, r: int, held_ids: set) -> list[dict]:
    """n pairs drawn (seed, round) from data.train, those whose prompt is held out left aside, each as prepare reads it."""
    if n <= 0:
        return []
    usable = []
    for f in resolve_data_files(cfg.data.train):
        for obj in read_records(f):
            try:
                pair = to_pair(obj, cfg.data.columns_map, cfg.data.apply_chat_template)
                validate(pair)
            except Reject:
                continue
            prompt = pair.text[0] if pair.text is not None else pair.chosen[:-1]
            if fingerprint("prompt", json.dumps(prompt, ensure_ascii=False)) in held_ids:
                continue
            usable.append({"prompt": pair.text[0], "chosen": pair.text[1], "rejected": pair.text[2]} if pair.text is not None
                          else {"chosen": pair.chosen, "rejected": pair.rejected})
    pick = np.random.default_rng(cfg.iterate.seed * 1000 + r).permutation(len(usable))[:n]
    return [usable[int(i)] for i in sorted(pick)]


# ---- state

def iterate_state(out_dir: Path, cfg: Config) -> dict:
    """<output_dir>/iterate.json: the iteration's fingerprint and parent run; another iteration in the same output_dir is
    refused (iterate.rounds, stop_below and select may change: more rounds continue the same iteration)."""
    dump = masked(cfg.model_dump(exclude={"sweep"}))
    dump["iterate"] = {k: v for k, v in dump["iterate"].items() if k not in CONTINUABLE}
    dump.pop("output_dir")
    key = fingerprint("iterate", json.dumps(dump, sort_keys=True, default=str))
    path = out_dir / "iterate.json"
    return keyed_state(path, key, lambda: IterateError(
        f"{out_dir} holds another iteration (another config); set output_dir to a new directory, or delete {path} and "
        f"{out_dir / 'rounds'} to start this one over (only iterate.rounds, stop_below and select may change)"))


class Round:
    """One round's directory and its phase markers (<phase>.json): what a rerun skips."""

    def __init__(self, out_dir: Path, r: int, on_phase=None):
        self.r, self.dir, self.on_phase = r, out_dir / "rounds" / f"round-{r}", on_phase
        self.child = None  # the round's MLflow run, once it exists
        self.dir.mkdir(parents=True, exist_ok=True)

    def done(self, phase: str) -> dict | None:
        f = self.dir / f"{phase}.json"
        return json.loads(f.read_text()) if f.exists() else None

    def finish(self, phase: str, info: dict) -> dict:
        write_json_atomic(self.dir / f"{phase}.json", info)
        if self.on_phase is not None:  # tests: an interruption right after a phase
            self.on_phase(self.r, phase)
        return info

    def skipped(self, phase: str, info: dict) -> dict:
        log.info("round %d: %s: finished by an earlier invocation (%.1f s then); not run again", self.r, phase, info.get("seconds", 0))
        return info


# ---- the driver

def iterate(cfg: Config, address: str | None = None, on_phase=None) -> dict:
    """Runs the rounds in cfg.iterate; returns the summary (also <output_dir>/iterate_summary.json). `on_phase(r, phase)`
    is called after each phase's marker is written (tests interrupt there). Holds the output dir's lock throughout."""
    out_dir = Path(cfg.output_dir).resolve()
    check_output_dir(out_dir)
    with exclusive(out_dir), naming_run(str(out_dir)):
        return _iterate(cfg, out_dir, address, on_phase)


def check_inputs(cfg: Config) -> None:
    """What costs nothing, before any model or Ray work: a judge that loads, a model each round can start from, prompt files that read."""
    j = cfg.eval.judge
    if j is None:
        raise IterateError("iterate needs eval.judge (a reward_model, a function, a pairwise_model or a pairwise_function) to score the sampled replies")
    for key in ("function", "pairwise_function"):
        if getattr(j, key):
            load_function(getattr(j, key), key)
    for key in ("reward_model", "pairwise_model"):
        if getattr(j, key) and not (Path(getattr(j, key)).expanduser() / "config.json").is_file():
            raise IterateError(f"eval.judge.{key} {getattr(j, key)}: not a local Hugging Face model directory (no config.json)")
    if cfg.train.lora and not cfg.train.lora.merge:
        raise IterateError("iterate: train.lora.merge must be true (each round starts from the previous round's whole model)")
    if cfg.iterate.prompts:
        for f in resolve_data_files(cfg.iterate.prompts):
            sources.sniff(f)


def _iterate(cfg: Config, out_dir: Path, address: str | None, on_phase) -> dict:
    t_start = time.time()
    it = cfg.iterate
    check_inputs(cfg)
    ctx = preflight(cfg, ("train", "evaluate"))
    state = iterate_state(out_dir, cfg)
    train, held, pcounts = load_prompts(cfg, ctx.tokenizer)
    if not train:
        raise IterateError(f"iterate: no prompts in {', '.join(pcounts['files'])} ({pcounts['records']} records, "
                           f"{pcounts['unusable']} without a usable prompt, {pcounts['held_out_prompts']} held out)")
    log.info("iterate: %d training prompts, %d held out (of %d distinct in %d record(s)); %d round(s) of %d samples a prompt%s",
             len(train), len(held), pcounts["distinct"], pcounts["records"], it.rounds, it.samples_per_prompt,
             f", {it.max_prompts} prompts a round" if it.max_prompts else "")
    parent, rnd = None, None
    with ray_runtime(address):
        try:
            ctx.on_cluster(cfg, trains=True)
            parent = iterate_parent_run(cfg, ctx, state, out_dir, pcounts)
            initial = ctx.policy_path
            rows, start, prev_replies, stopped = [], initial, None, None
            for r in range(1, it.rounds + 1):
                rnd = Round(out_dir, r, on_phase)
                row, model_dir, prev_replies = run_round(cfg, ctx, rnd, start, train, held, parent, prev_replies)
                rows.append(row)
                parent.log_metrics({k: v for k, v in row.items() if k.startswith("round/") and isinstance(v, (int, float))}, step=r)
                log.info("%s", round_line(row, it.rounds))
                start = str(model_dir)
                wr = row.get("round/win_rate_vs_previous")
                if it.stop_below is not None and wr is not None and math.isfinite(wr) and wr < it.stop_below:
                    stopped = f"round {r}: win rate {wr:.3f} against the previous round is below iterate.stop_below={it.stop_below:g}"
                    log.info("iterate: stopping early: %s", stopped)
                    break
            summary = finish_iteration(cfg, ctx, parent, rows, out_dir, t_start, stopped)
            return summary
        except BaseException:
            if rnd is not None and rnd.child is not None and rnd.done("evaluate") is None:
                fail_run(rnd.child)
            if parent is not None:
                fail_run(parent)
            raise


def round_config(cfg: Config, rnd: Round, start: str, reference: str, files: list[str], ctx: Context) -> Config:
    """The round's training config: its pairs as data.train (no eval split: the held-out prompts are iterate's own), the
    round's starting policy and reference, its own output directory; with iterate.keep_optimizer, from round 2 on, the
    optimizer state of the previous round's last checkpoint."""
    previous = rnd.dir.parent / f"round-{rnd.r - 1}" / "train.json"
    keep = {"train.optimizer_from": json.loads(previous.read_text())["train"]["checkpoint"]} if cfg.iterate.keep_optimizer and rnd.r > 1 else {}
    return with_overrides(cfg, {**keep,
        "output_dir": str(rnd.dir), "data.train": files, "data.eval": None, "data.eval_fraction": 0.0, "data.columns": None,
        "model.policy": start, "model.reference": reference, "model.tokenizer": ctx.tokenizer_path,
        "eval.generate.prompts": 0, "registry.name": None, "registry.metric": "rewards/accuracies",
        "mlflow.run_name": f"{cfg.name}-round-{rnd.r}"}, f"iterate round {rnd.r}")


def run_round(cfg: Config, ctx: Context, rnd: Round, start: str, train: list[dict], held: list[dict], parent, prev_replies):
    """One round's phases, each skipped when its marker says it finished. Returns (the round's row of figures, its model
    directory, its held-out replies (scored) for the next round's comparison)."""
    it, r, use_gpu = cfg.iterate, rnd.r, ctx.use_gpu
    log.info("round %d/%d: from %s", r, it.rounds, start)
    # [1] generate: k samples per prompt from the round's starting policy
    if (g := rnd.done("generate")) is None:
        t0 = time.time()
        prompts = round_prompts(cfg, train, r)
        df, speed = generate_samples(cfg, prompts, start, ctx.tokenizer_path, use_gpu, r)
        df.to_parquet(rnd.dir / "samples.parquet", index=False)
        g = rnd.finish("generate", {"seconds": round(time.time() - t0, 2), "prompts": len(prompts), "samples": len(df),
                                    "seed": sampling(cfg, r).seed, **speed})
        log.info("round %d: generate: %d replies to %d prompts in %.1f s (%.0f tokens/s)", r, len(df), len(prompts), g["seconds"], g["tokens_per_second"])
    else:
        rnd.skipped("generate", g)
    # [2] judge every sample
    if (j := rnd.done("judge")) is None:
        t0 = time.time()
        df = pd.read_parquet(rnd.dir / "samples.parquet")
        scored = score_samples(cfg, df, use_gpu)
        failed = scored.groupby("prompt_id", sort=False).error.agg(lambda e: next((x for x in e if x), ""))
        generate.check_failures(cfg, [(pid, e) for pid, e in failed.items() if e], len(failed), generate.judge_name(cfg.eval.judge))
        scored.to_parquet(rnd.dir / "scored.parquet", index=False)
        j = rnd.finish("judge", {"seconds": round(time.time() - t0, 2), "replies": len(scored), "failed_replies": int((scored.error != "").sum()),
                                 "score_mean": finite_mean(scored.score), "length_mean": float(scored.tokens.mean())})
        log.info("round %d: judge: %d replies scored in %.1f s, mean %.3f, %d failed", r, j["replies"], j["seconds"], j["score_mean"], j["failed_replies"])
    else:
        rnd.skipped("judge", j)
    # [3] pairs (and the offline share)
    if (p := rnd.done("pairs")) is None:
        t0 = time.time()
        scored = pd.read_parquet(rnd.dir / "scored.parquet")
        made = build_pairs(scored.to_dict("records"), it.pairing, it.min_margin, r)
        c = made.counts()
        if not made.pairs and made.ties and made.ties + made.too_few == made.prompts:
            raise IterateError(f"round {r}: every prompt's replies tied by the judge ({made.ties} of {made.prompts} prompts; "
                               f"{made.too_few} with fewer than two scored replies): no pairs; the round stops. Sample more diverse "
                               "replies (iterate.temperature, iterate.samples_per_prompt) or use a judge with finer scores")
        if len(made.pairs) < it.min_pairs:
            raise IterateError(f"round {r}: {len(made.pairs)} pair(s), fewer than iterate.min_pairs={it.min_pairs} ({made.ties} prompts "
                               f"tied, {made.below_margin} below iterate.min_margin, {made.too_few} with fewer than two scored replies)")
        prompt_json = dict(zip(scored.prompt_id, scored.prompt_json))
        pairs = pd.DataFrame(made.pairs)
        pairs.insert(2, "prompt_json", [prompt_json[x] for x in pairs.prompt_id])
        pairs.to_parquet(rnd.dir / "pairs.parquet", index=False)
        with open(rnd.dir / "pairs.jsonl", "w", encoding="utf-8") as f:
            for x in made.pairs:  # with its provenance: prepare reads prompt/chosen/rejected and leaves the rest
                f.write(json.dumps({**pair_record(prompt_json[x["prompt_id"]], x["chosen"], x["rejected"]),
                                    **{k: x[k] for k in ("round", "prompt_id", "chosen_score", "rejected_score")}}, ensure_ascii=False) + "\n")
        n_off = round(it.offline_fraction / (1 - it.offline_fraction) * len(made.pairs)) if it.offline_fraction else 0
        off = offline_pairs(cfg, n_off, r, {h["prompt_id"] for h in held})
        if off:
            with open(rnd.dir / "offline.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(o, ensure_ascii=False) + "\n" for o in off)
        p = rnd.finish("pairs", {"seconds": round(time.time() - t0, 2), **c, "offline_pairs": len(off)})
        log.info("round %d: pairs: %d (%s) from %d prompts; %d prompts tied (dropped), %d below the margin, %d with fewer than 2 "
                 "scored replies%s", r, c["pairs"], it.pairing, c["prompts"], c["ties_dropped"], c["below_margin"], c["too_few_replies"],
                 f"; + {len(off)} offline pairs" if off else "")
    else:
        rnd.skipped("pairs", p)
    # [4] train: the shared part (prepare, reference) and the trained part of the stage sequence, in the round's MLflow run
    files = [str(rnd.dir / "pairs.jsonl")] + ([str(rnd.dir / "offline.jsonl")] if p.get("offline_pairs") else [])
    reference = ctx.reference_path if it.reference == "initial" else start
    rcfg = round_config(cfg, rnd, start, reference, files, ctx)
    rctx = ctx.for_config(rcfg, rejects_file=rnd.dir / "rejects.jsonl")
    if (t := rnd.done("train")) is None:
        t0 = time.time()
        shared = sequence.shared_part(rcfg, rctx, ("prepare", "reference"))
        child = rnd.child = round_run(rcfg, rctx, shared.prepared, shared.ref, parent.run_id, r)
        log_round_inputs(child, rnd)
        part, _, _ = sequence.trained_part(rcfg, rctx, shared, child, stages=("train",))
        t = rnd.finish("train", {"seconds": round(time.time() - t0, 2), **shared.seconds, "run_id": child.run_id,
                                 "policy_start": rctx.policy_path, "policy_start_checksum": fingerprint_model(rctx.policy_path),
                                 "reference": rctx.reference_path, "reference_checksum": fingerprint_model(rctx.reference_path),
                                 "model_dir": part["model_dir"], "model_checksum": fingerprint_model(part["model_dir"]), "train": part["train"]})
        log.info("round %d: train: %s steps in %.1f s (prepare %.1f s, reference %.1f s%s) -> %s", r, t["train"].get("steps"), t["seconds"],
                 t["prepare_seconds"], t.get("reference_seconds", 0), ", cache hit" if t.get("reference_hit") else "", t["model_dir"])
    else:
        rnd.skipped("train", t)
        child = rnd.child = RunLogger(ctx.uri, t["run_id"])
    # [5] evaluate: held-out prompts, the new policy against the initial model and the previous round
    if (e := rnd.done("evaluate")) is None:
        t0 = time.time()
        table = None
        e = {"seconds": 0.0}
        if held:
            table, metrics = evaluate_round(cfg, ctx, rnd, t["model_dir"], held, prev_replies)
            e.update(metrics)
            table.to_parquet(rnd.dir / "eval_replies.parquet", index=False)
            child.call("eval_generations.json", child.client.log_table, data=table.drop(columns=["prompt_json"]), artifact_file="eval_generations.json")
        e["seconds"] = round(time.time() - t0, 2)
        row = round_row(r, rnd, e)
        child.log_metrics({k: v for k, v in row.items() if k.startswith("round/") and isinstance(v, (int, float))}, step=r)
        child.flush()
        child.call("run status", child.client.set_terminated, "FINISHED")
        e = rnd.finish("evaluate", e)
    else:
        rnd.skipped("evaluate", e)
    replies = pd.read_parquet(rnd.dir / "eval_replies.parquet") if held and (rnd.dir / "eval_replies.parquet").exists() else None
    return round_row(r, rnd, e), Path(t["model_dir"]), replies


def evaluate_round(cfg: Config, ctx: Context, rnd: Round, model_dir: str, held: list[dict], prev: pd.DataFrame | None):
    """(the held-out table: each prompt's replies by the new policy, the initial model (cached) and the previous round,
    their scores and verdicts; the round's metrics)."""
    prompts = [{"row_id": h["prompt_id"], "prompt_ids": h["prompt_ids"]} for h in held]
    initial, hit = generate.reference_replies(cfg, prompts, ctx.policy_path, ctx.tokenizer_path, ctx.use_gpu)
    pol, speed = generate.generate_replies(cfg, prompts, str(model_dir), ctx.tokenizer_path, f"round {rnd.r} held-out", ctx.use_gpu)
    table = pd.DataFrame({"prompt_id": [h["prompt_id"] for h in held], "prompt_json": [h["prompt_json"] for h in held],
                          "policy": pol.reply.to_numpy(), "initial": initial.reply.to_numpy(),
                          "tokens_policy": pol.tokens.to_numpy(), "tokens_initial": initial.tokens.to_numpy()})
    if prev is None:  # round 1: the previous round is the initial model: one comparison
        table["previous"], table["tokens_previous"] = table.initial, table.tokens_initial
        table, m = compare(cfg, table, ctx.use_gpu, against=("initial",))
        table["win_previous"], table["error_previous"] = table.win_initial, table.error_initial
        m["previous"] = m["initial"]
    else:
        prev = prev.set_index("prompt_id").loc[table.prompt_id]
        table["previous"], table["tokens_previous"] = prev.policy.to_numpy(), prev.tokens_policy.to_numpy()
        table, m = compare(cfg, table, ctx.use_gpu)
    mi, mp = m["initial"], m["previous"]
    metrics = {"win_rate_vs_initial": mi["win_rate"], "win_rate_vs_initial_ci_low": mi["win_rate_ci_low"],
               "win_rate_vs_initial_ci_high": mi["win_rate_ci_high"], "win_rate_vs_initial_p": mi["win_rate_p"],
               "win_rate_vs_previous": mp["win_rate"], "win_rate_vs_previous_ci_low": mp["win_rate_ci_low"],
               "win_rate_vs_previous_ci_high": mp["win_rate_ci_high"],
               "length": float(table.tokens_policy.mean()), "length_initial": float(table.tokens_initial.mean()),
               "held_out_prompts": len(table), "judged_prompts": mi["judge/prompts"], "judge_failed_prompts": mi["judge/failed_prompts"],
               "eval_tokens_per_second": speed["tokens_per_second"], "initial_replies_cached": hit}
    if "judge/policy_mean" in mi:  # a pointwise judge's means
        metrics.update({"judge_mean": mi["judge/policy_mean"], "judge_mean_initial": mi["judge/initial_mean"],
                        "judge_mean_previous": mp.get("judge/previous_mean", mi["judge/initial_mean"])})
    return table, metrics


def log_round_inputs(child, rnd: Round) -> None:
    """The round's generations table (every sample and its score) and the pairs it trains on (both replies, both scores,
    their provenance) in its MLflow run."""
    scored = pd.read_parquet(rnd.dir / "scored.parquet")
    child.call("generations.json", child.client.log_table, data=scored.drop(columns=["prompt_json"]), artifact_file="generations.json")
    pairs = pd.read_parquet(rnd.dir / "pairs.parquet")
    child.call("pairs.json", child.client.log_table, data=pairs, artifact_file="pairs.json")
    child.call("pairs.jsonl", child.client.log_artifact, str(rnd.dir / "pairs.jsonl"))


def round_row(r: int, rnd: Round, e: dict) -> dict:
    """The round's figures from its markers: round/... metrics (win rates, judge means, lengths, pairs, ties, seconds)."""
    g, j, p, t = (rnd.done(x) or {} for x in ("generate", "judge", "pairs", "train"))
    row = {"round": r, "model_dir": t.get("model_dir"), "mlflow_run_id": t.get("run_id")}
    for k in ("win_rate_vs_initial", "win_rate_vs_initial_ci_low", "win_rate_vs_initial_ci_high", "win_rate_vs_initial_p",
              "win_rate_vs_previous", "win_rate_vs_previous_ci_low", "win_rate_vs_previous_ci_high", "judge_mean", "judge_mean_initial",
              "judge_mean_previous", "length", "length_initial", "held_out_prompts", "judge_failed_prompts", "eval_tokens_per_second"):
        if k in e:
            row[f"round/{k}"] = e[k]
    row.update({"round/pairs": p.get("pairs"), "round/ties_dropped": p.get("ties_dropped"), "round/below_margin": p.get("below_margin"),
                "round/offline_pairs": p.get("offline_pairs"), "round/prompts": g.get("prompts"), "round/samples": g.get("samples"),
                "round/samples_judge_mean": j.get("score_mean"), "round/samples_length": j.get("length_mean"),
                "round/samples_failed": j.get("failed_replies"), "round/tokens_per_second": g.get("tokens_per_second"),
                "round/train_steps": (t.get("train") or {}).get("steps"), "round/train_loss_last": (t.get("train") or {}).get("loss_last")})
    for phase, m in zip(PHASES, (g, j, p, t, e)):
        row[f"round/{phase}_seconds"] = m.get("seconds")
    if t:
        row["round/prepare_seconds"], row["round/reference_seconds"] = t.get("prepare_seconds"), t.get("reference_seconds")
    return {k: v for k, v in row.items() if v is not None}


def round_line(row: dict, rounds: int) -> str:
    f = lambda k, spec=".3f": format(row[k], spec) if k in row else "n/a"  # noqa: E731
    secs = ", ".join(f"{ph} {row[f'round/{ph}_seconds']:.0f} s" for ph in PHASES if f"round/{ph}_seconds" in row)
    ci = (f" [{row['round/win_rate_vs_initial_ci_low']:.2f}, {row['round/win_rate_vs_initial_ci_high']:.2f}]"
          if "round/win_rate_vs_initial_ci_low" in row else "")
    return (f"round {row['round']}/{rounds}: win rate {f('round/win_rate_vs_initial')}{ci} vs the initial model, {f('round/win_rate_vs_previous')} "
            f"vs the previous round | judge mean {f('round/judge_mean')} (initial {f('round/judge_mean_initial')}) | "
            f"{f('round/length', '.1f')} tokens a reply (initial {f('round/length_initial', '.1f')}) | {row.get('round/pairs')} pairs, "
            f"{row.get('round/ties_dropped')} tied prompts dropped | {secs}")


def finish_iteration(cfg: Config, ctx: Context, parent, rows: list[dict], out_dir: Path, t_start: float, stopped: str | None) -> dict:
    """The output model (last or best round) copied to <output_dir>/model and logged to the parent run, the rounds table
    and the win-rate curve, the registry gate with registry.name, iterate_summary.json."""
    it = cfg.iterate
    key = "round/win_rate_vs_initial"
    best = max(rows, key=lambda x: x.get(key, float("-inf")) if math.isfinite(x.get(key, float("nan"))) else float("-inf"))
    chosen = best if it.select == "best" else rows[-1]
    model_dir = replace_dir(out_dir / "model", lambda tmp: shutil.copytree(chosen["model_dir"], tmp, dirs_exist_ok=True))
    summary = {"output_dir": str(out_dir), "tracking_uri": ctx.uri, "mlflow_parent_run_id": parent.run_id, "rounds": rows,
               "selected_round": chosen["round"], "select": it.select, "model_dir": str(model_dir), **({"stopped": stopped} if stopped else {})}
    parent.call("rounds.json", parent.client.log_table, data=pd.DataFrame(rows), artifact_file="rounds.json")
    plot_rounds(parent, rows, out_dir / "win_rate.png")
    parent.call("tag", parent.client.set_tag, "dpo_ray.selected_round", str(chosen["round"]))
    evaluation = None
    if cfg.registry.name:  # gated like any run: the offline data's held-out pairs against the initial model
        shared = sequence.shared_part(cfg, ctx, ("prepare", "reference", "evaluate"))
        evaluation = evaluate.evaluate_policy(cfg, ctx, shared.ref, model_dir, shared.baseline)
        log_evaluation(parent, evaluation, step=len(rows), judge_kind=cfg.eval.judge.kind)
    logged = log_model(cfg, parent, model_dir, out_dir)
    if evaluation is not None:
        summary["registry"] = sequence.registration(cfg, ctx, shared, parent, evaluation, logged, model_dir=model_dir)
    summary["wall_seconds"] = round(time.time() - t_start, 1)
    parent.flush()
    summary["mlflow_values_lost"] = parent.lost
    write_json_atomic(out_dir / "iterate_summary.json", summary)
    (out_dir / "config.yaml").write_text(masked_yaml(cfg))
    parent.call("iterate_summary.json", parent.client.log_artifact, str(out_dir / "iterate_summary.json"))
    parent.call("run status", parent.client.set_terminated, "FINISHED")
    log.info("iterate: %d round(s) in %.0f s; the output model is round %d's (%s) -> %s", len(rows), summary["wall_seconds"],
             chosen["round"], it.select, model_dir)
    return summary


def plot_rounds(tracker, rows: list[dict], path: Path) -> None:
    """win_rate.png: the win rates against the initial model and the previous round across rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (("round/win_rate_vs_initial", "vs the initial model"), ("round/win_rate_vs_previous", "vs the previous round")):
        pts = [(x["round"], x[key]) for x in rows if key in x]
        ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=label)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("round")
    ax.set_ylabel("judge's win rate")
    ax.set_xticks([x["round"] for x in rows])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    tracker.call("win_rate.png", tracker.client.log_artifact, str(path))


def summary_lines(summary: dict) -> list[str]:
    """The iteration's last words: a line per round, the output model, the MLflow parent run."""
    from .console import mlflow_lines

    rounds = summary["rounds"]
    lines = [round_line(r, len(rounds)) for r in rounds]
    if summary.get("stopped"):
        lines.append(f"stopped early: {summary['stopped']}")
    lines.append(f"model: {summary['model_dir']} (round {summary['selected_round']}, iterate.select={summary['select']})")
    if summary.get("registry"):
        lines.append(f"registry: {summary['registry'].get('decision')}")
    lines.append(f"summary: {Path(summary['output_dir']) / 'iterate_summary.json'}")
    return lines + mlflow_lines(summary.get("mlflow_parent_run_id"), summary.get("tracking_uri"))
