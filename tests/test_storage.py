"""cache_dir as a pyarrow.fs URI: file:// in process, and s3:// against a real S3-protocol server (moto_server on
127.0.0.1, with IAM authentication on, so requests without the right credentials are refused: the Ray workers that
write the caches must have been given them)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import BUCKET, S3Server, small_config
from dpo_ray.config import load_config
from pipeline.artifacts import DONE, complete_dir, completed
from pipeline.reference import split_dir
from pipeline.storage import Location, model_root, open_location, redact

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log")
    yield server
    server.stop()


def read_split(loc: Location, split: str) -> pa.Table:
    d = split_dir(loc, split)
    return pq.read_table(d.path, filesystem=d.fs).sort_by("row_id")


def test_locations_and_uris(tmp_path):
    assert str(open_location(f"file://{tmp_path}/c")) == str(tmp_path / "c") and open_location(f"file://{tmp_path}").is_local
    assert str(open_location("rel/c")) == str(Path("rel/c").resolve())
    assert redact("s3://AKIA:secret@bucket/p") == "s3://***@bucket/p" and redact("s3://bucket/p?x=a@b") == "s3://bucket/p?x=a@b"
    from dpo_ray.config import masked

    assert masked({"cache_dir": "s3://AKIA:secret@bucket/p", "output_dir": "runs/a@b"}) == {"cache_dir": "s3://***@bucket/p", "output_dir": "runs/a@b"}
    assert model_root(str(tmp_path / "c"), str(tmp_path / "out")) == tmp_path / "c"
    assert model_root(f"file://{tmp_path}/c", str(tmp_path / "out")) == tmp_path / "c"
    # an object-store cache keeps models local, under output_dir
    assert model_root("s3://b/c?endpoint_override=127.0.0.1:9&scheme=http", str(tmp_path / "out")) == tmp_path / "out"


def test_completion_marker_on_an_object_store(s3):
    final = s3.loc("unit/part")
    assert completed(final) is None
    with pytest.raises(RuntimeError):
        with complete_dir(final) as d:
            (d / "a.txt").write_text("half")
            raise RuntimeError("killed mid-write")
    assert completed(final) is None  # what the failed attempt wrote is never taken for a finished directory
    with complete_dir(final) as d:
        (d / "a.txt").write_text("whole")
    data = completed(final)
    first, manifest = (final / DONE).read_text().split("\n", 1)
    assert data.parent.path == final.path and data.name.startswith("attempt-") and first == data.name
    assert json.loads(manifest) == {"files": {"a.txt": {"size": 5}}}  # the files the marker vouches for
    assert (data / "a.txt").read_text() == "whole"
    with complete_dir(final) as d2:  # a second writer of the same key: its own attempt, dropped since the key is complete
        (d2 / "a.txt").write_text("again")
    assert completed(final) == data and (data / "a.txt").read_text() == "whole" and not d2.is_dir()


def test_damaged_files_on_an_object_store_are_named_and_not_used(s3, caplog):
    import logging

    final = s3.loc("unit/damaged")
    with complete_dir(final) as d:
        pq.write_table(pa.table({"row_id": [f"r{i}" for i in range(100)]}), f"{d.path}/part.parquet", filesystem=s3.fs)
    part = completed(final) / "part.parquet"
    assert json.loads((final / DONE).read_text().split("\n", 1)[1])["files"]["part.parquet"]["rows"] == 100
    part.write_bytes(part.read_bytes()[:100])  # cut short
    with caplog.at_level(logging.WARNING, "dpo_ray"):
        assert completed(final) is None
    assert f"cache: s3://{part.path} is damaged (100 bytes" in caplog.text
    part.remove()
    caplog.clear()
    with caplog.at_level(logging.WARNING, "dpo_ray"):
        assert completed(final) is None
    assert f"cache: s3://{part.path} is missing" in caplog.text
    with complete_dir(final) as d:  # recomputed: a new attempt, which the marker now vouches for
        pq.write_table(pa.table({"row_id": ["a"]}), f"{d.path}/part.parquet", filesystem=s3.fs)
    assert completed(final) is not None and completed(final).name != part.parent.name


def stage_args(tmp: Path, cache: str, data: Path) -> list[str]:
    return small_config(tmp, cache, data, **{"data.eval_fraction": "0"})  # one split: each scored split costs an actor start


@pytest.fixture(scope="module")
def file_run(tmp_path_factory, ray_local, small_pairs, demo_model):
    """prepare + reference in process, cache_dir a file:// URI; the model built as for any local cache."""
    from pipeline.run import run

    tmp = tmp_path_factory.mktemp("file_uri")
    (tmp / "cache" / "models").mkdir(parents=True)
    os.symlink(demo_model, tmp / "cache" / "models" / Path(demo_model).name)
    cfg = load_config(str(ROOT / "configs/demo.yaml"), stage_args(tmp, f"file://{tmp}/cache", small_pairs))
    first = run(cfg, stages=("prepare", "reference"))
    return tmp, cfg, first, run(cfg, stages=("prepare", "reference"))


