"""Work lost with a node is redone elsewhere (issue 17, Deliver 2): the actor pools of extraction
and evaluation.

An actor that dies on a node Ray reports dead (spot preemption, a lost machine) is a cluster event:
its unfinished calls go to a replacement actor (or the survivors) and the stage goes on. An actor
that dies on a live node (its own crash, OOM) stays a failure of the stage, as before: that is not
a fault a retry is known to cure. Outputs are written atomically and keyed by input, so a call
redone after a loss writes each output once (never twice, never partial).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

# GCS marks a lost raylet dead before it reports that raylet's actors dead (ActorDiedError); a
# short grace covers the order in which the two notices reach this driver.
NODE_DEATH_GRACE_S = 5.0
# A call to an actor whose node just vanished fails at once (ActorUnavailableError: the socket
# closed), before GCS's health checks (about 5 missed beats of 3 s) declare the node dead.
UNAVAILABLE_GRACE_S = 60.0


def actor_node(actor: Any) -> str:
    """The node id an actor runs on (waits for its constructor)."""
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))


def start_actor(make_actor: Callable[[], Any], attempts: int = 3) -> tuple[Any, str]:
    """(actor, its node id); an actor whose node is lost while it starts is started again."""
    import ray

    for attempt in range(attempts):
        actor = make_actor()
        try:
            return actor, actor_node(actor)
        except ray.exceptions.RayActorError as error:
            # Its constructor raised (actor_init_failed): deterministic, not a lost node.
            if getattr(error, "actor_init_failed", False) or attempt == attempts - 1:
                raise
            print("[restok] an actor was lost while it started; starting another", flush=True)
            ray.kill(actor)
    raise AssertionError("unreachable")


def node_dead(node_id: str, grace_s: float = NODE_DEATH_GRACE_S) -> bool:
    """Whether Ray reports `node_id` dead (checked for up to `grace_s`)."""
    import ray

    end = time.monotonic() + grace_s
    while True:
        alive = {n["NodeID"]: bool(n["Alive"]) for n in ray.nodes()}
        if not alive.get(node_id, False):
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(0.25)


def lost_with_its_node(error: BaseException, node_id: str) -> bool:
    """An actor's death (not its own exception) on a node that is gone."""
    import ray

    if not isinstance(error, ray.exceptions.RayActorError):
        return False
    unavailable = isinstance(error, ray.exceptions.ActorUnavailableError)
    return node_dead(node_id, UNAVAILABLE_GRACE_S if unavailable else NODE_DEATH_GRACE_S)


def map_unordered(
    make_actor: Callable[[], Any], num_actors: int, jobs: list, call: Callable[[Any, Any], Any], what: str
) -> Iterator[tuple[Any, Any]]:
    """Yield (job, result) for every job, each job on one of `num_actors` actors, in completion
    order. A job whose actor was lost with its node is redone by a replacement actor (Ray places
    it wherever resources are); any other error is raised. Actors are killed at the end."""
    import ray

    actors: dict[Any, str] = {}  # actor -> node id

    def start() -> Any:
        actor, node = start_actor(make_actor)
        actors[actor] = node
        return actor

    idle = [start() for _ in range(max(1, min(num_actors, len(jobs))))]
    pending = list(jobs)
    inflight: dict[Any, tuple[Any, Any]] = {}
    try:
        while pending or inflight:
            while idle and pending:
                actor, job = idle.pop(), pending.pop(0)
                inflight[call(actor, job)] = (actor, job)
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            actor, job = inflight.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as error:
                if not lost_with_its_node(error, actors[actor]):
                    raise
                print(
                    f"[restok] {what}: an actor was lost with node {actors.pop(actor)[:12]}; "
                    "its work is redone by a replacement",
                    flush=True,
                )
                pending.insert(0, job)
                idle.append(start())
                continue
            idle.append(actor)
            yield job, result
    finally:
        for actor in actors:
            ray.kill(actor)
