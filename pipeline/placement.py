"""Each stage plans its Ray work on the cluster it has when it starts, and never waits without a bound.

A run's cluster is not the one it started on: a node lost for good, a spot node taken back, an autoscaler that adds
one. So the stages ask here, when they begin, how many actors of their pool fit the nodes alive now (`plan_pool`),
beside the Ray Data tasks that feed them, and say so in one log line. A stage whose minimum does not fit waits at
most cluster.wait_for_resources_s (for an autoscaler), saying every half minute what it waits for, then stops with one
line naming the stage, what it needs and what the cluster has.

Why the tasks are small: Ray Data starts an actor pool's actors first, and a task that needs more CPU than the
actors left free never runs ("Cluster resources are not enough to run any task ... The job may hang forever"). Ray
Data 2.60's Parquet reader (datasource V2) lists the files in a task of 1 whole CPU that cannot be configured: on a
1-CPU cluster beside a 0.5-CPU scoring actor it waits for ever (measured, see docs/cluster.md). The stages that feed
an actor pool therefore read with datasource V1's read tasks of TASK_CPUS, and their other tasks take TASK_CPUS too.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from dpo_ray.errors import UserError

log = logging.getLogger("dpo_ray")
TASK_CPUS = 0.25  # a Ray Data read or map task beside an actor pool: 4 fit in the CPU a 0.5-CPU actor leaves on a 1-CPU node
NOTE_EVERY_S = 30.0  # a waiting stage says what it waits for this often


class ResourceError(UserError, RuntimeError):
    """The Ray cluster cannot run what a stage needs, and did not gain it within cluster.wait_for_resources_s."""


@dataclass(frozen=True)
class Nodes:
    """The resources of the cluster's alive nodes now (totals, not what is free: a stage's own actors hold some)."""

    nodes: list[dict] = field(default_factory=list)

    @classmethod
    def now(cls) -> "Nodes":
        import ray

        return cls([dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")])

    def total(self, key: str) -> float:
        return sum(n.get(key, 0.0) for n in self.nodes)

    def describe(self) -> str:
        extra = sorted({k for n in self.nodes for k in n if k not in ("CPU", "GPU", "memory", "object_store_memory")
                        and not k.startswith("node:") and not k.startswith("accelerator_type")})
        custom = "".join(f", {self.total(k):g} {k}" for k in extra)
        return f"{len(self.nodes)} node(s) alive with {self.total('CPU'):g} CPU(s), {self.total('GPU'):g} GPU(s){custom}"


def fits(nodes: Nodes, per_actor: dict[str, float], want: int, task_cpus: float = TASK_CPUS) -> int:
    """How many of `want` actors of `per_actor` resources the nodes hold, with task_cpus left for one Ray Data task
    (on any node). Pure: the nodes' totals in, a count out."""
    need = {k: v for k, v in per_actor.items() if v > 0}
    free = [dict(n) for n in nodes.nodes]
    placed = 0
    for _ in range(want):
        best = None
        for n in free:  # the node with the most CPU left that holds one more actor
            if all(n.get(k, 0.0) + 1e-9 >= v for k, v in need.items()) and (best is None or n.get("CPU", 0) > best.get("CPU", 0)):
                best = n
        if best is None:
            break
        trial = [dict(n) for n in free]
        slot = trial[free.index(best)]
        for k, v in need.items():
            slot[k] = slot.get(k, 0.0) - v
        if task_cpus and not any(n.get("CPU", 0.0) + 1e-9 >= task_cpus for n in trial):
            break  # one more actor would leave no CPU for the tasks that feed the pool
        free, placed = trial, placed + 1
    return placed


def actor_resources(cpus: float, gpus: float = 0, extra: dict | None = None) -> dict[str, float]:
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **(extra or {})}


def show(res: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in res.items()) + "}"


def plan_pool(stage: str, what: str, per_actor: dict[str, float], want: int, wait_s: float, minimum: int = 1) -> int:
    """The actors a stage's pool gets now: as many of `want` as the alive nodes hold beside its tasks, at least
    `minimum` (waiting up to wait_s for them, then a ResourceError naming the stage). One log line says the plan."""
    nodes = wait_for(stage, f"{minimum} {what}(s) of {show(per_actor)} beside a {TASK_CPUS:g}-CPU task", wait_s,
                     lambda n: fits(n, per_actor, minimum) >= minimum)
    n = max(minimum, fits(nodes, per_actor, want))
    log.info("%s: %d %s(s) of %s (of %d asked) and Ray Data tasks of %g CPU, on %s", stage, n, what, show(per_actor), want,
             TASK_CPUS, nodes.describe())
    return n


FIXED = {"local": False}  # True while this process runs a local Ray runtime of its own: it never gains a node, so no wait


def wait_for(stage: str, need: str, wait_s: float, ok, clock=time.monotonic, sleep=time.sleep) -> Nodes:
    """Nodes.now() once `ok(nodes)` holds; polls for up to wait_s seconds (none on a local runtime of this run's own),
    saying every NOTE_EVERY_S what it waits for; then a ResourceError in one line: the stage, what it needs, what the
    cluster has."""
    wait_s = 0.0 if FIXED["local"] else wait_s
    start = last_note = clock()
    while True:
        nodes = Nodes.now()
        if ok(nodes):
            if clock() - start > 1:
                log.info("%s: the cluster now has what it needs (waited %.0f s)", stage, clock() - start)
            return nodes
        waited = clock() - start
        if waited >= wait_s:
            waited_for = "a local runtime gains no node" if FIXED["local"] else f"waited {waited:.0f} s, cluster.wait_for_resources_s"
            raise ResourceError(f"{stage}: needs {need}; the cluster has {nodes.describe()} ({waited_for}); bring nodes back "
                                f"or ask for less; what finished is kept, and the same command continues from there")
        if clock() - last_note >= NOTE_EVERY_S or last_note == start:
            log.warning("%s: waiting for %s (the cluster has %s; up to %.0f s more)", stage, need, nodes.describe(), wait_s - waited)
            last_note = clock()
        sleep(min(2.0, max(0.1, wait_s - waited)))


@contextmanager
def small_reads():
    """Parquet reads through Ray Data's datasource V1 (read tasks of TASK_CPUS; V2 lists files in a 1-CPU task that
    waits for ever beside an actor pool on a small cluster): the flag is read when the dataset is made."""
    import ray

    ctx = ray.data.DataContext.get_current()
    before = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        yield
    finally:
        ctx.use_datasource_v2 = before


def read_parquet(paths, filesystem):
    """ray.data.read_parquet for a dataset that feeds an actor pool: small read tasks (see small_reads)."""
    import ray

    with small_reads():
        return ray.data.read_parquet(paths, filesystem=filesystem, num_cpus=TASK_CPUS)
