"""What the `evaluate` and `sample` stages share (SPEC "Evaluation protocol").

features (feature networks, mergeable feature sets, metric names), sampling (the release's sampling
protocol: labels, seeds, uint8, PNG sample shards, the ADM npz), pool (the Ray actor pool that
holds the networks), generation (a class-balanced sample set on the pool), reference (reference
statistics and their cache), recon (reconstruction metrics), gen (generation metrics, CFG search).
Import order inside: features, sampling < pool < generation, reference < recon, gen.
"""

STAGE = "evaluate"
