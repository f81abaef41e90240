"""jobs.metrics.adm.scores against an independent transcription of the ADM evaluator's definitions
(openai/guided-diffusion evaluations/evaluator.py: FIDStatistics.frechet_distance,
compute_inception_score, ManifoldEstimator + DistanceBlock), on seeded class-sorted activations of
11,000 samples (three IS splits: 5000, 5000, 1000) and 3,000 references. Feature widths are reduced
(256 pool, 126 spatial) so the sqrtm calls take milliseconds; the definitions do not depend on them."""

import numpy as np
import pytest
import torch
from scipy import linalg

N_SAMPLES, N_REF, POOL, SPATIAL, NUM_LOGITS, NUM_CLASSES = 11_000, 3_000, 256, 126, 1008, 100


# ---- the reference: ADM's code paths, transcribed with numpy/scipy only ------------------------------
def adm_fid(sample_acts, ref_acts):
    # compute_statistics: np.mean, np.cov(rowvar=False); the issue fixes float64 means
    mu1, sigma1 = np.mean(sample_acts.astype(np.float64), axis=0), np.cov(sample_acts, rowvar=False)
    mu2, sigma2 = np.mean(ref_acts.astype(np.float64), axis=0), np.cov(ref_acts, rowvar=False)
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def adm_inception_score(acts, w, split_size=5000):
    logits = acts.astype(np.float64) @ w  # softmax/logits/MatMul: no bias
    e = np.exp(logits - logits.max(1, keepdims=True))
    preds = e / e.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def adm_pairwise(u, v):
    # DistanceBlock: inputs cast to float16, squared norms, max(|u|^2 - 2uv + |v|^2, 0), float16 out
    u, v = u.astype(np.float16).astype(np.float32), v.astype(np.float16).astype(np.float32)
    nu, nv = (u**2).sum(1)[:, None], (v**2).sum(1)[None, :]
    d = np.maximum(nu - 2 * u @ v.T + nv, 0.0).astype(np.float16)
    return d.astype(np.float32)


def adm_radii(feats, k=3, rows=2000):
    radii = np.zeros(len(feats), np.float32)
    for b in range(0, len(feats), rows):
        d = adm_pairwise(feats[b : b + rows], feats)
        radii[b : b + rows] = np.partition(d, np.arange(k + 1), axis=1)[:, k]
    return radii


def adm_prec_recall(ref, samples, rows=2000):
    r_ref, r_smp = adm_radii(ref, rows=rows), adm_radii(samples, rows=rows)
    ref_in = np.zeros(len(ref), bool)
    smp_in = np.zeros(len(samples), bool)
    for b in range(0, len(ref), rows):
        d = adm_pairwise(ref[b : b + rows], samples)
        ref_in[b : b + rows] |= (d <= r_smp[None, :]).any(1)
        smp_in |= (d <= r_ref[b : b + rows, None]).any(0)
    return smp_in.mean(), ref_in.mean()


