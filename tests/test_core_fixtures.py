"""Golden values from the official release (sail-sg/MDT 7d26c21), reproduced to 1e-5:
a tiny MDTv2 (full and masked pass) and the diffusion terms of a toy model."""

from __future__ import annotations

import pytest
import torch

from mdt_ds.diffusion import create_diffusion
from mdt_ds.models.mdt import MDTv2

pytestmark = pytest.mark.core

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def release(fixtures_dir):
    return torch.load(fixtures_dir / "mdtv2_tiny_release_outputs.pt", weights_only=True)


@pytest.fixture(scope="module")
def release_model(release) -> MDTv2:
    model = MDTv2(**release["config"])
    model.load_state_dict(release["state_dict"], strict=True)  # the release's keys, no conversion
    return model.eval()


@pytest.fixture(scope="module")
def diffusion_values(fixtures_dir):
    return torch.load(fixtures_dir / "diffusion_release_values.pt", weights_only=True)


def test_state_dict_keys_are_the_release_keys(release, release_model) -> None:
    ours = release_model.state_dict()
    assert set(ours) == set(release["state_dict"])
    for key, value in release["state_dict"].items():
        assert ours[key].shape == value.shape and ours[key].dtype == value.dtype, key


def test_full_pass_matches_release(release, release_model) -> None:
    with torch.no_grad():
        out = release_model(release["x"], release["t"], release["y"])
    torch.testing.assert_close(out, release["out_full"], **TOL)


def test_masked_pass_matches_release(release, release_model) -> None:
    with torch.no_grad():
        out = release_model(
            release["x"],
            release["t"],
            release["y"],
            enable_mask=True,
            mask_noise=release["token_noise"],
            mask_ratio=release["mask_ratio"],
        )
    torch.testing.assert_close(out, release["out_masked"], **TOL)


def test_masking_indices_match_release(release, release_model) -> None:
    m = release_model.draw_masking(
        2, torch.device("cpu"), mask_noise=release["token_noise"], mask_ratio=release["mask_ratio"]
    )
    assert torch.equal(m.ids_keep, release["ids_keep"])
    assert torch.equal(m.ids_restore, release["ids_restore"])
    assert m.ids_keep.shape[1] == int(256 * (1 - release["mask_ratio"])) == 166


def toy_model(weight: torch.Tensor):
    """The fixture's toy model: out = W x + t / 1000, with t the ORIGINAL timestep."""

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.einsum("oc,nchw->nohw", weight, x) + t.float().view(-1, 1, 1, 1) / 1000

    return model


def test_training_losses_match_release(diffusion_values) -> None:
    d = diffusion_values
    diffusion = create_diffusion("")
    out = diffusion.training_losses(toy_model(d["W"]), d["x0"], d["t"], {}, d["noise"])
    for key in ("mse", "vb", "loss"):
        torch.testing.assert_close(out[key], d[key], **TOL, msg=key)
    assert (d["t"] == 0).any()  # the decoder-NLL branch is covered by the fixture


def test_respacing_matches_release(diffusion_values) -> None:
    d = diffusion_values
    spaced = create_diffusion(str(d["respacing"]))
    assert torch.equal(spaced.timestep_map, d["respaced_timesteps"])


def test_p_mean_variance_matches_release(diffusion_values) -> None:
    d = diffusion_values
    spaced = create_diffusion(str(d["respacing"]))
    out = spaced.p_mean_variance(toy_model(d["W"]), d["xt"], d["t_index"])
    torch.testing.assert_close(out["mean"], d["p_mean"], **TOL)
    torch.testing.assert_close(out["log_variance"], d["p_log_variance"], **TOL)
    torch.testing.assert_close(out["pred_xstart"], d["p_pred_xstart"], **TOL)
