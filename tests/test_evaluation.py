"""Evaluation: ADM metric definitions, the FID Inception port, digits metrics, the evaluate CLI."""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from scipy import linalg

from dico_jax import evaluate
from dico_jax.evaluation import files as eval_files
from dico_jax.data.digits import digits_arrays
from dico_jax.evaluation import digits_features, inception, metrics
from dico_jax.evaluation import features as feature_io


# --- Fréchet distance -------------------------------------------------------------------------


def _random_covariance(rng, dim):
    a = rng.normal(size=(dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def test_frechet_distance_matches_symmetric_scipy_formula():
    rng = np.random.default_rng(0)
    dim = 12
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    s1, s2 = _random_covariance(rng, dim), _random_covariance(rng, dim)
    # Tr((S1 S2)^½) = Tr((S1^½ S2 S1^½)^½): the symmetric form, computed with eigendecompositions.
    w, v = linalg.eigh(s1)
    root1 = (v * np.sqrt(w)) @ v.T
    inner = linalg.eigvalsh(root1 @ s2 @ root1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(inner))
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert metrics.frechet_distance(mu1, s1, mu2, s2, method="eigh") == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_diagonal_gaussians_has_closed_form():
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 1 + 4 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    for method in ("sqrtm", "eigh"):
        distance = metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method)
        assert distance == pytest.approx(expected)


def test_frechet_distance_of_identical_statistics_is_zero():
    rng = np.random.default_rng(1)
    mu, sigma = metrics.feature_statistics(rng.normal(size=(500, 20)) @ rng.normal(size=(20, 20)))
    assert sigma.dtype == np.float64
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_frechet_distance_rejects_bad_statistics():
    with pytest.raises(ValueError, match="covariances"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="not positive semi-definite"):
        metrics.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2), method="eigh")
    with pytest.raises(ValueError, match="method"):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="svd")


# --- Inception Score --------------------------------------------------------------------------


def test_inception_score_of_uniform_predictions_is_one():
    assert metrics.inception_score(np.full((100, 1008), 1 / 1008)) == pytest.approx(1.0)
    assert metrics.inception_score_from_logits(np.zeros((100, 10))) == pytest.approx(1.0)


def test_inception_score_of_confident_spread_predictions_is_class_count():
    probs = np.eye(10)[np.arange(200) % 10]
    assert metrics.inception_score(probs) == pytest.approx(10.0)
    assert metrics.inception_score_from_logits(50.0 * probs) == pytest.approx(10.0, rel=1e-6)


def test_inception_score_survives_underflowing_probabilities():
    # Off-class probabilities e^-744 are subnormal; their mean over 10 rows underflows to 0.
    logits = np.where(np.eye(10, dtype=bool)[np.arange(10)], 0.0, -744.0)
    assert metrics.inception_score_from_logits(logits) == pytest.approx(10.0)


def test_inception_score_averages_over_splits():
    collapsed = np.eye(4)[np.zeros(8, int)]  # one class only: score 1
    spread = np.eye(4)[np.arange(8) % 4]  # four classes evenly: score 4
    assert metrics.inception_score(np.concatenate([collapsed, spread]), split_size=8) == pytest.approx(2.5)


# --- precision / recall -----------------------------------------------------------------------


def _adm_precision_recall_numpy(ref, samples, k=3):
    """Straight from the definition: squared distances, k-th neighbour radii (self included as 0th)."""
    def sq(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    ref_radii = np.partition(sq(ref, ref), k, axis=1)[:, k]
    sample_radii = np.partition(sq(samples, samples), k, axis=1)[:, k]
    d = sq(samples, ref)
    precision = np.mean(np.any(d <= ref_radii[None, :], axis=1))
    recall = np.mean(np.any(d <= sample_radii[:, None], axis=0))
    return precision, recall


def test_precision_recall_of_identical_sets_is_one():
    points = np.random.default_rng(0).normal(size=(40, 5))
    assert metrics.precision_recall(points, points) == (1.0, 1.0)


def test_precision_recall_of_far_apart_sets_is_zero():
    rng = np.random.default_rng(0)
    assert metrics.precision_recall(rng.normal(size=(30, 5)), rng.normal(size=(30, 5)) + 100.0) == (0.0, 0.0)


def test_precision_recall_half_the_samples_off_manifold():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(40, 3))
    samples = np.concatenate([ref[:20] + 1e-3, rng.normal(size=(20, 3)) + 50.0])
    precision, recall = metrics.precision_recall(ref, samples)
    assert precision == 0.5
    assert (precision, recall) == pytest.approx(_adm_precision_recall_numpy(ref, samples))


