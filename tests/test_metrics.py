"""Metric library sanity: Fréchet distance vs scipy, FID monotone in noise, IS, precision/recall,
PSNR/SSIM, the Inception loading path (test-written random weights; missing file offline), probe."""

import os

import numpy as np
import pytest
import scipy.linalg
import torch

from jobs.metrics.adm import precision_recall
from jobs.metrics.fid import (
    FeatureStats,
    ReferenceStats,
    frechet_distance,
    load_reference_stats,
    mean_and_covariance,
    save_reference_stats,
)
from jobs.metrics.image_quality import psnr, ssim, to_uint8
from jobs.metrics.inception_score import inception_score


def scipy_frechet(mu1, s1, mu2, s2):
    """Independent float64 reference (the pytorch-fid / ADM formula with scipy.linalg.sqrtm)."""
    covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_matches_scipy_to_1e6_relative():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 32))
    b = rng.normal(size=(400, 32)) @ rng.normal(size=(32, 32)) * 0.3 + 0.5
    mu1, s1 = np.mean(a, 0), np.cov(a, rowvar=False)
    mu2, s2 = np.mean(b, 0), np.cov(b, rowvar=False)
    ours = frechet_distance(mu1, s1, mu2, s2)
    ref = scipy_frechet(mu1, s1, mu2, s2)
    assert abs(ours - ref) / abs(ref) < 1e-6
    # the streaming statistics equal numpy's mean / unbiased covariance
    mu, cov = mean_and_covariance(a)
    np.testing.assert_allclose(mu, mu1, rtol=1e-12)
    np.testing.assert_allclose(cov, s1, rtol=1e-9, atol=1e-12)


def test_fid_self_zero_and_monotone_in_noise():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(1000, 16)) @ rng.normal(size=(16, 16))
    ref = FeatureStats.from_features(feats)
    mu, sigma = ref.mean_cov()
    assert ref.distance_to(mu, sigma) == pytest.approx(0.0, abs=1e-8)
    noise = rng.normal(size=feats.shape)
    dists = [
        FeatureStats.from_features(feats + s * noise).distance_to(mu, sigma) for s in (0.1, 0.3, 1.0, 3.0)
    ]
    assert all(x < y for x, y in zip(dists, dists[1:], strict=False)), dists


def test_feature_stats_merge_equals_whole():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(300, 8))
    parts = [FeatureStats.from_features(feats[i::3], keep_max=50) for i in range(3)]
    merged = parts[0]
    for p in parts[1:]:
        merged.merge(p)
    whole = FeatureStats.from_features(feats)
    for x, y in zip(merged.mean_cov(), whole.mean_cov(), strict=False):
        np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-12)
    assert merged.count == 300 and merged.num_kept == 50


def test_reference_stats_roundtrip(tmp_path):
    rng = np.random.default_rng(3)
    stats = FeatureStats.from_features(rng.normal(size=(50, 4)), keep_max=20)
    ref = ReferenceStats.from_stats(stats, "probe")
    url = str(tmp_path / "ref.npz")
    save_reference_stats(url, ref)
    back = load_reference_stats(url)
    assert back.feature_net == "probe" and back.num_images == 50 and back.features.shape == (20, 4)
    np.testing.assert_allclose(back.sigma, ref.sigma)
    # ADM layout (arr_0 + mu/sigma/mu_s/sigma_s) loads too
    adm = tmp_path / "adm.npz"
    np.savez(
        adm,
        arr_0=np.zeros((3, 8, 8, 3), np.uint8),
        mu=ref.mu,
        sigma=ref.sigma,
        mu_s=ref.mu,
        sigma_s=ref.sigma,
    )
    back = load_reference_stats(str(adm))
    assert back.has_images and back.mu_s is not None and back.num_images == 3
    from jobs.metrics.fid import npz_array_shape, read_npz_rows

    images = np.arange(3 * 8 * 8 * 3, dtype=np.uint8).reshape(3, 8, 8, 3)
    np.savez(adm, arr_0=images, mu=ref.mu, sigma=ref.sigma)
    assert npz_array_shape(str(adm)) == (3, 8, 8, 3)  # from the header: the batch is never loaded whole
    np.testing.assert_array_equal(read_npz_rows(str(adm), 1, 3), images[1:3])
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_reference_stats(str(tmp_path / "nope.npz"))


