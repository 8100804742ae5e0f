"""The data people have: six layouts detected per row, JSON Lines / JSON arrays / Parquet / gzip read through Ray Data
with record numbers, column mapping, plain-text pairs; each masked to exactly the final reply + EOS; a file that cannot be
what it claims is one error line. The end-to-end run (every layout and type trained on, MLflow's datasets, system
metrics and eval table) is in test_formats_e2e.py."""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, SHARED, small_config
from dpo_ray.data import Reject, to_pair, tokenize_pair, validate

SYS = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "What is an owl?"}
GOOD, BAD = "A bird that hunts at night.", "A kind of fish."
asst = lambda text: {"role": "assistant", "content": text}
LAYOUT_ROWS = {  # one row of each layout, as the hub and the trainers people come from write them
    "standard": {"prompt": USER["content"], "chosen": GOOD, "rejected": BAD},
    "standard_implicit": {"chosen": "Q: What is an owl?\nA: Birds hunt at night.", "rejected": "Q: What is an owl?\nA: Fish swim."},
    "conversational": {"prompt": [SYS, USER], "chosen": [asst(GOOD)], "rejected": [asst(BAD)]},
    "conversational_implicit": {"chosen": [SYS, USER, asst(GOOD)], "rejected": [SYS, USER, asst(BAD)]},
    "ultrafeedback": {"prompt": USER["content"], "prompt_id": "0f3a", "chosen": [USER, asst(GOOD)], "rejected": [USER, asst(BAD)],
                      "score_chosen": 8.5, "score_rejected": 3.0},
    "sharegpt": {"conversations": [{"from": "system", "value": SYS["content"]}, {"from": "human", "value": USER["content"]}],
                 "chosen": {"from": "gpt", "value": GOOD}, "rejected": {"from": "gpt", "value": BAD}},
}
# what each layout scores (the final reply) and the prompt turns it renders (None: plain text, its prompt string)
EXPECTED = {
    "standard": (GOOD, BAD, [USER]),
    "standard_implicit": (" Birds hunt at night.", " Fish swim.", None),
    "conversational": (GOOD, BAD, [SYS, USER]),
    "conversational_implicit": (GOOD, BAD, [SYS, USER]),
    "ultrafeedback": (GOOD, BAD, [USER]),
    "sharegpt": (GOOD, BAD, [SYS, USER]),
}


def masked(tok, ids, mask, want=1):
    return tok.decode([i for i, m in zip(ids, mask) if m == want], skip_special_tokens=False)


def check_row(tok, row, chosen_reply, rejected_reply, prompt_text):
    """The mask is exactly the final reply + EOS; the prompt is shared and is what the template (or the text) puts first."""
    for name, reply in (("chosen", chosen_reply), ("rejected", rejected_reply)):
        ids, mask = row[f"{name}_input_ids"], row[f"{name}_loss_mask"]
        first = mask.index(1)
        assert all(mask[first:]) and not any(mask[:first]) and ids[-1] == tok.eos_token_id
        assert masked(tok, ids, mask) == reply + tok.eos_token
        assert tok.decode(ids[:first], skip_special_tokens=False) == prompt_text
    assert row["chosen_input_ids"][: row["prompt_tokens"]] == row["rejected_input_ids"][: row["prompt_tokens"]]


@pytest.mark.parametrize("tokenizer", ["demo_tokenizer", "minimind_tokenizer"])
@pytest.mark.parametrize("layout", list(LAYOUT_ROWS))
def test_each_layout_is_detected_and_masks_the_final_reply(layout, tokenizer, request):
    tok = request.getfixturevalue(tokenizer)
    pair = to_pair(json.loads(json.dumps(LAYOUT_ROWS[layout])))
    validate(pair)
    assert pair.layout == layout
    chosen_reply, rejected_reply, prompt_turns = EXPECTED[layout]
    if prompt_turns is None:  # plain text: tokenized as it is, the common start is the prompt
        bos = tok.bos_token if tok("a", add_special_tokens=True)["input_ids"][:1] == [tok.bos_token_id] else ""
        prompt_text = bos + "Q: What is an owl?\nA:"
    else:
        prompt_text = tok.apply_chat_template(prompt_turns, tokenize=False, add_generation_prompt=True)
    check_row(tok, tokenize_pair(tok, pair, max_length=512, prompt_budget=256), chosen_reply, rejected_reply, prompt_text)


