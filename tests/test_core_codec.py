"""Codecs: the pixel identity and the SD VAE through diffusers (a tiny random AutoencoderKL),
loading from a local directory offline, and a clear error when hub weights are absent."""

from __future__ import annotations

import pytest
import torch

from mdt_ds.models.codec import (
    SD_VAE_SCALE,
    TINY_VAE_CONFIG,
    CodecError,
    PixelCodec,
    VAECodec,
    load_codec,
)

pytestmark = pytest.mark.core


@pytest.fixture(scope="module")
def tiny_vae() -> VAECodec:
    return VAECodec.from_config(TINY_VAE_CONFIG, seed=0)


def images(n: int = 2, h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_pixel_codec_is_identity() -> None:
    codec = load_codec("pixel", channels=1)
    assert isinstance(codec, PixelCodec) and codec.channels == 1 and codec.scale_factor == 1.0
    x = images()
    assert torch.equal(codec.encode(x), x)
    assert torch.equal(codec.encode_moments(x), x)
    assert torch.equal(codec.decode(x), x)
    assert torch.equal(codec.decode(x * 3), (x * 3).clamp(-1, 1))  # decoded pixels stay in [-1, 1]


def test_vae_shapes(tiny_vae: VAECodec) -> None:
    assert tiny_vae.channels == 4 and tiny_vae.scale_factor == SD_VAE_SCALE == 0.18215
    x = images(2, 64, 64)
    moments = tiny_vae.encode_moments(x)
    assert moments.shape == (2, 8, 8, 8)  # [mean, logvar] of 4 channels at H/8 x W/8
    assert tiny_vae.encode_moments(images(1, 32, 48)).shape == (1, 8, 4, 6)
    latents = tiny_vae.encode(x, generator=torch.Generator().manual_seed(0))
    assert latents.shape == (2, 4, 8, 8)
    decoded = tiny_vae.decode(latents)
    assert decoded.shape == (2, 3, 64, 64) and decoded.dtype == torch.float32 and torch.isfinite(decoded).all()


def test_vae_encode_is_scaled_posterior_sample(tiny_vae: VAECodec) -> None:
    x = images(2)
    mean, logvar = tiny_vae.encode_moments(x).chunk(2, dim=1)
    a = tiny_vae.encode(x, generator=torch.Generator().manual_seed(5))
    b = tiny_vae.encode(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, (mean + (0.5 * logvar).exp() * eps) * SD_VAE_SCALE)
    with torch.no_grad():
        want = tiny_vae.vae.decode(a / SD_VAE_SCALE).sample
    torch.testing.assert_close(tiny_vae.decode(a), want)


def test_vae_from_local_directory_offline(tiny_vae: VAECodec, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_vae.vae.save_pretrained(tmp_path / "vae")
    loaded = VAECodec.from_pretrained(str(tmp_path / "vae"))
    assert loaded.source == str(tmp_path / "vae")
    assert isinstance(load_codec(str(tmp_path / "vae")), VAECodec)  # a directory is recognised by name
    x = images(1)
    torch.testing.assert_close(loaded.encode_moments(x), tiny_vae.encode_moments(x), atol=0, rtol=0)
    assert not any(p.requires_grad for p in loaded.vae.parameters()) and not loaded.vae.training


def test_missing_hub_weights_offline_fail_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = "mdt-ds-tests/no-such-vae"
    with pytest.raises(CodecError) as err:
        VAECodec.from_pretrained(repo)
    msg = str(err.value)
    assert repo in msg and "HF_HUB_OFFLINE" in msg and "local directory" in msg


def test_unknown_codec_name() -> None:
    with pytest.raises(CodecError, match="pixel"):
        load_codec("jpeg")


def test_a_missing_local_vae_folder_is_not_advised_as_a_hub_download(tmp_path) -> None:
    """A moved VAE folder (as a manifest records it) was tried as a hub id: `hf download /a/path`."""
    for name in (str(tmp_path / "moved-vae"), "./moved-vae", "runs/x/vae"):
        with pytest.raises(CodecError) as err:
            load_codec(name)
        assert str(err.value) == (f"the VAE folder {name} does not exist (moved, or not copied to this machine?): "
                                  "pass the path where it is now")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CodecError, match=r"empty is not a VAE folder \(it holds no config.json.*pass the folder that does$"):
        load_codec(str(tmp_path / "empty"))


def test_a_hub_vae_comes_from_the_local_cache_before_the_network(tiny_vae, monkeypatch) -> None:
    """Online (HF_HUB_OFFLINE unset), a cached hub id made the hub client retry the network
    (28 s here) before loading: the cache is tried first; only a miss goes online."""
    from diffusers import AutoencoderKL

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls: list[bool] = []
    cached = {"stabilityai/sd-vae-ft-ema"}

    def from_pretrained(repo, local_files_only=False, **kwargs):
        calls.append(local_files_only)
        if local_files_only and repo not in cached:
            raise OSError(f"{repo} is not in the cache")
        return tiny_vae.vae

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", from_pretrained)
    assert VAECodec.from_pretrained("ema").source == "stabilityai/sd-vae-ft-ema" and calls == [True]
    calls.clear()
    VAECodec.from_pretrained("someone/other-vae")
    assert calls == [True, False]  # not cached: then downloaded
