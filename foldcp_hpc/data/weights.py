"""Boltz-2 weights: Lightning checkpoints read once by rank 0 and broadcast, or seeded random weights.

A Boltz-2 checkpoint (``boltz2_conf.ckpt``) is a Lightning checkpoint: a pickled dict with ``state_dict``
(parameter and buffer tensors under Boltz-2's own names, no prefix) and ``hyper_parameters`` (the
``Boltz2(...)`` constructor arguments). Its stored hyper-parameters predate some options that ``boltz
predict`` sets when it loads the file (the Pairformer's ``v2=True``, the MSA module's paired feature, the
diffusion and steering settings); :func:`inference_hparams` applies the same overrides, so that the model
built from them has exactly the checkpoint's keys.

Loading is strict: the checkpoint's keys and shapes must equal those of ``Boltz2(**inference_hparams(hp))``
(built on the meta device, no memory), or the load is refused with the missing, unexpected and mismatched
keys. Only rank 0 opens the file (a 2 GB file read by every rank of a large job at once hurts a parallel file
system); the tensors reach the other ranks through the grid's transport in buckets.

``weights = "random"``: ``Boltz2(**hp)`` built by rank 0 with a seed (torch and numpy, which boltz's
initialisers use) and broadcast; the result says ``untrained=True`` so that every output can say so.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from ..distributed.grid import ProcessGrid

__all__ = ["CheckpointError", "Weights", "inference_hparams", "expected_layout", "read_checkpoint",
           "check_layout", "random_weights", "load_weights"]

BUCKET_BYTES = 256 * 1024 * 1024  # broadcast in buckets of at most this many bytes per dtype


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, not Boltz-2's, or not matching its architecture."""


@dataclasses.dataclass
class Weights:
    """Model weights as every rank holds them.

    Attributes:
        state_dict: Boltz-2 parameter and buffer names -> tensors (CPU).
        hparams: the ``Boltz2`` constructor arguments, inference overrides applied.
        source: the checkpoint path, or ``"random (seed S)"``.
        untrained: True for random weights: outputs made with them must say so.
    """

    state_dict: dict[str, torch.Tensor]
    hparams: dict[str, Any]
    source: str
    untrained: bool


