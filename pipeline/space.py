"""A sweep's search space: `--grid key=[a,b]` and `--sample 'key=dist(a,b)'` parsed into Ray Tune's, the distinct
settings of the keys that change prepare/reference (one shared part each), and every trial's config for the checks
that must pass before any trial starts (the memory plan)."""
from __future__ import annotations

import itertools
import json
import re

import yaml

from dpo_ray.config import Config, ConfigError, flatten, with_overrides

from .artifacts import fingerprint

# keys whose value changes the prepared data or the reference log-probs (the cache keys of pipeline/prepare.py and
# pipeline/reference.py: data files and lengths, tokenizer and reference model (both default to the policy), scoring
# precision); the sweep runs those stages once per distinct value of these, not once per trial
STAGE_KEYS = ("data.", "model.", "cache_dir", "train.bf16", "train.strategy", "train.use_gpu")
DISTRIBUTIONS = {"uniform", "loguniform", "randint", "choice"}
NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
SPEC = re.compile(r"^\s*(\w+)\s*\((.*)\)\s*$")


def parse_grid(item: str) -> tuple[str, list]:
    """`train.beta=[0.05,0.1]` -> ("train.beta", [0.05, 0.1])."""
    key, sep, raw = item.partition("=")
    values = _yaml(raw, f"--grid {item!r}") if sep else None
    if not key or not isinstance(values, list) or not values:
        raise ConfigError(f"--grid {item!r}: expected dotted.key=[a,b,...], e.g. --grid train.beta=[0.05,0.1]")
    return key.strip(), values


def parse_sample(item: str) -> tuple[str, str]:
    """`train.lr=loguniform(1e-5,1e-3)` -> ("train.lr", "loguniform(1e-5,1e-3)"), checked."""
    key, sep, spec = item.partition("=")
    if not key or not sep:
        raise ConfigError(f"--sample {item!r}: expected dotted.key=DIST(args), e.g. --sample 'train.lr=loguniform(1e-5,1e-3)'")
    distribution(key.strip(), spec)
    return key.strip(), spec.strip()


def _yaml(raw: str, where: str):
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({e.problem})") from None
    return [_number(v) for v in value] if isinstance(value, list) else value


def _number(v):
    """YAML 1.1 reads 1e-5 (no dot) as a string: numbers are numbers here."""
    if isinstance(v, str) and NUMBER.match(v):
        return float(v)
    return [_number(x) for x in v] if isinstance(v, list) else v


def distribution(key: str, spec: str):
    """A sample spec -> the Ray Tune domain: uniform(a,b), loguniform(a,b), randint(a,b) (b excluded), choice([a,...])."""
    from ray import tune

    m = SPEC.match(spec)
    if not m or m.group(1) not in DISTRIBUTIONS:
        raise ConfigError(f"sweep.sample.{key}: {spec!r} is not one of {', '.join(sorted(DISTRIBUTIONS))}, e.g. loguniform(1e-5,1e-3)")
    name, args = m.group(1), _yaml(f"[{m.group(2)}]", f"sweep.sample.{key}")
    if name == "choice":
        values = args[0] if len(args) == 1 and isinstance(args[0], list) else args
        return tune.choice(values)
    if len(args) != 2 or not all(isinstance(a, (int, float)) for a in args) or not args[0] < args[1]:
        raise ConfigError(f"sweep.sample.{key}: {spec!r}: {name} takes two numbers, low < high")
    if name == "loguniform" and args[0] <= 0:
        raise ConfigError(f"sweep.sample.{key}: {spec!r}: loguniform needs low > 0")
    return getattr(tune, name)(*args)


def param_space(sweep) -> dict:
    from ray import tune

    space = {k: tune.grid_search(_number(list(v))) for k, v in sweep.grid.items()}
    space.update({k: distribution(k, v) for k, v in sweep.sample.items()})
    return space


def is_stage_key(key: str) -> bool:
    return any(key == p or key.startswith(p) for p in STAGE_KEYS)


def stage_values(sweep) -> list[dict]:
    """Every distinct setting of the swept keys that change prepare/reference ([{}] when none is swept)."""
    choices = {k: v for k, v in sweep.grid.items() if is_stage_key(k)}
    for k, spec in sweep.sample.items():
        if is_stage_key(k):
            domain = distribution(k, spec)
            if not hasattr(domain, "categories"):
                raise ConfigError(f"sweep.sample.{k}: {k} changes the prepared data or the reference; sweep it with a grid or "
                                  f"choice([...]) so that those stages run once per value, before the trials")
            choices[k] = list(domain.categories)
    return [dict(zip(choices, combo)) for combo in itertools.product(*choices.values())]


def group_key(cfg: Config) -> str:
    """Trials with the same value of every STAGE_KEYS key share one prepared dataset and one reference pass."""
    flat = {k: v for k, v in flatten(cfg.model_dump()).items() if is_stage_key(k)}
    return fingerprint("sweep-group", json.dumps(flat, sort_keys=True, default=str))


def expected_trials(s) -> int:
    """Grid points x samples: what Tune's BasicVariantGenerator creates."""
    n = s.samples
    for values in s.grid.values():
        n *= len(values)
    return n


def trial_configs(cfg: Config) -> list[tuple[dict, Config]]:
    """(overrides, config) of every grid point crossed with each sampled key's extremes (a choice's every value; a
    range's two ends) that validates: what the checks before the first trial must pass for every trial Tune may draw."""
    s = cfg.sweep
    values = {k: [_number(x) for x in v] for k, v in s.grid.items()}
    for key, spec in s.sample.items():
        domain = distribution(key, spec)
        if hasattr(domain, "categories"):
            values[key] = list(domain.categories)
        else:  # uniform, loguniform: [lower, upper); randint: [lower, upper - 1]
            upper = domain.upper - 1 if isinstance(domain.lower, int) and isinstance(domain.upper, int) else domain.upper
            values[key] = [domain.lower, upper]
    out = []
    for combo in itertools.product(*values.values()):
        overrides = dict(zip(values, combo))
        try:
            out.append((overrides, with_overrides(cfg, overrides)))
        except ConfigError:  # an invalid value: that trial ends in ERROR with the reason, as any trial error
            continue
    return out