@pytest.mark.slow
def test_file_uri_cache(file_run):
    tmp, _, first, again = file_run
    ref = Path(first["reference_cache"]["path"])
    assert ref.parent == tmp / "cache" / "reference" and (ref / DONE).read_text() == "ok\n"  # local: renamed into place
    assert {p.name for p in ref.iterdir()} == {"train", "key.json", DONE}  # eval_fraction 0: no eval split
    assert Path(first["data"]["files"][0]["prepared"]).parent == tmp / "cache" / "prepared"
    assert not first["data"]["hit"] and not first["reference_cache"]["hit"]
    assert again["data"]["hit"] and again["reference_cache"]["hit"] and again["reference_cache"]["path"] == str(ref)


def test_cache_with_wrong_credentials_is_refused_up_front(s3, monkeypatch, tmp_path):
    from pipeline.context import SetupError, check_cache_dir

    for k, v in {**s3.env, "AWS_ACCESS_KEY_ID": "AKIAWRONG"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SetupError, match=rf"cache_dir s3://{BUCKET}/nocreds\?endpoint_override=\S+ is not writable .*credentials"):
        check_cache_dir(s3.uri("nocreds"))
    check_cache_dir(f"file://{tmp_path}/cache")  # a writable local one passes


def cli(stage: str, sets: list[str], env: dict) -> tuple[int, dict | None, str]:
    cmd = [str(Path(sys.executable).parent / "dpo-ray"), stage, "configs/demo.yaml", "--json"] + [a for s in sets for a in ("--set", s)]
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI") and not k.startswith("AWS_")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env={**base, **env})
    out = proc.stdout
    summary = json.loads(out[out.rindex("\n{\n") + 1:] if "\n{\n" in out else out[out.index("{"):]) if proc.returncode == 0 else None
    return proc.returncode, summary, proc.stderr


def same_data(s3_loc: Location, local: Path, splits=("train",)) -> None:
    """The same rows, columns and types; log-probs equal up to batching noise (two scoring runs, other batches: in bf16
    autocast, where the CPU has it, a batch's shape moves a log-prob by up to ~1e-4 of its size, evaluate's
    BF16_TIE_RELATIVE; measured 5.8e-5 between these two runs)."""
    from pipeline.evaluate import BF16_TIE_RELATIVE

    for split in splits:
        want = pq.read_table(local / split).sort_by("row_id")
        got = read_split(s3_loc, split)
        assert got.schema.remove_metadata() == want.schema.remove_metadata() and got.num_rows == want.num_rows > 0, split
        for name in got.column_names:
            if pa.types.is_floating(got.schema.field(name).type):
                assert got[name].to_numpy() == pytest.approx(want[name].to_numpy(), rel=BF16_TIE_RELATIVE, abs=1e-4), name
            else:
                assert got[name].equals(want[name]), name


