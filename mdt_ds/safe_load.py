"""Load DeepSpeed's checkpoint files without executing pickled code.

DeepSpeed reads ``mp_rank_*_model_states.pt`` and ``*_optim_states.pt`` with
``torch.load(..., weights_only=False)`` (its ``TorchCheckpointEngine.load``, the ZeRO optimizers
and ``zero_to_fp32`` hard-code it), so a crafted file in a run directory runs its payload on
resume or conversion. Inside :func:`deepspeed_weights_only` every ``torch.load`` is a
weights-only load, whatever its caller asked for:

- ``torch.load`` itself is wrapped (DeepSpeed calls it as ``torch.load`` at call time), the
  wrapper forces ``weights_only=True`` and turns a refusal into :class:`UnsafeCheckpointError`
  naming the file;
- ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` is set as well: torch 2.14's ``torch.serialization.load``
  reads it at every call and it overrides an explicit ``weights_only=False``, so a caller that
  bound ``torch.serialization.load`` before the wrapper was installed is covered too;
- exactly the non-tensor types DeepSpeed's own files hold are allowed through
  ``torch.serialization.safe_globals`` (:func:`deepspeed_safe_globals`, found by loading real
  ZeRO-0/1/2/3 checkpoints of fp32, bf16 and fp16 runs). They are plain data classes and enums:
  unpickling them calls no code of the file's choosing.

The environment variable and the wrapper are process-wide while the context is open; use it
around a load, not around training.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["UnsafeCheckpointError", "safe_torch_load", "deepspeed_safe_globals", "deepspeed_weights_only"]

FORCE_VAR = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
NO_FORCE_VAR = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds pickled code (or objects of types that are not plain data); it was
    not loaded. ``path`` is the file."""

    def __init__(self, path: str, detail: str) -> None:
        self.path = path
        self.detail = detail
        super().__init__(
            f"{path} holds pickled code or objects that are not plain tensors/data; it was NOT loaded "
            f"(mdt-ds loads checkpoints weights-only, so a crafted file cannot run code). "
            f"Refused: {detail}. Replace the file with a genuine checkpoint, or resume from another one."
        )


def deepspeed_safe_globals() -> list[Any]:
    """The DeepSpeed (and stdlib) types DeepSpeed writes into its model and optimizer state files.

    Found with ``torch.serialization.get_unsafe_globals_in_checkpoint`` on real 1-process
    checkpoints of ZeRO-0/1/2/3 in fp32, bf16 and fp16 (see tests/test_safe_load.py). Imported
    lazily: DeepSpeed is heavy and only needed when its files are read."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _describe(f: Any) -> str:
    if isinstance(f, (str, os.PathLike)):
        return str(Path(f))
    return str(getattr(f, "name", repr(f)))


def _refusal(err: BaseException) -> str:
    text = str(err)
    for line in text.splitlines():
        if "GLOBAL" in line or "Unsupported" in line or "blocked" in line:
            return line.strip().removeprefix("WeightsUnpickler error:").strip().rstrip(".")
    return text.splitlines()[-1].strip() if text.strip() else type(err).__name__


def _safe_load_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        kwargs.pop("pickle_module", None)  # weights_only refuses a custom unpickler
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpointError(_describe(f), _refusal(err)) from None

    load.__wrapped__ = original  # type: ignore[attr-defined]
    load.__doc__ = "torch.load, forced weights-only by mdt_ds.safe_load.deepspeed_weights_only"
    return load


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with a refusal reported as
    :class:`UnsafeCheckpointError` naming the file instead of torch's long UnpicklingError."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(_describe(path), _refusal(err)) from None


@contextlib.contextmanager
def deepspeed_weights_only(extra_safe_globals: list[Any] | None = None) -> Iterator[None]:
    """Every ``torch.load`` inside is weights-only (an explicit ``weights_only=False`` included),
    with DeepSpeed's checkpoint types allowed. A file that needs anything else raises
    :class:`UnsafeCheckpointError` naming it; nothing in it runs.

    Wrap ``engine.load_checkpoint(...)`` and ``zero_to_fp32`` calls in it."""
    saved_env = {name: os.environ.get(name) for name in (FORCE_VAR, NO_FORCE_VAR)}
    original = torch.load
    os.environ[FORCE_VAR] = "1"
    os.environ.pop(NO_FORCE_VAR, None)  # both set is an error in torch.load
    torch.load = _safe_load_wrapper(original)
    try:
        with torch.serialization.safe_globals([*deepspeed_safe_globals(), *(extra_safe_globals or [])]):
            try:
                yield
            except pickle.UnpicklingError as err:  # a loader that bypassed the wrapper
                raise UnsafeCheckpointError("a checkpoint file", _refusal(err)) from None
    finally:
        torch.load = original
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