def test_without_the_chat_template_strings_are_tokenized_as_they_are(minimind_tokenizer):
    tok = minimind_tokenizer
    pair = to_pair(LAYOUT_ROWS["standard"], chat_template=False)
    assert pair.text == (USER["content"], GOOD, BAD)
    row = tokenize_pair(tok, pair, max_length=512, prompt_budget=256)
    check_row(tok, row, GOOD, BAD, USER["content"])
    assert row["chosen_input_ids"] == tok(USER["content"])["input_ids"] + tok(GOOD)["input_ids"] + [tok.eos_token_id]
    assert "<|im_start|>" not in tok.decode(row["chosen_input_ids"])


def test_column_mapping_gives_the_standard_pair(demo_tokenizer):
    cols = {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}
    row = {"question": USER["content"], "response_j": GOOD, "response_k": BAD, "score": 3}
    assert to_pair(row, cols) == to_pair(LAYOUT_ROWS["standard"])
    with_system = to_pair({**row, "sys": SYS["content"]}, {**cols, "system": "sys"})
    assert with_system == to_pair(LAYOUT_ROWS["conversational"]) and with_system.layout == "conversational"


@pytest.mark.parametrize("row,reason,words", [
    ({**LAYOUT_ROWS["ultrafeedback"], "prompt": "Something else?"}, "prompt_mismatch", "differs from every user turn"),
    ({"prompt": "q", "chosen": 1, "rejected": 2}, "unknown_layout", "tried: prompt/chosen/rejected"),
    ({"instruction": "q", "output": ["a", "b"]}, "missing_key", "tried: prompt/chosen/rejected"),
    ({"chosen": "Yes.", "rejected": "No."}, "no_prompt", "share no common start"),
    ({"prompt": [USER], "chosen": [asst(GOOD)], "rejected": [{"role": "user", "content": "x"}]}, "no_final_reply", "assistant reply"),
])
def test_rows_that_fit_no_layout_are_rejects_with_their_reason(row, reason, words):
    with pytest.raises(Reject) as e:
        validate(to_pair(row))
    assert e.value.reason == reason and words in e.value.detail


# ------------------------------------------------------------------------------------------------ file types, with Ray
def pairs_for(n: int) -> list[dict]:
    """n UltraFeedback-style rows (nested message lists and extra columns, as a hub Parquet file holds them); row 5 is
    bad (identical replies)."""
    rows = []
    for i in range(n):
        q = f"Question number {i}: what is {i} plus {i}?"
        rej = f"It is {2 * i}." if i == 4 else f"It is {2 * i + 1}."
        rows.append({"prompt": q, "prompt_id": f"id{i}", "chosen": [{"role": "user", "content": q}, asst(f"It is {2 * i}.")],
                     "rejected": [{"role": "user", "content": q}, asst(rej)], "score_chosen": 9.0, "score_rejected": 2.0})
    return rows