@pytest.mark.slow
def test_s3_cache_hit_partial_rerun_and_same_data(s3, file_run, tmp_path, small_pairs, monkeypatch):
    from pipeline.run import run

    _, _, local_run, _ = file_run
    sets = stage_args(tmp_path, s3.uri("cache"), small_pairs)  # model.policy: demo:tiny-llama, built under output_dir

    rc, first, err = cli("reference", sets, s3.env)  # Ray workers write the Parquet: they got the credentials too
    assert rc == 0, err[-4000:]
    assert (tmp_path / "out" / "models" / "demo-tiny-llama-v1" / "config.json").is_file()
    assert not first["data"]["hit"] and not first["reference_cache"]["hit"]
    ref_path = first["reference_cache"]["path"]
    assert ref_path.startswith(f"s3://{BUCKET}/cache/reference/") and first["data"]["files"][0]["prepared"].startswith(f"s3://{BUCKET}/cache/prepared/")
    # the same keys as the file:// run (same data, tokenizer, lengths and reference weights) and the same rows
    assert first["data"]["key"] == local_run["data"]["key"] and first["reference_cache"]["key"] == local_run["reference_cache"]["key"]
    ref = s3.at(ref_path)
    prep = s3.at(first["data"]["files"][0]["prepared"])  # the attempt that the part's marker names
    assert prep.name.startswith("attempt-") and completed(prep.parent).path == prep.path
    assert not any(f.name.endswith(".parquet") for f in (prep / "eval").children())  # eval_fraction 0: an empty split
    same_data(ref, Path(local_run["reference_cache"]["path"]))
    same_data(prep, Path(local_run["data"]["files"][0]["prepared"]))
    assert (prep / "rejects.jsonl").read_bytes() == (Path(local_run["data"]["files"][0]["prepared"]) / "rejects.jsonl").read_bytes()

    # the same run again (in process: a hit runs no Ray task, only the driver reads): a cache hit, nothing written
    before = s3.listing("cache")
    with monkeypatch.context() as env:
        for k, v in s3.env.items():
            env.setenv(k, v)
        again = run(load_config(str(ROOT / "configs/demo.yaml"), sets), stages=("prepare", "reference"))
    assert again["data"]["hit"] and again["reference_cache"]["hit"] and again["reference_cache"]["path"] == ref_path
    assert s3.listing("cache") == before

    # partial directories, as an interrupted run leaves them (written by hand here): without a marker a directory is
    # not complete, whatever it holds, and the rerun redoes it
    (prep.parent / DONE).remove()
    ref.remove()
    pq.write_table(pa.table({"row_id": ["junk:1"], "ref_chosen_logps": [0.0]}), f"{ref.path}/train/junk.parquet", filesystem=s3.fs)
    (ref / "key.json").write_text("{}\n")
    assert completed(prep.parent) is None and completed(ref) is None
    rc, redone, err = cli("reference", sets, s3.env)
    assert rc == 0, err[-4000:]
    assert not redone["data"]["hit"] and not redone["reference_cache"]["hit"] and redone["reference_cache"]["path"] == ref_path
    new_prep = completed(prep.parent)
    assert new_prep is not None and new_prep.name != prep.name and redone["data"]["files"][0]["prepared"] == str(new_prep)
    assert completed(ref) is not None and completed(ref / "train").name.startswith("attempt-")
    same_data(ref, Path(local_run["reference_cache"]["path"]))  # the junk file beside the attempt is never read
    same_data(new_prep, Path(local_run["data"]["files"][0]["prepared"]))
    assert redone["data"]["rows_read"] == first["data"]["rows_read"] == 240


@pytest.mark.slow
def test_train_checkpoints_to_an_object_store(s3, file_run, tmp_path, small_pairs):
    """train.storage_path as an s3:// URI: Ray Train writes its checkpoints there and the model is exported from them.
    The cache is file_run's (its reference log-probs are a hit: this test is about the checkpoints)."""
    sets = stage_args(tmp_path, f"file://{file_run[0]}/cache", small_pairs) + [f"train.storage_path={s3.uri('ray')}"]
    rc, summary, err = cli("train", sets, s3.env)
    assert rc == 0, err[-4000:]
    assert summary["train"]["steps"] == 6 and summary["reference_cache"]["hit"]
    weights = [p for p in s3.listing("ray") if p.endswith("/model.safetensors")]
    ckpts = {Path(p).parent.name for p in weights}
    assert len(ckpts) == 2 and all(c.startswith("checkpoint_") for c in ckpts)  # steps 3 and 6 (num_to_keep=2)
    assert (Path(summary["model_dir"]) / "model.safetensors").is_file()


def test_train_rows_read_by_index_from_an_object_store(s3):
    """The train workers' reader over s3:// files: the same rows as the whole table, in row_id order, without the dropped ones."""
    import numpy as np

    from dpo_ray.rows import RowIndex, RowReader
    from test_streaming import random_pairs

    full = random_pairs(40, 5)
    files = []
    for i, part in enumerate((full.slice(20), full.slice(0, 20))):  # files in no particular row order
        path = f"{BUCKET}/unit/rows/p{i}.parquet"
        pq.write_table(part, path, filesystem=s3.fs, row_group_size=8)
        files.append((s3.fs, path))
    index = RowIndex(files, ["f.jsonl:3"])
    want = full.filter(pa.compute.not_equal(full["row_id"], "f.jsonl:3")).sort_by("row_id")
    positions = np.array([38, 0, 17, 5, 5 + 1])
    assert len(index) == 39 and RowReader(index).read(positions).to_pylist() == want.take(pa.array(positions)).to_pylist()