def inference_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's hyper-parameters with the overrides ``boltz predict`` applies when it loads them.

    Pairformer ``v2=True`` (Boltz-2's layer; the stored value predates the option), MSA ``use_paired_feature``,
    EMA off, no kernels, steering and every guidance off. Everything else is kept.
    """
    hp = copy.deepcopy(dict(hparams))
    hp["pairformer_args"] = {**hp.get("pairformer_args", {}), "v2": True}
    hp["msa_args"] = {**hp.get("msa_args", {}), "use_paired_feature": True}
    hp["ema"] = False
    hp["use_kernels"] = False
    hp["steering_args"] = {**(hp.get("steering_args") or {}), "fk_steering": False,
                           "physical_guidance_update": False, "contact_guidance_update": False}
    hp.pop("validators", None)
    return hp


def expected_layout(hparams: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of ``Boltz2(**hparams)``'s state dict, built on the meta device (no memory)."""
    from boltz.model.models.boltz2 import Boltz2

    try:
        with torch.device("meta"):
            model = Boltz2(**hparams)
    except Exception as exc:  # noqa: BLE001 - any constructor failure means the hyper-parameters are not Boltz-2's
        raise CheckpointError(f"its hyper-parameters do not build a Boltz-2 model: {type(exc).__name__}: {exc}") from None
    return {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()}


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a Lightning checkpoint on this rank: (state_dict, hyper_parameters). Raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        # a Lightning checkpoint pickles its hyper-parameters as Python objects: full unpickling is needed, as
        # Lightning itself does; checkpoint files are trusted input, like the code that reads them
        blob = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:  # noqa: BLE001 - truncated zip, not a torch file, unpickling errors ...
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(blob, dict) or "state_dict" not in blob:
        kind = type(blob).__name__ if not isinstance(blob, dict) else f"dict with keys {sorted(blob)[:8]}"
        raise CheckpointError(f"{path}: not a Lightning checkpoint (expected a dict with 'state_dict', got {kind})")
    hparams = blob.get("hyper_parameters")
    if not isinstance(hparams, Mapping):
        raise CheckpointError(f"{path}: the checkpoint has no 'hyper_parameters'; it was not saved by Boltz-2's trainer")
    return dict(blob["state_dict"]), dict(hparams)


def check_layout(state: Mapping[str, torch.Tensor], layout: Mapping[str, tuple], where: str) -> None:
    """Refuse ``state`` unless its keys and shapes are exactly ``layout``'s; the message lists the differences."""
    missing = sorted(set(layout) - set(state))
    unexpected = sorted(set(state) - set(layout))
    mismatched = sorted(k for k in set(state) & set(layout) if tuple(state[k].shape) != layout[k][0])
    if not (missing or unexpected or mismatched):
        return

    def listed(names: list[str], describe=lambda k: k) -> str:
        shown = ", ".join(describe(k) for k in names[:8])
        return f"{shown}{f', ... ({len(names)} in all)' if len(names) > 8 else ''}"

    parts = []
    if missing:
        parts.append(f"missing {len(missing)}: {listed(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)}: {listed(unexpected)}")
    if mismatched:
        parts.append("wrong shape {}: {}".format(len(mismatched), listed(
            mismatched, lambda k: f"{k} {tuple(state[k].shape)} != {layout[k][0]}")))
    raise CheckpointError(f"{where}: not a Boltz-2 checkpoint of this architecture ({len(state)} keys, "
                          f"expected {len(layout)}); " + "; ".join(parts))


def random_weights(hparams: Mapping[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """``Boltz2(**hparams)``'s initial state dict with torch and numpy seeded (boltz's initialisers use both)."""
    import numpy
    from boltz.model.models.boltz2 import Boltz2

    torch.manual_seed(seed)
    numpy.random.seed(seed % 2**32)
    return {k: v.detach() for k, v in Boltz2(**hparams).state_dict().items()}


def load_weights(grid: "ProcessGrid", source: str | Path, hparams: Mapping[str, Any] | None = None,
                 seed: int = 0) -> Weights:
    """Weights on every rank: rank 0 reads ``source`` (a checkpoint path, or ``"random"``) and broadcasts.

    hparams: for ``"random"``, the ``Boltz2`` arguments (default: the released model's); for a checkpoint,
        ignored (the checkpoint's own are used, with :func:`inference_hparams`).
    Raises CheckpointError on rank 0 (the error policy then ends the whole job).
    """
    package = None
    if grid.rank == 0:
        if str(source) == "random":
            if hparams is None:
                from .boltz2_hparams import boltz2_hparams

                hparams = boltz2_hparams()
            hp = inference_hparams(hparams)
            state = random_weights(hp, seed)
            label, untrained = f"random (seed {seed})", True
        else:
            state, stored = read_checkpoint(source)
            hp = inference_hparams(stored)
            check_layout(state, expected_layout(hp), str(source))
            label, untrained = str(source), False
        package = (hp, label, untrained, [(k, tuple(v.shape), v.dtype) for k, v in state.items()])
    hp, label, untrained, entries = grid.comm.bcast(package, root=0)
    if grid.rank != 0:
        state = {name: torch.empty(shape, dtype=dtype) for name, shape, dtype in entries}
    _broadcast_tensors([state[name] for name, _, _ in entries], grid)
    return Weights(state_dict=state, hparams=hp, source=label, untrained=untrained)


def _broadcast_tensors(tensors: list[torch.Tensor], grid: "ProcessGrid") -> None:
    """Copy rank 0's tensors into every rank's tensors of the same shapes, in flat buckets per dtype."""
    if grid.world_size == 1:
        return
    transport = grid.transport
    device = grid.device if transport.backend == "nccl" else torch.device("cpu")
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for dtype, group in by_dtype.items():
        bucket: list[torch.Tensor] = []
        size = 0
        for tensor in group + [None]:  # None flushes the last bucket
            if tensor is not None and (size + tensor.numel() * tensor.element_size() <= BUCKET_BYTES or not bucket):
                bucket.append(tensor)
                size += tensor.numel() * tensor.element_size()
                continue
            flat = torch.cat([t.reshape(-1) for t in bucket]).to(device) if grid.rank == 0 else \
                torch.empty(sum(t.numel() for t in bucket), dtype=dtype, device=device)
            dist.broadcast(flat, src=0)
            if grid.rank != 0:
                offset = 0
                for t in bucket:
                    t.copy_(flat[offset:offset + t.numel()].view_as(t))
                    offset += t.numel()
            bucket, size = ([tensor], tensor.numel() * tensor.element_size()) if tensor is not None else ([], 0)
