"""Shared fixtures: a real local Ray runtime (2 CPUs), a real MLflow sqlite store, the demo model built once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from pipeline.runtime import free_port  # noqa: F401  (test_cluster and test_registry import it from here)
from pipeline.storage import Location

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def demo_model(cache_dir) -> str:
    from dpo_ray.model import resolve_model

    return resolve_model("demo:tiny-llama", cache_dir)


@pytest.fixture(scope="session")
def demo_tokenizer(demo_model):
    from dpo_ray.model import load_tokenizer

    return load_tokenizer(demo_model)


@pytest.fixture(scope="session")
def minimind_tokenizer():
    path = SHARED / "minimind_tokenizer"
    if not path.exists():
        pytest.skip("../shared/data/minimind_tokenizer is absent")
    from dpo_ray.model import load_tokenizer

    return load_tokenizer(str(path))


def start_local_ray(num_cpus: int = 2):
    """A Ray runtime of the tests' own, as the CLI starts one (address="local"): a plain ray.init() would attach to a
    `ray start` cluster on this machine, or to the stale address a killed one left in <tmp>/ray/ray_current_cluster."""
    import ray

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return ray


@pytest.fixture(scope="session")
def ray_local():
    ray = start_local_ray()
    yield ray
    ray.shutdown()


def build_qwen2(out: Path, tokenizer_dir: str, hidden: int = 256, layers: int = 4) -> str:
    """A small Qwen2-shaped model (GQA, q/k/v bias, tied head) with random weights (seed 0) and the given tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def small_pairs(tmp_path_factory) -> Path:
    """The first 238 demo pairs and 2 broken lines (under the 1% bad-row limit) as a JSONL file."""
    from dpo_ray.demo import DEMO_DATA

    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    with open(DEMO_DATA, encoding="utf-8") as f:
        lines = [line for _, line in zip(range(238), f)]
    lines.insert(100, '{"prompt": "q", "chosen": "same", "rejected": "same"}\n')
    lines.insert(200, '{"chosen": [\n')
    path.write_text("".join(lines))
    return path


def small_config(tmp_path: Path, cache_dir: Path, data: Path, **overrides) -> list[str]:
    """--set style overrides for a run that takes seconds: tiny data, few steps, its own MLflow sqlite store."""
    sets = {
        "output_dir": str(tmp_path / "out"), "cache_dir": str(cache_dir), "data.train": json.dumps([str(data)]),
        "data.max_length": "96", "data.eval_fraction": "0.1", "train.batch_size_per_worker": "4", "train.max_steps": "6",
        "train.checkpoint_every": "3", "train.log_every": "2", "train.lr": "3e-3", "reference.batch_size": "32",
        "mlflow.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        # the random-weights demo model (configs/demo.yaml starts from its SFT'd copy) and no generations: seconds, not minutes
        "model.policy": "demo:tiny-llama", "eval.generate.prompts": "0", "train.nll_weight": "0",
    }
    sets.update(overrides)
    return [f"{k}={v}" for k, v in sets.items()]


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with a sqlite backend and a local artifact root."""

    def __init__(self, root: Path, port: int | None = None):
        self.root, self.port = root, port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout: float = 90) -> "MlflowServer":
        import subprocess
        import sys
        import time
        import urllib.request

        mlflow_bin = str(Path(sys.executable).parent / "mlflow")
        self.proc = subprocess.Popen(
            [mlflow_bin, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}", "--artifacts-destination", str(self.root / "artifacts")],
            stdout=subprocess.DEVNULL, stderr=open(self.root / "server.log", "ab"), start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-2000:]
        raise TimeoutError(f"mlflow server did not answer on {self.uri}")

    def stop(self) -> None:
        import os
        import signal

        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its worker processes
            self.proc.wait(timeout=30)


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path).start()
    yield server
    server.stop()


BUCKET = "dpo-cache"


class S3Server:
    """moto_server on a free port. The first three requests may be unsigned (they create an IAM user, its policy and
    access key); every later one must be signed with that key."""

    def __init__(self, log: Path):
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        moto = str(Path(sys.executable).parent / "moto_server")
        self.proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(self.port)], stdout=subprocess.DEVNULL,
                                     stderr=open(log, "ab"), start_new_session=True,
                                     env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"})
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://{self.endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                assert self.proc.poll() is None and time.time() < deadline, log.read_text()[-2000:]
                time.sleep(0.3)
        import boto3

        iam = boto3.client("iam", endpoint_url=f"http://{self.endpoint}", region_name="us-east-1",
                           aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        iam.create_user(UserName="dpo-ray")
        iam.put_user_policy(UserName="dpo-ray", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="dpo-ray")["AccessKey"]
        self.env = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        self.fs = pafs.S3FileSystem(access_key=key["AccessKeyId"], secret_key=key["SecretAccessKey"], region="us-east-1",
                                    endpoint_override=self.endpoint, scheme="http", allow_bucket_creation=True)
        self.fs.create_dir(BUCKET)

    def uri(self, prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}?endpoint_override={self.endpoint}&scheme=http"

    def loc(self, prefix: str) -> Location:
        return Location(self.fs, f"{BUCKET}/{prefix}", "s3")

    def at(self, shown: str) -> Location:
        """A location from how a summary shows it (s3://bucket/path)."""
        return Location(self.fs, shown.removeprefix("s3://"), "s3")

    def listing(self, prefix: str) -> dict:
        infos = self.fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
        return {i.path: (i.size, i.mtime) for i in infos if i.type == pafs.FileType.File}

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server this fixture started (its own process group)
            self.proc.wait(timeout=30)
