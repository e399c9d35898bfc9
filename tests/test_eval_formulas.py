"""Metric formulas against independent implementations on fixed features; the ADM file format;
TF1 resize and the NHWC sFID slicing. No Inception weights needed."""

from __future__ import annotations

import inspect
import math
import zipfile

import numpy as np
import pytest
import torch
from scipy import linalg

from mdt_ds.metrics.inception import sfid_features, tf1_resize_bilinear
from mdt_ds.metrics.npz import AdmBatch, NpzFormatError, NpzWriter
from mdt_ds.metrics.precision_recall import manifold_radii, pairwise_distances, precision_recall
from mdt_ds.metrics.stats import FeatureStats, compute_statistics, frechet_distance, inception_score

pytestmark = pytest.mark.evaluation


@pytest.fixture(scope="module")
def features() -> tuple[np.ndarray, np.ndarray]:
    """Two fixed Gaussian feature sets with different means and covariances (seed 0)."""
    rng = np.random.default_rng(0)
    dim = 64
    a = rng.standard_normal((1000, dim))
    mix = np.eye(dim) + 0.3 * rng.standard_normal((dim, dim)) / math.sqrt(dim)
    b = rng.standard_normal((1200, dim)) @ mix + 0.2
    return a, b


def adm_frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """ADM's FIDStatistics.frechet_distance, verbatim (with disp=False where SciPy still has it)."""
    diff = mu1 - mu2
    if "disp" in inspect.signature(linalg.sqrtm).parameters:
        with np.testing.suppress_warnings() as sup:
            sup.filter(DeprecationWarning)
            covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    else:
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def test_fid_bit_for_bit_with_adm(features) -> None:
    a, b = features
    mu1, s1 = np.mean(b, axis=0), np.cov(b, rowvar=False)
    mu2, s2 = np.mean(a, axis=0), np.cov(a, rowvar=False)
    assert compute_statistics(b)[0].tobytes() == mu1.tobytes()
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == adm_frechet_distance(mu1, s1, mu2, s2)
    assert ours > 1.0


def test_fid_eigenvalue_forms_agree(features) -> None:
    """torch-fidelity's eigenvalue form (independent) and our eigh form match ADM's sqrtm."""
    a, b = features
    (mu1, s1), (mu2, s2) = compute_statistics(b), compute_statistics(a)
    adm = adm_frechet_distance(mu1, s1, mu2, s2)
    eig = np.linalg.eigvals(s1 @ s2)
    fidelity = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eig.astype(complex)).real.sum()
    assert fidelity == pytest.approx(adm, rel=1e-10)
    assert frechet_distance(mu1, s1, mu2, s2, method="eigh") == pytest.approx(adm, rel=1e-10)


def test_sufficient_statistics_over_simulated_ranks(features) -> None:
    """Four 'ranks' of float64 sums reduce to the single-process statistics (EVALUATION.md)."""
    a, b = features
    ranks = [FeatureStats(a.shape[1]) for _ in range(4)]
    for i, part in enumerate(np.array_split(b, 4)):
        for batch in np.array_split(part, 3):
            ranks[i].update(torch.from_numpy(batch))
    total = ranks[0]
    for other in ranks[1:]:
        total.merge(other)
    mu, sigma = total.mean_cov()
    assert total.n == len(b)
    ref_mu, ref_sigma = compute_statistics(a)
    exact = adm_frechet_distance(np.mean(b, 0), np.cov(b, rowvar=False), ref_mu, ref_sigma)
    assert frechet_distance(mu, sigma, ref_mu, ref_sigma) == pytest.approx(exact, rel=1e-9)


def test_fid_of_a_set_with_itself_is_zero(features) -> None:
    _, b = features
    mu, sigma = compute_statistics(b)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9
    assert abs(frechet_distance(mu, sigma, mu, sigma, method="eigh")) < 1e-9


def test_fid_rejects_mixed_feature_kinds() -> None:
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(4), np.eye(4), np.zeros(3), np.eye(3))