# ---- seeded activations, class-sorted (as a class-major sampler would give them) ----------------------
def activations(rng, n, centres, dim_noise):
    labels = np.repeat(np.arange(NUM_CLASSES), n // NUM_CLASSES)
    x = centres[labels] + dim_noise * rng.standard_normal((n, centres.shape[1]))
    return np.maximum(x, 0).astype(np.float32)  # post-ReLU-like, float32 like Inception outputs


@pytest.fixture(scope="module")
def acts():
    rng = np.random.default_rng(0)
    centres = rng.gamma(2.0, 0.25, (NUM_CLASSES, POOL))
    centres_s = rng.gamma(2.0, 0.25, (NUM_CLASSES, SPATIAL))
    ref_pool, ref_spatial = activations(rng, N_REF, centres, 0.3), activations(rng, N_REF, centres_s, 0.3)
    shift = 0.01 * rng.standard_normal(centres.shape)  # samples: slightly off the reference
    smp_pool = activations(rng, N_SAMPLES, centres + shift, 0.32)
    smp_spatial = activations(rng, N_SAMPLES, centres_s, 0.35)
    w = rng.standard_normal((POOL, NUM_LOGITS)) * 0.3
    return ref_pool, ref_spatial, smp_pool, smp_spatial, w


@pytest.mark.slow
def test_scores_equal_adm_transcription(acts):
    from jobs.metrics.adm import scores

    ref_pool, ref_spatial, smp_pool, smp_spatial, w = acts
    got = scores(ref_pool, ref_spatial, smp_pool, smp_spatial, w)
    assert set(got) == {"inception_score", "fid", "sfid", "precision", "recall"}
    assert got["fid"] == pytest.approx(adm_fid(smp_pool, ref_pool), rel=1e-6)
    assert got["sfid"] == pytest.approx(adm_fid(smp_spatial, ref_spatial), rel=1e-6)
    is_adm = adm_inception_score(smp_pool, w)
    assert got["inception_score"] == pytest.approx(is_adm, rel=1e-6)
    prec, rec = adm_prec_recall(ref_pool, smp_pool)
    assert abs(got["precision"] - prec) <= 0.005 and abs(got["recall"] - rec) <= 0.005
    # the numbers are informative here (not saturated at 0 or 1)
    assert 0.05 < got["precision"] < 0.95 and 0.05 < got["recall"] < 0.95
    # IS is over consecutive splits in the order given: class-sorted order scores lower than shuffled
    perm = np.random.default_rng(1).permutation(N_SAMPLES)
    assert scores(ref_pool, None, smp_pool[perm], None, w)["inception_score"] > 1.05 * got["inception_score"]


def test_reference_statistics_from_file_are_used(acts):
    """ADM read_statistics: a reference file's mu/sigma (mu_s/sigma_s) replace its activations."""
    from jobs.metrics.adm import mean_cov, scores

    ref_pool, ref_spatial, smp_pool, smp_spatial, _ = acts
    ref, smp = ref_pool[:400], smp_pool[:500]
    mu, sigma = mean_cov(smp)  # the samples' own statistics as the "file" statistics: FID 0
    mu_s, sigma_s = mean_cov(smp_spatial[:500])
    got = scores(
        ref,
        ref_spatial[:400],
        smp,
        smp_spatial[:500],
        None,
        ref_stats={"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s},
    )
    assert abs(got["fid"]) < 1e-6 and abs(got["sfid"]) < 1e-6 and "inception_score" not in got
    assert scores(ref, None, smp, None, None)["fid"] > 0.1


def test_eval_actors_ask_for_one_gpu_each_unless_configured():
    from configs.loading import load_config
    from jobs.evaluation.pool import actor_gpus

    assert actor_gpus(load_config(None, ["eval.num_actors=16"])) == 0  # CPU run
    assert actor_gpus(load_config(None, ["cluster.use_gpu=true", "eval.num_actors=16"])) == 1.0
    assert actor_gpus(load_config(None, ["cluster.use_gpu=true", "eval.gpus_per_actor=0.25"])) == 0.25
    with pytest.raises(ValueError, match="gpus_per_actor"):
        actor_gpus(load_config(None, ["cluster.use_gpu=true", "eval.gpus_per_actor=1.5"]))


def test_torchscript_path_gives_the_same_bias_free_logits_weight():
    """Both weights formats hand jobs.metrics.adm the 2048 x 1008 weight without the bias."""
    from torch import nn

    from jobs.metrics.inception import InceptionFeatures

    class Head(nn.Module):  # stands in for the TorchScript graph's output layer (a test-made graph)
        def __init__(self):
            super().__init__()
            self.output = nn.Linear(2048, 1008)

        def forward(self, x):
            return self.output(x)

    scripted = torch.jit.script(Head())
    w = InceptionFeatures(scripted, torchscript=True).logits_weight()
    assert w.shape == (2048, 1008) and torch.equal(w, scripted.output.weight.T.contiguous())


@pytest.mark.parametrize("n", [40, 600])
def test_fid_trace_from_eigenvalues_equals_adm_sqrtm(n):
    """The trace of sqrtm(sigma1 @ sigma2) from the product's eigenvalues equals ADM's scipy sqrtm
    path, on singular statistics (fewer rows than dimensions: scipy warns) and on full-rank ones."""
    from jobs.metrics.adm import adm_frechet_distance, mean_cov

    rng = np.random.default_rng(n)
    a = rng.standard_normal((n, 300)).astype(np.float32)
    b = (0.5 * rng.standard_normal((n, 300)) + 0.3).astype(np.float32)
    ours = adm_frechet_distance(*mean_cov(a), *mean_cov(b))
    assert ours == pytest.approx(adm_fid(a, b), rel=1e-9)


def test_fid_of_few_sample_rows_takes_the_n_by_n_route_and_agrees_with_adm_sqrtm():
    """40 sample rows in 300 dimensions: the trace from the 40 x 40 problem
    (jobs.metrics.fid.trace_sqrt_product_rows) equals ADM's sqrtm path to 1e-6 (the d x d routes
    add the round-off roots of the product's 260 zero eigenvalues, ~1e-8 relative here)."""
    from jobs.metrics import fid
    from jobs.metrics.adm import adm_frechet_distance, mean_cov

    rng = np.random.default_rng(3)
    a = rng.standard_normal((40, 300)).astype(np.float32)
    b = (0.5 * rng.standard_normal((120, 300)) + 0.3).astype(np.float32)
    calls = []
    real = fid.trace_sqrt_product_rows
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("jobs.metrics.adm.trace_sqrt_product_rows", lambda *x: calls.append(1) or real(*x))
        ours = adm_frechet_distance(*mean_cov(a), *mean_cov(b), rows1=a)
    assert calls == [1]
    assert ours == pytest.approx(adm_fid(a, b), rel=1e-6)
