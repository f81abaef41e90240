"""A Train worker's preemption notice: SIGTERM (what a spot node's processes get before it goes) sets
PREEMPTED instead of ending the process; run_loop (jobs.training.ray_training) then checkpoints at
once on every rank and stops (issue 17, Deliver 3).

Its own module, importing nothing of ours: Ray Train's controller unpickles the Torch config below
(the backend that installs the handler), and importing the whole training module there (configs,
models, infra) costs every training stage half a CPU-second in that process.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

PREEMPTED = threading.Event()


def install_preemption_handler() -> bool:
    """SIGTERM -> PREEMPTED instead of Ray's exit. Python handlers are set from the main thread
    only: called through the Torch backend (below), which runs it as a worker actor task, on
    the actor's main thread (the train loop itself runs in a thread of its own)."""
    if threading.current_thread() is not threading.main_thread():
        print("[restok] SIGTERM handler not installed (not the main thread)", flush=True)
        return False
    PREEMPTED.clear()

    def on_sigterm(signum: int, frame: Any) -> None:
        PREEMPTED.set()

    signal.signal(signal.SIGTERM, on_sigterm)
    return True


def preemptible_torch_config() -> Any:
    """Ray Train's TorchConfig whose backend also installs the preemption handler on every worker."""
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend

    class _PreemptibleBackend(_TorchBackend):
        def on_training_start(self, worker_group: Any, backend_config: Any) -> None:
            super().on_training_start(worker_group, backend_config)
            worker_group.execute(install_preemption_handler)

    class PreemptibleTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return _PreemptibleBackend

    return PreemptibleTorchConfig()