def test_inception_score_by_hand() -> None:
    probs = np.array([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4]])
    kl = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert inception_score(probs[:2]) == pytest.approx(math.exp(kl), rel=1e-12)
    # Sequential splits, the short last one included: (IS of the first two + exp(0)) / 2.
    assert inception_score(probs, split_size=2) == pytest.approx((math.exp(kl) + 1.0) / 2, rel=1e-12)
    assert inception_score(np.full((5, 4), 0.25)) == pytest.approx(1.0)


def _on_line(xs) -> torch.Tensor:
    pts = torch.zeros(len(xs), 3)
    pts[:, 0] = torch.tensor(xs, dtype=torch.float32)
    return pts


def test_precision_recall_by_hand() -> None:
    """Reference 0..4 on a line: k=3 radii (squared) 9, 4, 4, 4, 9. Samples 2.5 and 3.5 fall
    inside reference balls, 20 and 21 do not: precision 1/2; every reference point lies in a
    sample ball (their 3rd neighbours are far): recall 1."""
    ref, sample = _on_line([0, 1, 2, 3, 4]), _on_line([2.5, 3.5, 20, 21])
    assert manifold_radii(ref, fp16=False).tolist() == [9, 4, 4, 4, 9]
    assert precision_recall(ref, sample, fp16=False) == (0.5, 1.0)
    assert precision_recall(ref, sample) == (0.5, 1.0)
    assert precision_recall(sample, ref, fp16=False) == (1.0, 0.5)


def test_precision_recall_matches_brute_force_and_blocking() -> None:
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(150, 16, generator=gen)
    sample = torch.randn(130, 16, generator=gen) * 1.3 + 0.3
    d_rr = torch.cdist(ref.double(), ref.double()) ** 2
    d_ss = torch.cdist(sample.double(), sample.double()) ** 2
    d_rs = torch.cdist(ref.double(), sample.double()) ** 2
    r_ref = torch.from_numpy(np.partition(d_rr.numpy(), 3, axis=1)[:, 3])
    r_sam = torch.from_numpy(np.partition(d_ss.numpy(), 3, axis=1)[:, 3])
    precision = (d_rs <= r_ref[:, None]).any(0).double().mean().item()
    recall = (d_rs <= r_sam[None, :]).any(1).double().mean().item()
    ours = precision_recall(ref, sample, fp16=False)
    assert ours == pytest.approx((precision, recall), abs=2 / 130)
    assert precision_recall(ref, sample, fp16=False, batch=7) == ours
    assert torch.equal(manifold_radii(ref, batch=11), manifold_radii(ref))


def test_fp16_distances_fall_back_to_fp32_on_overflow() -> None:
    gen = torch.Generator().manual_seed(1)
    small = torch.rand(8, 32, generator=gen)
    d16, d32 = pairwise_distances(small, small), pairwise_distances(small, small, fp16=False)
    assert not torch.equal(d16, d32) and torch.allclose(d16, d32, atol=0.05)
    big = small * 300  # |u|^2 ~ 1e6 > 65504: float16 overflows, the block is redone in float32
    assert torch.equal(pairwise_distances(big, big), pairwise_distances(big, big, fp16=False))


def tf1_resize_reference(img: np.ndarray, size: int) -> np.ndarray:
    """TF1 legacy bilinear resize written from its definition (EVALUATION.md): output pixel d
    samples source coordinate d * in / out between floor and floor + 1, clamped at the edge."""

    def axis_weights(n_in: int):
        src = np.arange(size) * n_in / size
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    ylo, yhi, fy = axis_weights(img.shape[0])
    xlo, xhi, fx = axis_weights(img.shape[1])
    rows = img[ylo] * (1 - fy)[:, None, None] + img[yhi] * fy[:, None, None]
    return rows[:, xlo] * (1 - fx)[None, :, None] + rows[:, xhi] * fx[None, :, None]


