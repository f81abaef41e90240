"""ImageNet / built-in synthetic data -> WebDataset shards, and the loaders that read them.

Modules: synthetic (built-in dataset), sources (synthetic / ImageNet folder / ILSVRC tars),
image_bytes (keep, convert or skip one image), shard_writer (one atomic shard + done record),
prepare (stage "prep": run(cfg, run_id) -> manifest), fsspec_gopen (fsspec URLs for webdataset),
tar_samples (lean tar -> sample reader), transforms (paper crop + flip, eval resize + centre
crop), loaders (train_batches, eval_batches).
"""