def test_precision_recall_blocked_matches_definition():
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(37, 6)).astype(np.float32)
    samples = (rng.normal(size=(29, 6)) * 0.7 + 0.6).astype(np.float32)
    expected = _adm_precision_recall_numpy(ref.astype(np.float64), samples.astype(np.float64))
    assert 0.0 < expected[0] < 1.0 and 0.0 < expected[1] < 1.0
    # Blocks of 8 rows: padded last blocks on both sides, several column blocks per row block.
    # Float32 distances: the definition's values up to float32 rounding (tests of the default,
    # ADM's float16 distances, are in test_adm_precision_recall.py).
    assert metrics.precision_recall(ref, samples, block_size=8, distances="float32") == pytest.approx(expected)
    radii = metrics.manifold_radii(ref, k=3, block_size=8, distances="float32")
    sq = ((ref[:, None] - ref[None]) ** 2).sum(-1)
    np.testing.assert_allclose(radii, np.sort(sq, axis=1)[:, 3], rtol=1e-4, atol=1e-5)


# --- feature extraction over devices and files ------------------------------------------------


def test_npz_reader_streams_batches_and_names_bad_input(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (23, 5, 4, 3), dtype=np.uint8)
    path = str(tmp_path / "s.npz")
    np.savez(path, arr_0=images)
    reader = feature_io.npz_images(path)
    batches = list(reader.batches(10))
    assert [len(b) for b in batches] == [10, 10, 3]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    np.savez(str(tmp_path / "f.npz"), arr_0=images.astype(np.float32))
    with pytest.raises(ValueError, match="f.npz.*uint8"):
        feature_io.npz_images(str(tmp_path / "f.npz"))
    with pytest.raises(ValueError, match="no array 'arr_0'"):
        np.savez(str(tmp_path / "k.npz"), images=images)
        feature_io.npz_images(str(tmp_path / "k.npz"))


def test_extract_features_pads_and_shards_over_all_devices():
    mesh = feature_io.device_mesh()
    assert mesh.size == jax.device_count() == 8
    images = np.random.default_rng(0).integers(0, 256, (23, 4, 4, 3), dtype=np.uint8)

    def apply_fn(scale, x):
        return {"total": scale * x.astype(np.float32).sum(axis=(1, 2, 3))}

    batches = (images[i : i + 5] for i in range(0, 23, 5))  # 5 rows padded to 8 per batch
    out = feature_io.extract_features(apply_fn, np.float32(2.0), batches, 5, mesh)
    np.testing.assert_allclose(out["total"], 2.0 * images.astype(np.float32).sum(axis=(1, 2, 3)))


# --- Inception-v3 (FID variant): PyTorch reference written here, converted, compared -----------

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional


class _TorchConvBN(nn.Module):
    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3, momentum=1.0)  # momentum 1: one pass sets stats

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _TorchA(nn.Module):
    def __init__(self, cin, pool):
        super().__init__()
        self.branch1x1 = _TorchConvBN(cin, 64, 1)
        self.branch5x5_1 = _TorchConvBN(cin, 48, 1)
        self.branch5x5_2 = _TorchConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _TorchConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _TorchConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _TorchConvBN(96, 96, 3, padding=1)
        self.branch_pool = _TorchConvBN(cin, pool, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg3(x))], 1)