def test_inception_score_bounds():
    uniform = np.full((100, 10), 0.1)
    assert inception_score(uniform) == pytest.approx(1.0)
    onehot = np.eye(10)[np.arange(100) % 10]  # confident and evenly spread: IS = number of classes
    assert inception_score(onehot) == pytest.approx(10.0, rel=1e-6)


def release_evaluator_inception_score(probs: np.ndarray, batch: int = 7) -> float:
    """The release's evaluator (evaluator/evaluator.py, update() then result()), transcribed:
    float64 sums of p and p log p over batches, one score."""
    eps, total, kl = 1e-16, torch.zeros(probs.shape[1], dtype=torch.float64), 0.0
    for i in range(0, len(probs), batch):
        p = torch.from_numpy(probs[i : i + batch]).float()
        total += p.sum(0, dtype=torch.float64)
        kl = kl + (p * torch.log(p + eps)).sum(0, dtype=torch.float64)
    return torch.exp(torch.sum(kl - total * torch.log(total / len(probs) + eps)) / len(probs)).item()


def test_reconstruction_inception_score_is_the_releases_one_score_whatever_the_order():
    # A class-sorted set (as a val split listed class by class): 100 classes, 20 images each.
    rng = np.random.default_rng(0)
    logits = 10.0 * np.eye(100)[np.repeat(np.arange(100), 20)] + rng.normal(size=(2000, 100))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    score = inception_score(probs)
    assert score == pytest.approx(release_evaluator_inception_score(probs), rel=1e-6)
    assert inception_score(probs[rng.permutation(len(probs))]) == pytest.approx(score, rel=1e-12)
    # What 10 contiguous slices of the sorted set gave (each slice holds 10 classes): far lower.
    sliced = np.mean([inception_score(part) for part in np.array_split(probs, 10)])
    assert sliced < 10.0 < 0.5 * score


def test_precision_recall_identical_and_disjoint():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(200, 8))
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)
    # generated samples collapsed onto a few real points: high precision, low recall
    collapsed = np.repeat(real[:5], 40, axis=0) + 1e-3 * rng.normal(size=(200, 8))
    precision, recall = precision_recall(real, collapsed)
    assert precision > 0.9 and recall < 0.2
    # blocks smaller than the sets give the same answer (ADM computes 10k x 10k blocks)
    assert precision_recall(real, collapsed, block=37) == (precision, recall)


def test_psnr_ssim_and_uint8_rounding():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g)
    assert torch.isinf(psnr(x, x)).all()
    assert torch.allclose(ssim(x, x), torch.ones(4, dtype=torch.float64))
    noisy = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    noisier = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert (psnr(x, noisy) > psnr(x, noisier)).all() and (ssim(x, noisy) > ssim(x, noisier)).all()
    mse = ((x - noisy) ** 2).mean().item()
    assert psnr(x[:1], noisy[:1]).item() == pytest.approx(
        10 * np.log10(1 / ((x[:1] - noisy[:1]) ** 2).mean().item())
    )
    assert mse > 0
    u = to_uint8(torch.tensor([-0.5, 0.0, 0.5 / 255, 0.6 / 255, 1.0, 2.0]))
    assert u.tolist() == [0, 0, 0, 1, 255, 255]  # clamped and rounded (SPEC "rFID")


# -- Inception loading path -------------------------------------------------------------------------


