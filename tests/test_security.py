"""Security defaults: no unpickling of arbitrary objects, no remote code unless asked, secrets masked, loopback binds."""
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from dpo_ray.config import Config
from dpo_ray.model import load_model

ROOT = Path(__file__).resolve().parent.parent


class Payload:
    def __reduce__(self):
        return (Path("/tmp/dpo-ray-pwned").write_text, ("pwned",))


def test_checkpoint_optimizer_state_refuses_pickled_code(tmp_path, demo_model):
    from dpo_ray import checkpoint

    model = load_model(demo_model)
    opt = torch.optim.AdamW(model.parameters())
    checkpoint.save(tmp_path, model, model, opt, {"step": 1}, rank=0, fsdp=False, lora=False, final=False)
    assert checkpoint.load(tmp_path, model, model, opt, fsdp=False, lora=False)["step"] == 1  # a real checkpoint loads
    torch.save({"state": {}, "param_groups": [], "evil": Payload()}, tmp_path / "optimizer.pt")
    Path("/tmp/dpo-ray-pwned").unlink(missing_ok=True)
    with pytest.raises(Exception, match="[Ww]eights only"):
        checkpoint.load(tmp_path, model, model, opt, fsdp=False, lora=False)
    assert not Path("/tmp/dpo-ray-pwned").exists()


def test_remote_code_in_a_model_dir_is_not_run_by_default(tmp_path, demo_model):
    evil = tmp_path / "evil-model"
    shutil.copytree(demo_model, evil)
    marker = tmp_path / "ran"
    (evil / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import LlamaForCausalLM as EvilModel\n")
    cfg = json.loads((evil / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (evil / "config.json").write_text(json.dumps(cfg))
    assert Config().model.trust_remote_code is False
    try:
        load_model(str(evil))
    except Exception:
        pass  # refusing is fine too; running the file is not
    assert not marker.exists()


def test_documented_server_commands_bind_loopback():
    text = (ROOT / "README.md").read_text()
    servers = [line for line in text.splitlines() if re.search(r"\b(mlflow (server|ui)|ray start --head)\b", line) and not line.startswith("|")]
    assert servers
    for line in servers:
        assert "127.0.0.1" in line, line
