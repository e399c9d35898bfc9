"""Turn a training checkpoint into plain fp32 model weights (official key names).

    python -m mdt_ds.tools.convert_checkpoint RUN_DIR/checkpoints/step_0005000 OUT.pt [--ema]

Without ``--ema`` the fp32 master weights are consolidated from the ZeRO shards (DeepSpeed's
zero_to_fp32, runs in one plain process); with ``--ema`` the matching EMA snapshot is copied.
The result loads with ``MDTv2.load_state_dict(strict=True)`` and serves as ``init_from=`` for a
new run on another number of processes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mdt_ds.clihelp import HelpFormatter
from mdt_ds.config import ConfigError

HF_PREFIX = "hf://"


class WeightsFileError(ConfigError):
    """A weights file (``--ckpt``, ``init_from``) is missing, not in the hub cache, or not a
    state_dict; the message names the file, what was expected and the fix."""


def resolve_weights_path(spec: str | Path) -> Path:
    """A local file, or ``hf://OWNER/NAME[@REVISION]/PATH/IN/REPO`` through ``hf_hub_download``
    (its cache, and ``HF_HUB_OFFLINE=1`` to stay offline)."""
    text = str(spec)
    if not text.startswith(HF_PREFIX):
        path = Path(text).expanduser()
        if path.is_dir():
            raise WeightsFileError(_folder_message(path))
        if not path.is_file():
            raise WeightsFileError(f"weights file {path} does not exist")
        return path
    parts = text[len(HF_PREFIX) :].split("/")
    if len(parts) < 3 or not all(parts):
        raise WeightsFileError(
            f"{text}: expected hf://OWNER/NAME/FILE (e.g. {HF_PREFIX}shgao/MDT-XL2/mdt_xl2_v2_ckpt.pt)"
        )
    repo, _, revision = "/".join(parts[:2]).partition("@")
    filename = "/".join(parts[2:])
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(repo, filename, revision=revision or None))
    except (OSError, ValueError, EntryNotFoundError) as err:
        why = (
            "HF_HUB_OFFLINE is set, so nothing is downloaded, and it is not in the hub cache"
            if constants.HF_HUB_OFFLINE
            else "it could not be downloaded (no network, no access, or no such file) and is not in the hub cache"
        )
        rev = f" --revision {revision}" if revision else ""
        raise WeightsFileError(
            f"cannot get {filename} of the Hugging Face repo {repo} ({text}): {why} {constants.HF_HUB_CACHE}. "
            f"Fetch it where there is internet: hf download {repo} {filename}{rev} (then copy the cache or "
            f"point HF_HUB_CACHE at it), or pass the local file. "
            f"Cause: {type(err).__name__}: {' '.join(str(err).split())[:200]}"
        ) from None


def _folder_message(path: Path) -> str:
    """What to pass instead of a folder: a training checkpoint folder has a weights file beside it
    (the run's EMA snapshot) and converts into one."""
    if (path / "meta.json").is_file() or path.name.startswith("step_"):
        run = path.parent.parent
        return (
            f"{path} is a training checkpoint folder, not a weights file: use an EMA snapshot "
            f"({run / 'snapshots'}/ema_*.pt), or convert it: python -m mdt_ds.tools.convert_checkpoint {path} OUT.pt"
        )
    return f"{path} is a folder, not a weights file: pass a .pt/.pth or .safetensors file"


# How a torch.save file starts: a zip archive (torch >= 1.6) or a pickle of protocol 2 or later.
_CHECKPOINT_MAGIC = (b"PK\x03\x04", b"\x80")


def _check_magic(path: Path, expected: str) -> None:
    """Refuse a file that is neither a zip nor a pickle (a config.json, notes) as "not a
    checkpoint": the weights-only unpickler would call its bytes unsafe pickled code."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not head.startswith(_CHECKPOINT_MAGIC):
        kind = " (it holds JSON, e.g. a run's config.json)" if head[:1] in (b"{", b"[") else ""
        raise WeightsFileError(f"{path} is not a checkpoint{kind}: expected {expected}")


def _read_weights(path: Path) -> object:
    """The file's content, loaded without executing pickled code; a file that is no checkpoint
    (text, a truncated download) is reported as such instead of the unpickler's KeyError."""
    from mdt_ds.safe_load import UnsafeCheckpointError, safe_torch_load

    expected = "a state_dict saved by torch.save (.pt/.pth) or a .safetensors file"
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        _check_magic(path, expected)
        return safe_torch_load(path, map_location="cpu")
    except (UnsafeCheckpointError, WeightsFileError):
        raise
    except Exception as err:  # torch/safetensors raise KeyError, RuntimeError, EOFError... on foreign bytes
        raise WeightsFileError(
            f"{path} is not a checkpoint: expected {expected} ({type(err).__name__}: {' '.join(str(err).split())[:120]})"
        ) from None


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A raw state_dict from ``.pt`` (loaded without executing pickled code) or ``.safetensors``,
    local or ``hf://OWNER/NAME/FILE`` (see :func:`resolve_weights_path`); an official MDT checkpoint
    works as is. ``{"ema": ...}``/``{"model": ...}`` wrappers are unwrapped. Raises
    :class:`WeightsFileError` (a :class:`~mdt_ds.config.ConfigError`) for a missing or foreign file."""
    path = resolve_weights_path(path)
    state = _read_weights(path)
    for key in ("ema", "model", "state_dict", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsFileError(
            f"{path} is not a state_dict: expected a mapping of parameter names to tensors "
            f"(or one under 'ema'/'model'/'state_dict'/'module'), got {type(state).__name__}"
        )
    return state


def consolidate(checkpoint: Path) -> dict[str, torch.Tensor]:
    """fp32 weights from the ZeRO shards of ``checkpoint`` (DeepSpeed's zero_to_fp32). Its
    ``torch.load(weights_only=False)`` calls run weights-only here: a file holding pickled code
    raises :class:`mdt_ds.safe_load.UnsafeCheckpointError` naming it, and nothing in it runs."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from mdt_ds.safe_load import deepspeed_weights_only

    with deepspeed_weights_only():
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    return {k: v.float() for k, v in state.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a checkpoints/step_XXXXXXX directory")
    parser.add_argument("output", type=Path, help="output .pt or .safetensors")
    parser.add_argument("--ema", action="store_true", help="take the EMA snapshot of that step")
    args = parser.parse_args(argv)
    if not (args.checkpoint / "meta.json").is_file():
        print(f"{args.checkpoint} is not a complete mdt-ds checkpoint (no meta.json)", file=sys.stderr)
        return 2
    from mdt_ds.safe_load import UnsafeCheckpointError

    try:
        if args.ema:
            step = args.checkpoint.name.split("_")[-1]
            state = load_state_dict_file(args.checkpoint.parent.parent / "snapshots" / f"ema_{step}.pt")
        else:
            state = consolidate(args.checkpoint)
    except (UnsafeCheckpointError, WeightsFileError) as err:
        print(f"convert_checkpoint: {err}", file=sys.stderr)
        return 2
    if args.output.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(args.output))
    else:
        torch.save(state, args.output)
    print(f"wrote {len(state)} tensors to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