@pytest.mark.parametrize("size_in", [28, 64, 256])
def test_tf1_resize_matches_its_definition(size_in: int) -> None:
    img = np.random.default_rng(size_in).integers(0, 256, (size_in, size_in, 3)).astype(np.float64)
    ours = tf1_resize_bilinear(torch.from_numpy(img).permute(2, 0, 1)[None].float(), 299)[0].permute(1, 2, 0)
    # float32 grid arithmetic: NVIDIA reports 0.004 (of 255) against TF itself; we see < 0.005.
    assert np.abs(ours.double().numpy() - tf1_resize_reference(img, 299)).max() < 1e-2
    plain = torch.nn.functional.interpolate(
        torch.from_numpy(img).permute(2, 0, 1)[None].float(), (299, 299), mode="bilinear", align_corners=False
    )[0].permute(1, 2, 0)
    assert np.abs(plain.double().numpy() - tf1_resize_reference(img, 299)).max() > 1.0  # not ADM's resize


def test_sfid_slices_nhwc_like_tensorflow() -> None:
    tf_nhwc = torch.randn(2, 17, 17, 192)  # what TF's mixed_6/conv gives
    ours = sfid_features(tf_nhwc.permute(0, 3, 1, 2))  # a PyTorch port computes NCHW
    expected = tf_nhwc[..., :7].reshape(2, -1)
    assert ours.shape == (2, 2023) and torch.equal(ours, expected)
    nchw_bug = tf_nhwc.permute(0, 3, 1, 2)[:, :7].reshape(2, -1)
    assert not torch.equal(nchw_bug, expected)


# --------------------------------------------------------------------------- file format
def _images(n=5, size=8) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_adm_batch_memory_maps_and_reads_stats(tmp_path) -> None:
    images = _images()
    np.savez(tmp_path / "a.npz", images, np.arange(5), mu=np.ones(3), sigma=np.eye(3))
    batch = AdmBatch(tmp_path / "a.npz")
    assert isinstance(batch.images, np.memmap) and np.array_equal(batch.images, images)
    assert np.array_equal(batch.labels, np.arange(5))
    assert set(batch.statistics()) == {"pool"}
    np.savez_compressed(tmp_path / "c.npz", images)
    assert np.array_equal(AdmBatch(tmp_path / "c.npz").images, images)


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"arr_0": _images().astype(np.float32)}, "uint8"),
        ({"arr_0": _images().transpose(0, 3, 1, 2).copy()}, "NCHW"),
        ({"arr_0": _images()[..., :1].copy()}, "repeat"),
        ({"arr_0": _images()[0]}, r"\[N, H, W, 3\]"),
        ({"images": _images()}, "no 'arr_0'"),
    ],
)
def test_bad_npz_gives_a_clear_error(tmp_path, arrays, match) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(NpzFormatError, match=match):
        AdmBatch(tmp_path / "bad.npz")


def test_not_an_npz(tmp_path) -> None:
    (tmp_path / "x.npz").write_text("hello")
    with pytest.raises(NpzFormatError, match="not an .npz"):
        AdmBatch(tmp_path / "x.npz")
    with pytest.raises(NpzFormatError, match="no such file"):
        AdmBatch(tmp_path / "missing.npz")


def test_npz_writer_streams_deterministic_files(tmp_path) -> None:
    images = _images(12)
    for name in ("one.npz", "two.npz"):
        with NpzWriter(tmp_path / name) as writer:
            writer.stream("arr_0", images.shape, np.uint8, [images[:5], images[5:9], images[9:]])
            writer.add("arr_1", np.arange(12))
    assert (tmp_path / "one.npz").read_bytes() == (tmp_path / "two.npz").read_bytes()
    with np.load(tmp_path / "one.npz") as data:
        assert np.array_equal(data["arr_0"], images) and np.array_equal(data["arr_1"], np.arange(12))
    assert isinstance(AdmBatch(tmp_path / "one.npz").images, np.memmap)
    with zipfile.ZipFile(tmp_path / "one.npz") as zf:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
    with pytest.raises(ValueError, match="bytes"), NpzWriter(tmp_path / "short.npz") as writer:
        writer.stream("arr_0", images.shape, np.uint8, [images[:5]])
    assert not (tmp_path / "short.npz").exists() and not (tmp_path / "short.npz.tmp").exists()
