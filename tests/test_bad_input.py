"""Bad input rows on a real Ray Data prepare: every line ends in the data, the rejects file, or a count."""
import json

import pytest

from dpo_ray.config import load_config
from pipeline.artifacts import DataError

GOOD = {"chosen": [{"role": "user", "content": "What is an owl?"}, {"role": "assistant", "content": "A bird that sees at night."}],
        "rejected": [{"role": "user", "content": "What is an owl?"}, {"role": "assistant", "content": "Go away."}]}


def good(i: int) -> bytes:
    row = json.loads(json.dumps(GOOD))
    row["chosen"][0]["content"] = row["rejected"][0]["content"] = f"Question {i}: what is an owl?"
    return json.dumps(row).encode()


BAD_LINES = {  # reason code -> the raw line
    "invalid_json": b'{"chosen": [',
    "not_an_object": b'["chosen", "rejected"]',
    "missing_key": b'{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
    "bad_type": b'{"conversations": "q", "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}}',
    "unknown_layout": b'{"prompt": "q", "chosen": 5, "rejected": "b"}',
    "bad_message": b'{"chosen": [{"content": "q"}, {"role": "assistant", "content": "a"}], "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}',
    "role_order": b'{"chosen": [{"role": "assistant", "content": "q"}, {"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "q"}, {"role": "assistant", "content": "b"}]}',
    "no_final_reply": b'{"chosen": [{"role": "user", "content": "q"}], "rejected": [{"role": "user", "content": "q"}]}',
    "prompt_mismatch": b'{"chosen": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"}], "rejected": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]}',
    "empty_reply": b'{"prompt": "q", "chosen": "   ", "rejected": "b"}',
    "identical_replies": b'{"prompt": "q", "chosen": "same", "rejected": "same"}',
    "not_utf8": b'{"prompt": "q\xff\xfe", "chosen": "a", "rejected": "b"}',
    "no_reply_after_truncation": json.dumps({"prompt": "owl " * 400, "chosen": "a", "rejected": "b"}).encode(),
}


@pytest.fixture(scope="module")
def messy_file(tmp_path_factory):
    """A BOM, CRLF endings, blank lines, duplicates and one line of each bad kind among good rows."""
    lines = [b"\xef\xbb\xbf" + good(0)] + [good(i) for i in range(1, 40)]
    lines += [good(5), good(7)]  # exact duplicates of lines 6 and 8
    lines += [b"", b"   "]  # blank lines
    lines += list(BAD_LINES.values())
    path = tmp_path_factory.mktemp("messy") / "messy.jsonl"
    path.write_bytes(b"\r\n".join(lines) + b"\r\n")
    return path, lines


def prepare_with(tmp_path, cache_dir, path, *sets):
    from pipeline import prepare
    from pipeline.context import Context

    cfg = load_config(None, [f"cache_dir={cache_dir}", f"data.train=[{path}]", "data.max_length=64",
                             "data.max_prompt_length=64", "data.eval_fraction=0", *sets])
    return prepare.prepare_pairs(cfg, Context.for_models(cfg, str(cache_dir / "models" / "demo-tiny-llama-v1"), rejects_file=tmp_path / "rejects.jsonl"))


def test_every_line_accounted_for(ray_local, demo_model, cache_dir, messy_file, tmp_path):
    path, lines = messy_file
    p = prepare_with(tmp_path, cache_dir, path, "data.max_bad_fraction=0.5")
    s = p.stats
    assert s["blank_lines"] == 2 and s["rows_read"] == len(lines) - 2
    assert s["rows_used"] == 40 and s["duplicates"] == 2  # BOM and CRLF rows are good rows
    assert s["rows_rejected"] == len(BAD_LINES) and s["rows_read"] == s["rows_used"] + s["rows_rejected"] + s["duplicates"]
    assert s["rejects_by_reason"] == {k: 1 for k in BAD_LINES}
    rejects = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    first_bad = len(lines) - len(BAD_LINES) + 1
    for i, (reason, raw) in enumerate(BAD_LINES.items()):
        r = rejects[i]
        assert (r["source"], r["line"], r["reason"]) == (str(path), first_bad + i, reason)
        assert r["detail"] and len(r["raw"]) <= 500 and r["raw"] == raw.decode("utf-8", "replace")[:500]
    import ray

    ids = sorted(ray.data.read_parquet(str(p.parts[0].path / "train")).to_pandas().row_id, key=lambda x: int(x.split(":")[1]))
    assert ids == [f"messy.jsonl:{i}" for i in range(1, 41)]  # first copies kept, duplicates (41, 42) dropped


def test_too_many_bad_rows_stop_before_model_work(ray_local, demo_model, cache_dir, messy_file, tmp_path):
    path, lines = messy_file
    with pytest.raises(DataError) as e:
        prepare_with(tmp_path, cache_dir, path)  # default max_bad_fraction 0.01
    msg = str(e.value)
    assert f"{len(BAD_LINES)} of {len(lines) - 2} rows rejected" in msg and "data.max_bad_fraction=0.01" in msg
    assert str(tmp_path / "rejects.jsonl") in msg and "top reasons:" in msg
    assert len((tmp_path / "rejects.jsonl").read_text().splitlines()) == len(BAD_LINES)  # the report is written anyway