class _TorchB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = _TorchConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _TorchConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _TorchConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _TorchConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class _TorchC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = _TorchConvBN(cin, 192, 1)
        self.branch7x7_1 = _TorchConvBN(cin, c7, 1)
        self.branch7x7_2 = _TorchConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _TorchConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _TorchConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = _TorchConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _TorchConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _TorchConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _TorchConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _TorchConvBN(cin, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        self.last_branch1x1 = b1
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            bd = layer(bd)
        return torch.cat([b1, b7, bd, self.branch_pool(_avg3(x))], 1)


class _TorchD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = _TorchConvBN(cin, 192, 1)
        self.branch3x3_2 = _TorchConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _TorchConvBN(cin, 192, 1)
        self.branch7x7x3_2 = _TorchConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _TorchConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _TorchConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class _TorchE(nn.Module):
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _TorchConvBN(cin, 320, 1)
        self.branch3x3_1 = _TorchConvBN(cin, 384, 1)
        self.branch3x3_2a = _TorchConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _TorchConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _TorchConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = _TorchConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _TorchConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _TorchConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _TorchConvBN(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class _TorchFIDInception(nn.Module):
    """pytorch-fid's FID Inception-v3 layout (torchvision names), taking the (x-128)/128 input."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _TorchConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _TorchConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _TorchConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _TorchConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _TorchConvBN(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _TorchA(192, 32), _TorchA(256, 64), _TorchA(288, 64)
        self.Mixed_6a = _TorchB(288)
        self.Mixed_6b, self.Mixed_6c = _TorchC(768, 128), _TorchC(768, 160)
        self.Mixed_6d, self.Mixed_6e = _TorchC(768, 160), _TorchC(768, 192)
        self.Mixed_7a = _TorchD(768)
        self.Mixed_7b, self.Mixed_7c = _TorchE(1280, max_pool=False), _TorchE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool = x.mean(dim=(2, 3))
        spatial = self.Mixed_6d.last_branch1x1.permute(0, 2, 3, 1)[..., :7].reshape(x.shape[0], -1)
        return {"pool": pool, "spatial": spatial, "logits": pool @ self.fc.weight.T}


@pytest.fixture(scope="module")
def torch_inception(tmp_path_factory):
    """A random-weight FID Inception saved as a .pth, with its features of a few random images.

    Batch norms take their statistics from one batch, then get random scales and shifts.
    """
    torch.manual_seed(0)
    model = _TorchFIDInception()
    with torch.no_grad():
        model.train()
        model(torch.rand(2, 3, 299, 299) * 2 - 1)
        model.eval()
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
        model.fc.bias.normal_()  # present in the file, unused by ADM's softmax
    path = tmp_path_factory.mktemp("inception") / "fid_inception.pth"
    torch.save(model.state_dict(), path)
    rng = np.random.default_rng(1)
    samples = rng.integers(0, 256, (6, 299, 299, 3), dtype=np.uint8)
    ref_images = rng.integers(0, 256, (5, 299, 299, 3), dtype=np.uint8)
    both = _torch_features(model, np.concatenate([samples, ref_images]))
    sample_f = {k: v[:6] for k, v in both.items()}
    ref_f = {k: v[6:] for k, v in both.items()}
    return model, str(path), (samples, sample_f), (ref_images, ref_f)


def _torch_features(model, images_uint8):
    x = torch.from_numpy((images_uint8.astype(np.float32) - 128.0) / 128.0).permute(0, 3, 1, 2)
    with torch.no_grad():
        return {k: v.numpy().astype(np.float64) for k, v in model(x).items()}


def _relative_error(actual, expected):
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


@pytest.mark.slow
@pytest.mark.torch
def test_converted_inception_matches_pytorch_fid_layout(torch_inception):
    _, path, (images, expected), _ = torch_inception
    variables = inception.load_pytorch_fid_weights(path)
    actual = feature_io.extract_features(
        eval_files.inception_apply, variables, iter([images]), 8, feature_io.device_mesh()
    )
    assert actual["pool"].shape == (6, 2048)
    assert actual["spatial"].shape == (6, 2023)
    assert actual["logits"].shape == (6, 1008)
    errors = {name: _relative_error(actual[name], expected[name]) for name in expected}
    print("inception parity, max abs error / max abs value:", errors)
    assert max(errors.values()) < 1e-4, errors


@pytest.mark.torch
def test_inception_weights_of_another_network_are_rejected(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(nn.Linear(3, 4).state_dict(), path)
    with pytest.raises(ValueError, match=r"(?s)other.pth.*missing keys.*unexpected keys:\n  bias"):
        inception.load_pytorch_fid_weights(str(path))
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        inception.load_pytorch_fid_weights(str(tmp_path / "absent.pth"))


@pytest.mark.parametrize("height,width", [(64, 48), (320, 301)])
def test_resize_matches_tensorflow1_resize_bilinear(height, width):
    tf = pytest.importorskip("tensorflow")
    images = np.random.default_rng(0).integers(0, 256, (2, height, width, 3)).astype(np.float32)
    expected = tf.raw_ops.ResizeBilinear(
        images=images, size=[299, 299], align_corners=False, half_pixel_centers=False
    ).numpy()
    actual = np.asarray(inception.tf1_resize_bilinear(images, 299))
    np.testing.assert_allclose(actual, expected, atol=1e-3)


@pytest.mark.slow
@pytest.mark.torch
def test_evaluate_cli_adm_mode_matches_metrics_of_pytorch_features(torch_inception, tmp_path):
    model, _, (samples, sample_f), (ref_images, ref_f) = torch_inception
    # Random weights put every image in one class (IS 1, which would hide a wiring error). Rows
    # along each sample's deviation from the mean, orthogonal to the mean, give each its own class.
    mean = sample_f["pool"].mean(axis=0)
    deviation = sample_f["pool"] - mean
    deviation -= np.outer(deviation @ mean / (mean @ mean), mean)
    fc_weight = np.zeros((1008, 2048), np.float32)
    fc_weight[:6] = 50.0 * deviation / np.sum(deviation**2, axis=1, keepdims=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["fc.weight"] = torch.from_numpy(fc_weight)
    weights = str(tmp_path / "weights.pth")
    torch.save(state, weights)
    expected_logits = sample_f["pool"] @ fc_weight.T.astype(np.float64)
    expected_is = metrics.inception_score_from_logits(expected_logits)
    assert expected_is > 3.0
    # Stored reference statistics (as in ADM's VIRTUAL_*.npz) take precedence over the images'.
    stats = {"mu": np.zeros(2048), "sigma": np.eye(2048), "mu_s": np.zeros(2023), "sigma_s": np.eye(2023)}
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    np.savez(tmp_path / "ref.npz", arr_0=ref_images, **stats)
    out = tmp_path / "metrics.json"
    evaluate.main([
        "--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"),
        "--inception_weights", weights, "--batch_size", "8", "--out", str(out), "--fid_method", "eigh",
    ])
    result = json.loads(out.read_text())

    def fid_to_standard_normal(features):
        # Against N(0, I): Tr(S^½) is the sum of singular values of the centred features / sqrt(n - 1).
        centred = features - features.mean(axis=0)
        root_trace = np.sum(linalg.svdvals(centred)) / np.sqrt(len(features) - 1)
        trace = np.sum(centred**2) / (len(features) - 1)
        return np.sum(features.mean(axis=0) ** 2) + trace + features.shape[1] - 2 * root_trace

    assert result["num_samples"] == 6 and result["num_reference"] == 5
    assert result["fid"] == pytest.approx(fid_to_standard_normal(sample_f["pool"]), rel=1e-3)
    assert result["sfid"] == pytest.approx(fid_to_standard_normal(sample_f["spatial"]), rel=1e-3)
    assert result["is"] == pytest.approx(expected_is, rel=1e-3)
    assert (result["precision"], result["recall"]) == pytest.approx(
        _adm_precision_recall_numpy(ref_f["pool"], sample_f["pool"])
    )


# --- digits -----------------------------------------------------------------------------------


def test_digits_classifier_is_accurate_on_heldout_digits():
    images, labels = digits_arrays()
    _, heldout = digits_features.heldout_split()
    _, logits = digits_features.digits_features(images[heldout])
    accuracy = float(np.mean(np.argmax(logits, axis=1) == labels[heldout]))
    print("digits classifier held-out accuracy:", accuracy)
    assert accuracy > 0.9


def test_digits_metrics_rank_real_digits_above_noise():
    images, labels = digits_arrays()
    order = np.random.default_rng(0).permutation(len(images))
    half_a, half_b = order[: len(order) // 2], order[len(order) // 2 :]
    real = digits_features.digits_metrics(images[half_a], labels=labels[half_a], reference=images[half_b])
    noise = np.random.default_rng(1).uniform(-1, 1, images[half_a].shape).astype(np.float32)
    fake = digits_features.digits_metrics(noise, reference=images[half_b])
    print("digits real-vs-real:", real, "noise-vs-real:", fake)
    assert real["fid"] < 0.05 * fake["fid"]
    assert real["precision"] > 0.7 and real["recall"] > 0.7
    assert fake["precision"] < 0.1
    assert real["accuracy"] > 0.9
    assert real["is"] > 2 * fake["is"]
    wrong = digits_features.digits_metrics(images[half_a], labels=(labels[half_a] + 1) % 10,
                                           reference=images[half_b])
    assert wrong["accuracy"] < 0.1


def test_digits_feature_cache_round_trip(tmp_path):
    params = digits_features.digits_feature_params(str(tmp_path))
    cached = tmp_path / digits_features.CACHE_NAME
    assert cached.is_file()
    again = digits_features.digits_feature_params(str(tmp_path))
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, again)


def test_digits_samples_of_wrong_shape_are_rejected():
    with pytest.raises(ValueError, match=r"\(N, 8, 8\).*\(4, 16, 16, 1\)"):
        digits_features.as_digit_images(np.zeros((4, 16, 16, 1), np.uint8))
    with pytest.raises(ValueError, match="in \\[-1, 1\\]"):
        digits_features.as_digit_images(np.full((4, 8, 8), 200.0))


def test_non_finite_samples_and_features_are_refused():
    samples = np.zeros((6, 8, 8), np.float32)
    samples[2, 3, 3] = np.nan
    with pytest.raises(ValueError, match="1 of 6 digit samples hold NaN"):
        digits_features.as_digit_images(samples)
    features = np.random.default_rng(0).normal(size=(20, 4))
    features[[3, 7], 1] = np.inf
    with pytest.raises(ValueError, match="2 of 20 rows hold NaN or infinite"):
        metrics.feature_statistics(features)
    with pytest.raises(ValueError, match="sample_features: 2 of 20 rows"):
        metrics.precision_recall(np.zeros((20, 4)), features)


def test_evaluate_cli_refuses_nan_samples_in_one_line(tmp_path):
    samples = np.zeros((20, 8, 8), np.float32)
    samples[4] = np.nan
    np.savez(tmp_path / "nan.npz", arr_0=samples)
    done = subprocess.run([sys.executable, "-m", "dico_jax.evaluate", "--digits",
                           "--samples", str(tmp_path / "nan.npz")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("dico_jax.evaluate: error: ")
    assert "nan.npz: 1 of 20 digit samples hold NaN" in done.stderr


def test_evaluate_cli_digits_mode(tmp_path):
    images, labels = digits_arrays()
    pick = np.random.default_rng(0).permutation(len(images))[:300]
    samples = np.clip(np.round((images[pick] + 1.0) * 127.5), 0, 255).astype(np.uint8)
    np.savez(tmp_path / "digits.npz", arr_0=samples, label=labels[pick])
    out = tmp_path / "out" / "metrics.json"
    evaluate.main(["--digits", "--samples", str(tmp_path / "digits.npz"), "--out", str(out),
                   "--cache_dir", str(tmp_path / "cache")])
    result = json.loads(out.read_text())
    assert set(result) >= {"fid", "is", "precision", "recall", "accuracy", "num_samples"}
    assert result["num_samples"] == 300
    assert result["accuracy"] > 0.9
    assert result["fid"] < 10.0
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros((10, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="bad.npz"):
        evaluate.main(["--digits", "--samples", str(tmp_path / "bad.npz")])
    with pytest.raises(SystemExit):
        evaluate.main(["--samples", str(tmp_path / "digits.npz")])  # ADM mode needs --ref and weights