def test_inception_loads_test_written_weights(tmp_path):
    from jobs.metrics.inception import (
        STATE_DICT_FILE,
        build_fid_inception,
        load_inception,
    )

    torch.manual_seed(0)
    net = build_fid_inception()  # random weights, the architecture and keys of the real file
    for m in net.modules():  # keep activations finite with random weights
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.fill_(1.0)
    path = tmp_path / STATE_DICT_FILE
    torch.save(net.state_dict(), path)
    inception = load_inception(str(path))
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    out = inception(images)
    assert out["pool"].shape == (2, 2048) and out["probs"].shape == (2, 1008)
    assert out["spatial"].shape == (2, 7 * 17 * 17)
    assert torch.allclose(out["probs"].sum(1), torch.ones(2))
    assert torch.isfinite(out["pool"]).all()
    # IS probabilities are bias-free (ADM softmax/logits/MatMul): the fc bias must not change them
    with torch.no_grad():
        inception.net.fc.bias.normal_(0, 5.0)
    out2 = inception(images)
    w = inception.logits_weight()
    assert w.shape == (2048, 1008) and torch.equal(w, inception.net.fc.weight.T.contiguous())
    assert torch.allclose(out2["probs"], torch.softmax(out2["pool"] @ w, 1), atol=1e-6)
    assert torch.allclose(out2["probs"], out["probs"], atol=1e-6)
    # the resize is selectable and changes the features
    other = load_inception(str(path), resize="pytorch_fid")(images)["pool"]
    assert (other - out["pool"]).abs().max() > 1e-3 * out["pool"].abs().max()
    with pytest.raises(ValueError, match="inception_resize"):
        load_inception(str(path), resize="bicubic")
    # wrong keys: a clear error naming the file
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth"):
        load_inception(str(tmp_path / "bad.pth"))


def test_tf1_resize_matches_tensorflow1_bilinear():
    """TF1 ResizeBilinear (align_corners=False, no half-pixel centres): out[i] = in at i * n_in / n_out,
    linear between neighbours, the last pixel repeated past the edge."""
    from jobs.metrics.inception import resize_tf1

    x = torch.tensor([0.0, 10.0, 20.0])[None, None, None, :].expand(1, 1, 3, 3)
    up = resize_tf1(x, 6)  # positions 0, .5, 1, 1.5, 2, 2.5
    assert up[0, 0, 0].tolist() == pytest.approx([0, 5, 10, 15, 20, 20])
    down = resize_tf1(torch.arange(16.0).reshape(1, 1, 4, 4), 2)  # positions 0, 2: plain subsampling
    assert down[0, 0].tolist() == [[0, 2], [8, 10]]
    same = torch.rand(1, 3, 5, 5)
    assert torch.equal(resize_tf1(same, 5), same)


def test_inception_missing_file_offline_one_line(tmp_path):
    from jobs.metrics.inception import load_inception
    from models.losses.pretrained_weights import MissingWeightsError

    expected = str(tmp_path / "weights" / "pt_inception-2015-12-05-6726825d.pth")
    # this machine has no network: the real download attempt fails quickly
    with pytest.raises(MissingWeightsError) as info:
        load_inception(expected)
    message = str(info.value)
    assert expected in message and "\n" not in message
    assert not os.path.exists(expected)


# -- probe stand-in ---------------------------------------------------------------------------------


