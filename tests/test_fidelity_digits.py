"""The quality study's real-data pieces (scripts/fidelity/digits.py, metrics.py): data, channel map, metrics, a tiny
pretraining run and the CLI's refusals. Fast (CPU, well under a minute): the full-size run and its checks are
measured by the script, not here (docs/training-data.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

FIDELITY = Path(__file__).resolve().parents[1] / "scripts" / "fidelity"
sys.path.insert(0, str(FIDELITY))

import digits  # noqa: E402
import metrics  # noqa: E402


@pytest.fixture(scope="module")
def split():
    return digits.load_digits()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    code = digits.main(["--out", str(root), "--steps", "3", "--batch", "4", "--data-samples", "16",
                        "--classifier-epochs", "2"])
    assert code == 0
    return root


# ------------------------------------------------------------------------------------------ data and channel map


def test_the_split_is_fixed_stratified_and_in_range(split):
    from sklearn.datasets import load_digits

    labels = load_digits().target
    assert split.train_images.shape == (1438, 32, 32) and split.test_images.shape == (359, 32, 32)
    assert split.train_images.dtype == np.float32
    for images in (split.train_images, split.test_images):
        assert images.min() >= 0 and images.max() <= 1 and images.max() > 0.99
    for cls in range(10):   # 20% of every class held out
        total = int((labels == cls).sum())
        assert abs(int((split.test_labels == cls).sum()) - 0.2 * total) <= 0.5
        assert int((split.train_labels == cls).sum()) + int((split.test_labels == cls).sum()) == total
    again = digits.load_digits()
    assert np.array_equal(again.test_images, split.test_images) and np.array_equal(again.test_labels,
                                                                                     split.test_labels)
    assert digits.load_digits(16).train_images.shape == (1438, 16, 16)


def test_to_image_inverts_the_channel_map_and_drops_what_the_map_cannot_make(split):
    images = split.test_images[:20]
    latents = digits.to_latents(images, 16)
    assert latents.shape == (20, 16, 32, 32)
    assert 0.3 < float(latents.pow(2).mean()) < 1.5    # roughly unit scale
    np.testing.assert_allclose(digits.to_image(latents), images, atol=1e-6)
    w = digits.channel_map(16)
    other = torch.randn(16, generator=torch.Generator().manual_seed(5))
    other -= (other @ w) / (w @ w) * w                  # orthogonal to the map: least squares ignores it
    np.testing.assert_allclose(digits.to_image(latents + other[None, :, None, None]), images, atol=1e-5)
    noisy = digits.to_image(torch.randn(4, 16, 32, 32) * 3)
    assert noisy.min() >= 0 and noisy.max() <= 1


# ------------------------------------------------------------------------------------------ metrics


def test_frechet_distance_is_zero_for_a_set_and_itself_and_exact_for_shifts_and_scalings():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8)) * rng.uniform(0.5, 2, size=8) + rng.normal(size=8)
    assert metrics.frechet_distance(a, a) < 1e-6
    shift = rng.normal(size=8)
    assert metrics.frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
    # b = 2a: |mu|^2 + tr(S + 4S - 4S) = |mu|^2 + tr(S)
    mu, cov = a.mean(axis=0), np.cov(a, rowvar=False)
    assert metrics.frechet_distance(a, 2 * a) == pytest.approx(float(mu @ mu + np.trace(cov)), rel=1e-6)
    assert metrics.frechet_distance(a[:5], a[5:10]) > 0       # n < d: singular covariances still give a number
    with pytest.raises(Exception, match="feature sets"):
        metrics.frechet_distance(a, a[:, :4])


def test_psnr_and_ssim_of_identical_and_known_images():
    rng = np.random.default_rng(1)
    image = rng.uniform(size=(32, 32))
    assert metrics.psnr(image, image) == float("inf")
    assert metrics.ssim(image, image) == pytest.approx(1.0)
    assert metrics.psnr(np.zeros((8, 8)), np.full((8, 8), 0.1)) == pytest.approx(20.0)
    # constant images: the structure term is 1, the luminance term (2ab + C1) / (a^2 + b^2 + C1)
    c1 = 0.01 ** 2
    expected = (2 * 0.2 * 0.4 + c1) / (0.2 ** 2 + 0.4 ** 2 + c1)
    assert metrics.ssim(np.full((16, 16), 0.2), np.full((16, 16), 0.4)) == pytest.approx(expected)
    stack = np.stack([image, 1 - image])
    per_image = metrics.ssim(stack, np.stack([image, image]))
    assert per_image.shape == (2,) and per_image[0] == pytest.approx(1.0) and per_image[1] < 0.5
    assert metrics.psnr(stack, stack).tolist() == [float("inf")] * 2


# ------------------------------------------------------------------------------------------ a tiny run


def test_a_tiny_run_writes_a_loadable_model_data_classes_and_classifier(tiny_run, split):
    from shiva_export.models import load_transformer
    from shiva_export.training_data import LatentDataset

    model, source = load_transformer(str(tiny_run / digits.MODEL_DIR))
    assert model.config.in_channels == 16 and model.config.sample_size == 32
    cond = digits.load_conditioning(tiny_run)
    assert cond.context.shape == (10, 24, 64) and cond.pooled.shape == (10, 64)
    assert cond.null_context.shape == (24, 64) and (cond.latent_channels, cond.latent_size) == (16, 32)
    data = LatentDataset(tiny_run / digits.DATA_DIR, model.config)
    assert data.count == 16 and data.null_embeddings() is not None
    batch = data.read(list(range(16)))
    assert batch.latents.shape == (16, 16, 32, 32)
    # every sample's text is one class's embedding, and its latents decode to a digit of the training split
    matches = [int(torch.nonzero((cond.context == ctx).all(dim=(1, 2)))[0]) for ctx in batch.encoder_hidden_states]
    assert all(torch.equal(batch.pooled_projections[i], cond.pooled[c]) for i, c in enumerate(matches))
    decoded = digits.to_image(batch.latents)
    found = [int(np.argmin(np.abs(split.train_images - image).max(axis=(1, 2)))) for image in decoded]
    np.testing.assert_allclose(decoded, split.train_images[found], atol=1e-5)
    assert [int(split.train_labels[i]) for i in found] == matches
    log = json.loads((tiny_run / digits.PRETRAIN_LOG).read_text())
    assert log["log"][-1]["step"] == 3 and log["settings"]["seed"] == 0 and log["wall_s"] > 0
    report = json.loads((tiny_run / digits.CLASSIFIER_JSON).read_text())
    assert report["test_accuracy"] > 0.5      # two epochs; the full run reaches >= 0.95


def test_classifier_features_predictions_and_class_accuracy(tiny_run, split):
    classifier = digits.load_classifier(tiny_run)
    images = split.test_images[:50]
    features = classifier.features(images)
    assert features.shape == (50, digits.DigitClassifier.FEATURES) and np.isfinite(features).all()
    predicted = classifier.predict(images)
    assert predicted.shape == (50,) and set(predicted) <= set(range(10))
    assert metrics.class_accuracy(classifier, images, predicted) == 1.0
    assert metrics.class_accuracy(classifier, images, split.test_labels[:50]) == pytest.approx(
        float(np.mean(predicted == split.test_labels[:50])))


def test_sample_is_deterministic_per_seed_and_takes_any_transformer_callable(tiny_run):
    model = digits.load_model(tiny_run)
    cond = digits.load_conditioning(tiny_run)
    calls = []

    def wrapped(**inputs):   # another method's callable: the signature is all sample() relies on
        calls.append(inputs["hidden_states"].shape[0])
        return model(**inputs)

    first = digits.sample(model, cond, [3, 7, 3], [11, 12, 11], steps=3)
    assert first.shape == (3, 16, 32, 32)
    assert torch.equal(first[0], first[2]) and not torch.equal(first[0], first[1])
    alone = digits.sample(wrapped, cond, [7], [12], steps=3)
    assert torch.equal(alone[0], first[1]) and calls == [2, 2, 2]     # CFG at batch 2, one call per step
    assert not torch.equal(digits.sample(model, cond, [3], [11], steps=3, guidance_scale=1.0)[0], first[0])
    with pytest.raises(Exception, match="class labels"):
        digits.sample(model, cond, [10], [0], steps=1)


def test_the_stage3_protocol_is_the_demo_of_test_training():
    from tests.test_training import DEMO

    assert digits.STAGE3_PROTOCOL == DEMO


# ------------------------------------------------------------------------------------------ CLI


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--batch", "-1"], ["--lr", "0"], ["--data-samples", "0"],
                                  ["--dense-check", "0"], ["--steps", "many"], ["--no-pretrain"]])
def test_cli_refuses_bad_input_with_one_line_and_exit_2(tmp_path, capsys, argv):
    out = tmp_path / "out"
    assert digits.main(["--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert not (out / digits.MODEL_DIR).exists()


def test_cli_as_a_script_exits_2_on_bad_input(tmp_path):
    proc = subprocess.run([sys.executable, str(FIDELITY / "digits.py"), "--out", str(tmp_path), "--steps", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "--steps" in proc.stderr
