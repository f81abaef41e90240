"""One entry point per stage. Each module exposes `run(cfg, parent_run_id=None) -> manifest dict`."""
