"""The trainer a local Ray instance gets starts no PlacementGroupCleaner and no DatasetManager actor
(jobs.training.ray_training.local_torch_trainer_class); a cluster's trainer keeps Ray's defaults."""

import ray.train
from ray.train.torch import TorchTrainer

from jobs.training.ray_training import local_torch_trainer_class


def _callbacks(cls) -> set[str]:
    trainer = cls(lambda config: None, scaling_config=ray.train.ScalingConfig(num_workers=2))
    return {type(cb).__name__ for cb in trainer._create_default_callbacks()}


def test_local_trainer_drops_the_cleaner_and_dataset_manager_and_keeps_the_rest():
    cluster, local = _callbacks(TorchTrainer), _callbacks(local_torch_trainer_class())
    assert {"PlacementGroupCleanerCallback", "DatasetsCallback"} <= cluster  # Ray's defaults
    assert cluster - local == {"PlacementGroupCleanerCallback", "DatasetsCallback"}
    assert {"BackendSetupCallback", "WorkingDirectorySetupCallback"} <= local