def _blobs(n_per_class, num_classes=4, size=16, seed=0):
    """Class = colour channel lit up: trivially learnable."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), n_per_class)
    images = rng.integers(0, 60, size=(len(labels), size, size, 3)).astype(np.uint8)
    for i, c in enumerate(labels):
        images[i, :, :, c % 3] += np.uint8(120 + 60 * (c // 3))
    return images, labels


def test_probe_trains_caches_and_scores(tmp_path):
    from jobs.metrics.probe import ensure_probe, load_probe, probe_accuracy

    x, y = _blobs(30)
    xv, yv = _blobs(10, seed=1)
    man = ensure_probe(
        str(tmp_path), x, y, num_classes=4, image_size=16, val_images=xv, val_labels=yv, steps=60
    )
    assert not man["cached"] and man["val_accuracy"] > 0.9
    again = ensure_probe(str(tmp_path), x, y, num_classes=4, image_size=16, steps=60)
    assert again["cached"] and again["key"] == man["key"]
    probe = load_probe(man["path"])
    assert probe_accuracy(probe, xv, yv) == pytest.approx(man["val_accuracy"])
    out = probe(torch.as_tensor(xv[:5]).permute(0, 3, 1, 2))
    assert out["pool"].shape == (5, 128) and probe.name == "probe"


def test_probe_adam_and_schedule_equal_torch_adam_with_cosine_annealing_bit_for_bit():
    from jobs.metrics.probe import ProbeAdam, ProbeNet, cosine_annealing_lrs

    steps, lr = 25, 2e-3
    torch.manual_seed(0)
    ours, theirs = ProbeNet(4), ProbeNet(4)
    theirs.load_state_dict(ours.state_dict())
    opt = torch.optim.Adam(theirs.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    probe_opt = ProbeAdam(ours.parameters())
    gen = torch.Generator().manual_seed(1)
    for step_lr in cosine_annealing_lrs(lr, steps):
        assert step_lr == opt.param_groups[0]["lr"]
        x, y = torch.randn(8, 3, 16, 16, generator=gen), torch.randint(4, (8,), generator=gen)
        for net in (ours, theirs):
            net.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(x), y).backward()
        probe_opt.step(step_lr)
        opt.step()
        sched.step()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_random_untrained_inception_is_seeded_and_named_so():
    """eval.inception_weights=random-untrained: every actor builds the same network (seeded), nothing
    is downloaded, and its numbers never carry the real metric names."""
    from jobs.evaluation.features import (
        distance_name,
        feature_net_tag,
        inception_suffix,
    )
    from jobs.metrics.inception import load_inception

    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    a, b = load_inception("random-untrained")(images), load_inception("random-untrained")(images)
    assert a["pool"].shape == (2, 2048) and torch.equal(a["pool"], b["pool"])
    assert a["pool"].std() > 0 and "spatial" in a
    assert distance_name("inception", "recon", "random-untrained") == "rfid_random_untrained"
    assert distance_name("inception", "gen", "random-untrained") == "gfid_random_untrained"
    assert distance_name("inception", "gen", "") == "gfid" and inception_suffix("inception", "") == ""
    assert (
        feature_net_tag({"kind": "inception", "weights": "random-untrained"}) == "inception-random-untrained"
    )


def test_feature_stats_of_few_rows_keep_them_for_the_n_by_n_route_until_there_are_too_many():
    """Up to dim / 2 rows (merged across actors too) are kept, and the distance from them equals the
    d x d route; one row more and they are dropped (the sums alone remain)."""
    rng = np.random.default_rng(5)
    ref = rng.normal(size=(300, 64)) @ rng.normal(size=(64, 64)) * 0.2 + 0.1
    mu, sigma = FeatureStats.from_features(ref).mean_cov()
    few = rng.normal(size=(32, 64))
    stats = FeatureStats.from_features(few[:20]).merge(FeatureStats.from_features(few[20:]))
    assert stats.few_rows is not None and np.array_equal(np.concatenate(stats.few_rows), few)
    d_x_d = frechet_distance(*stats.mean_cov(), mu, sigma)
    scipy_d_x_d = scipy_frechet(*stats.mean_cov(), mu, sigma)
    assert stats.distance_to(mu, sigma) == pytest.approx(d_x_d, rel=1e-6)
    assert stats.distance_to(mu, sigma) == pytest.approx(scipy_d_x_d, rel=1e-6)
    stats.update(rng.normal(size=(1, 64)))
    assert stats.few_rows is None and stats.count == 33