def write_all_types(directory: Path, rows: list[dict]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    array = json.dumps(rows, indent=2)  # pretty-printed, as LLaMA-Factory ships its files
    files = {"a.jsonl": lines, "b.json": array, "c.jsonl": array, "e.jsonl.gz": lines, "f.json.gz": array}
    for name, text in files.items():
        data = text.encode()
        (directory / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    pq.write_table(pa.Table.from_pylist(rows), directory / "d.parquet", row_group_size=7)  # several row groups
    return sorted(directory.iterdir())


def prepare_in(cfg, model, tmp_path):
    """The prepare stage over `model`'s tokenizer, its rejects copied to tmp_path."""
    from pipeline.context import Context
    from pipeline.prepare import prepare_pairs

    return prepare_pairs(cfg, Context.for_models(cfg, model, rejects_file=tmp_path / "rejects.jsonl"))


def load(tmp_path, cache_dir, data, **sets):
    from dpo_ray.config import load_config

    return load_config(ROOT / "configs" / "demo.yaml", small_config(tmp_path, cache_dir, data, **sets))


def test_every_file_type_gives_the_same_rows_with_record_numbers(tmp_path, cache_dir, demo_model, ray_local, monkeypatch):
    from pipeline import sources

    monkeypatch.setattr(sources, "CHUNK_BYTES", 1000)  # a.jsonl in ~10 read tasks: its line numbers must still be the file's
    files = write_all_types(tmp_path / "data", pairs_for(30))
    cfg = load(tmp_path, cache_dir, tmp_path / "data", **{"data.eval_fraction": "0", "data.max_bad_fraction": "0.05"})
    prep = prepare_in(cfg, demo_model, tmp_path)
    assert [p.file.name for p in prep.parts] == [f.name for f in files]
    per_file = prep.stats["per_file"]
    assert [s["rows_read"] for s in per_file] == [30] * 6 and [s["rows_rejected"] for s in per_file] == [1] * 6
    assert all(s["layouts"] == {"ultrafeedback": 29} for s in per_file)
    assert prep.stats["rows_used"] == 29 and prep.stats["duplicates"] == 29 * 5  # the same pairs in six files: kept once
    rejects = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [(Path(r["source"]).name, r["line"], r["reason"]) for r in rejects] == [(f.name, 5, "identical_replies") for f in files]
    # each file's own prepared rows: the same ids and masks whatever the file type
    tables = [pq.read_table(p.path.path + "/train").sort_by("row_id") for p in prep.parts]
    ids = lambda t: sorted(zip(t["chosen_input_ids"].to_pylist(), t["rejected_input_ids"].to_pylist(), t["chosen_loss_mask"].to_pylist()))
    assert all(ids(t) == ids(tables[0]) and t.num_rows == 29 for t in tables)
    assert sorted(tables[3]["row_id"].to_pylist()) == sorted(f"d.parquet:{i}" for i in range(1, 31) if i != 5)


def test_json_lines_read_in_chunks_keep_every_line_and_its_number(tmp_path, ray_local, monkeypatch):
    """A JSON Lines file is read CHUNK_BYTES per task (a line that crosses a boundary belongs to the chunk it starts in):
    the rows are those of the file read whole, BOM, CRLF, blank lines and a last line without a newline included."""
    from pipeline import sources

    lines = [b'\xef\xbb\xbf{"a": 0}', b"", b'{"a": 2}\r', *[b'{"a": %d, "pad": "%s"}' % (i, b"x" * (i % 23)) for i in range(3, 300)],
             b"", b"", b'{"last": true}']
    data = b"\n".join(lines)  # no newline at the end
    path = tmp_path / "p.jsonl"
    path.write_bytes(data)
    whole = sources.split_records({"bytes": data, "path": str(path)}, "jsonl")
    assert len(whole) == len(lines) and whole[0]["raw"] == b'{"a": 0}' and whole[2]["raw"] == b'{"a": 2}'
    for chunk in (7, 64, 1000, len(data), 1 << 20):
        monkeypatch.setattr(sources, "CHUNK_BYTES", chunk)
        got = sorted(sources.read(path, "jsonl").take_all(), key=lambda r: r["line_no"])
        assert [(r["line_no"], bytes(r["raw"])) for r in got] == [(r["line_no"], r["raw"]) for r in whole], chunk


def test_each_layout_in_a_file_of_its_own_is_prepared_with_its_mask(tmp_path, cache_dir, demo_model, demo_tokenizer, ray_local):
    """Six small files, one layout each, through the Ray Data prepare: every row kept, its layout counted, and the
    prepared mask decodes to exactly the final reply + EOS."""
    tok, d = demo_tokenizer, tmp_path / "layouts"
    d.mkdir()
    for layout, row in LAYOUT_ROWS.items():
        rows = [json.loads(json.dumps(row).replace("owl", f"{layout} owl {i}")) for i in range(4)]  # distinct pairs, in all files
        (d / f"{layout}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prep = prepare_in(load(tmp_path, cache_dir, d, **{"data.eval_fraction": "0"}), demo_model, tmp_path)
    for part, counts in zip(prep.parts, prep.stats["per_file"]):
        layout = part.file.name.removesuffix(".jsonl")
        assert counts["layouts"] == {layout: 4} and counts["rows_used"] == 4 and counts["rows_rejected"] == 0
        chosen_reply, rejected_reply, _ = EXPECTED[layout]
        table = pq.read_table(part.path.path + "/train")
        for name, reply in (("chosen", chosen_reply), ("rejected", rejected_reply)):
            for ids, mask in zip(table[f"{name}_input_ids"].to_pylist(), table[f"{name}_loss_mask"].to_pylist()):
                assert masked(tok, ids, mask) == reply + tok.eos_token, (layout, name)


def test_a_file_that_is_not_what_it_claims_is_one_error(tmp_path, cache_dir, demo_model, ray_local):
    from pipeline.artifacts import DataError

    d = tmp_path / "data"
    d.mkdir()
    cases = {
        "pretty.json": (json.dumps(LAYOUT_ROWS["standard"], indent=2), "is not JSON Lines: line 1 is '{' (one pretty-printed JSON document?"),
        "table.jsonl": ("prompt,chosen,rejected\nq,a,b\n", "is not JSON Lines: line 1 is 'prompt,chosen,rejected'"),
        "fake.parquet": ('{"prompt": "q"}\n', "is not Parquet"),
        "cut.json": (json.dumps(pairs_for(20), indent=2)[:-300], "cut.json is not valid JSON"),  # an array cut short: seen when read
        "zipped.jsonl.gz": ("not gzip at all", "is not a readable gzip file"),
    }
    for name, (text, words) in cases.items():
        (d / name).write_text(text)
        cfg = load(tmp_path, cache_dir, d / name)
        with pytest.raises(DataError) as e:
            prepare_in(cfg, demo_model, tmp_path)
        assert words in str(e.value) and str(e.value).count("\n") == 0, (name, str(e.value))


def test_column_mapping_names_the_columns_a_file_has(tmp_path, cache_dir, demo_model):
    from pipeline import prepare
    from pipeline.artifacts import DataError

    path = tmp_path / "se.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "q", "response_j": "a", "response_k": "b"}]), path)
    cfg = load(tmp_path, cache_dir, path, **{"data.columns": "{prompt: question, chosen: response_j, rejected: answer}"})
    with pytest.raises(DataError) as e:
        prepare.check_files(cfg, [path])
    assert str(e.value) == "data.columns: se.parquet has no column rejected: answer; its columns are question, response_j, response_k"


def test_cli_stops_on_a_file_that_is_not_json_lines_before_any_work(tmp_path, cache_dir):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(LAYOUT_ROWS["standard"], indent=2))
    sets = small_config(tmp_path, cache_dir, path)
    cmd = [str(Path(sys.executable).parent / "dpo-ray"), "prepare", "configs/demo.yaml"] + [a for s in sets for a in ("--set", s)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith(f"dpo-ray: error: data: {path} is not JSON Lines: line 1 is '{{'")
    assert "starting a local Ray runtime" not in proc.stderr  # found before Ray started


def test_the_test_runtime_starts_beside_a_stale_cluster_address(tmp_path):
    """A `ray start` head that was killed leaves <tmp>/ray/ray_current_cluster; plain ray.init(num_cpus=...) reads it and
    fails, the tests' start_local_ray (the CLI's way) starts a runtime of its own."""
    import tempfile

    root = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # RAY_TMPDIR: a short path for Ray's sockets
    (Path(root) / "ray").mkdir()
    (Path(root) / "ray" / "ray_current_cluster").write_text("127.0.0.1:6399\n")  # nobody listens there
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": root}
    code = ("import sys; sys.path.insert(0, 'tests'); import ray, conftest\n"
            "if sys.argv[1] == 'plain': ray.init(num_cpus=2, include_dashboard=False)\n"
            "else: conftest.start_local_ray()\n"
            "print('CPUS', ray.cluster_resources()['CPU']); ray.shutdown()\n")
    try:
        runs = {how: subprocess.run([sys.executable, "-c", code, how], capture_output=True, text=True, cwd=ROOT, env=env, timeout=180)
                for how in ("plain", "tests")}
    finally:
        subprocess.run(["rm", "-rf", root])
    assert runs["plain"].returncode != 0 and "existing cluster" in runs["plain"].stderr  # the state is recreated
    assert runs["tests"].returncode == 0 and "CPUS 2.0" in runs["tests"].stdout, runs["tests"].stderr[-2000:]
