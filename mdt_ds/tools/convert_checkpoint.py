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


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A raw state_dict from ``.pt`` (loaded without executing pickled code) or ``.safetensors``;
    an official MDT checkpoint works as is. ``{"ema": ...}``/``{"model": ...}`` wrappers are unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    from mdt_ds.safe_load import safe_torch_load

    state = safe_torch_load(path, map_location="cpu")
    for key in ("ema", "model", "state_dict", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    except UnsafeCheckpointError as err:
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
