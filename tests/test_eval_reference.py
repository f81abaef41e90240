"""Reference activations on real local Ray (2 actors): computed once per evaluation stage (CFG search
included), cached on disk keyed by the reference file's sha256 and the feature config, never reused
for another feature config; `restok eval score` (ADM's evaluator CLI) with test-written random
Inception weights. Tiny models on the default preset (probe stand-in, no reference file)."""

import numpy as np
import pytest
import torch
from test_eval import make_workdir  # shared tiny fixtures (ray_local: conftest)


@pytest.mark.slow
def test_default_gen_eval_with_cfg_search_computes_reference_once(tmp_path, ray_local):  # noqa: F811
    from jobs.evaluation import gen, reference

    cfg, _ = make_workdir(
        tmp_path,
        extra=[
            "eval.recon=false",
            "eval.cfg_search_scales=[1.0,2.0,3.0]",
            "eval.cfg_search_start_ratios=[0.0]",
            "eval.num_samples_per_class=3",
        ],
    )
    assert not cfg.eval.reference_stats and cfg.eval.feature_net == "probe"  # the default preset's setting
    reference._REFERENCE_MEMO.clear()
    before = reference.REFERENCE_PASSES
    result = gen.cfg_search(cfg, None)  # 3 gen evaluations, as the evaluate stage runs them
    assert len(result["points"]) == 3 and result["metric"] == "fd_probe_gen"
    assert reference.REFERENCE_PASSES - before == 1
    for p in result["points"]:
        assert 0 <= p["probe_precision"] <= 1 and 0 <= p["probe_recall"] <= 1


def _random_probe(path, num_classes=4, seed=1):
    from jobs.metrics.probe import ProbeNet

    torch.manual_seed(seed)
    torch.save(
        {"state_dict": ProbeNet(num_classes).state_dict(), "num_classes": num_classes, "image_size": 32}, path
    )
    return str(path)


@pytest.mark.slow
def test_adm_reference_batch_cached_by_hash_and_feature_config(tmp_path, ray_local):  # noqa: F811
    from jobs.evaluation import features, gen, reference

    cfg, _ = make_workdir(tmp_path, extra=["eval.recon=false", "eval.num_samples_per_class=3"])
    images = np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    ref_url = str(tmp_path / "VIRTUAL_ref.npz")
    np.savez(ref_url, arr_0=images)  # ADM reference batch format: images, no statistics
    cfg.eval.reference_stats = ref_url
    spec = {**features.feature_spec(cfg, _random_probe(tmp_path / "probe_a.pt"))}
    reference._REFERENCE_MEMO.clear()
    before = reference.REFERENCE_PASSES
    first, _ = reference.reference_for_gen(cfg, spec, {})
    reference.reference_for_gen(cfg, spec, {})
    assert reference.REFERENCE_PASSES - before == 1
    # the actors' activations, in arr_0's row order, equal one in-process pass
    net = features.load_features(spec, "cpu")
    expected = net(torch.from_numpy(images).permute(0, 3, 1, 2))["pool"].numpy()
    np.testing.assert_allclose(first["pool"], expected, rtol=1e-5, atol=1e-6)
    # a new process (memo cleared) reads the disk cache, which records its fingerprint
    reference._REFERENCE_MEMO.clear()
    again, _ = reference.reference_for_gen(cfg, spec, {})
    assert reference.REFERENCE_PASSES - before == 1 and np.array_equal(again["pool"], first["pool"])
    cached = list((tmp_path / "work").rglob("reference-cache/*.npz"))
    assert len(cached) == 1 and str(np.load(cached[0])["fingerprint"]) == cached[0].stem
    # another feature network (other weights) never reuses it
    other = {**spec, "probe_path": _random_probe(tmp_path / "probe_b.pt", seed=2)}
    reference.reference_for_gen(cfg, other, {})
    assert reference.REFERENCE_PASSES - before == 2
    assert len(list((tmp_path / "work").rglob("reference-cache/*.npz"))) == 2
    # generation metrics against it: precision/recall over all rows of both sets
    report = gen.evaluate_gen(cfg, None, spec=spec, probe={})
    assert report["num_samples"] == 12 and {"fd_probe_gen", "probe_precision", "probe_recall"} <= set(
        report["metrics"]
    )
    assert reference.REFERENCE_PASSES - before == 2


@pytest.mark.slow
def test_eval_score_cli_prints_adm_numbers(tmp_path, ray_local, capsys):  # noqa: F811
    from jobs.metrics.adm import scores
    from jobs.metrics.inception import (
        STATE_DICT_FILE,
        build_fid_inception,
        load_inception,
    )
    from pipeline.cli import main

    torch.manual_seed(0)
    weights = tmp_path / STATE_DICT_FILE
    torch.save(build_fid_inception().state_dict(), weights)
    rng = np.random.default_rng(0)
    ref_images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    smp_images = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    ref, smp = str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz")
    np.savez(ref, arr_0=ref_images)
    np.savez(smp, arr_0=smp_images, arr_1=np.arange(8))
    uri = f"sqlite:///{tmp_path.parent.parent}/mlflow-eval.db"
    assert (
        main(
            [
                "eval",
                "score",
                ref,
                smp,
                f"work_dir={tmp_path / 'work'}",
                f"tracking.tracking_uri={uri}",
                f"eval.inception_weights={weights}",
                "eval.num_actors=1",
                "eval.batch_size=8",
                "--verbose",
            ]
        )
        == 0
    )
    lines = dict(
        line.split(": ", 1)
        for line in capsys.readouterr().out.splitlines()
        if line.split(": ", 1)[0] in ("Inception Score", "FID", "sFID", "Precision", "Recall")
    )
    # the same numbers from one in-process Inception pass and jobs.metrics.adm
    net = load_inception(str(weights))
    a = {k: v.numpy() for k, v in net(torch.from_numpy(ref_images).permute(0, 3, 1, 2)).items()}
    b = {k: v.numpy() for k, v in net(torch.from_numpy(smp_images).permute(0, 3, 1, 2)).items()}
    want = scores(a["pool"], a["spatial"], b["pool"], b["spatial"], net.logits_weight().numpy())
    for label, key in (
        ("Inception Score", "inception_score"),
        ("FID", "fid"),
        ("sFID", "sfid"),
        ("Precision", "precision"),
        ("Recall", "recall"),
    ):
        assert float(lines[label]) == pytest.approx(want[key], rel=1e-3, abs=1e-3), label
