"""``python -m foldcp_hpc.bench.accuracy --n 1024``: one Pairformer layer's error against float64, ours and boltz's.

Random weights with every parameter perturbed (boltz zero-initialises output layers), the same input; the
reference is boltz's layer in float64. Rows: our layer in float32, our fast path (z stored in bfloat16 under
autocast, flash triangle attention on CUDA), boltz's layer under bfloat16 autocast (and with cuEquivariance's
kernels when ``cuequivariance_torch`` imports). Prints the relative error (Frobenius norm of the difference
over the reference's) of z and s. ``--parts`` also prints our fast path's error with each sub-module run without
autocast in turn (the others under it): which sub-module's roundings the error comes from.
"""

from __future__ import annotations

import argparse
import contextlib

import numpy as np
import torch


PARTS = ("tri_mul_out", "tri_mul_in", "tri_att_start", "tri_att_end", "transition_z", "attention", "transition_s")


@contextlib.contextmanager
def _without_autocast(module: torch.nn.Module, device_type: str):
    """Run ``module``'s ``forward`` and ``add_update`` with autocast off on ``device_type`` (inputs as they come)."""
    def plain(fn):
        def call(*args, **kwargs):
            with torch.autocast(device_type, enabled=False):
                return fn(*args, **kwargs)
        return call

    names = [name for name in ("forward", "add_update") if hasattr(module, name)]
    for name in names:
        setattr(module, name, plain(getattr(module, name)))
    try:
        yield
    finally:
        for name in names:
            delattr(module, name)


def _relative(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def main(argv=None) -> None:
    from boltz.model.layers.pairformer import PairformerLayer as BoltzLayer

    from ..distributed import ProcessGrid
    from ..model.pairformer import PairformerLayer, tri_attn_chunk_size

    parser = argparse.ArgumentParser(prog="python -m foldcp_hpc.bench.accuracy")
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--scale", type=float, default=0.05, help="std of the perturbation added to every weight")
    parser.add_argument("--parts", action="store_true", help="also each sub-module without autocast in turn")
    args = parser.parse_args(argv)
    n = args.n
    with ProcessGrid.create(backend="auto") as grid, torch.no_grad():
        device = grid.device
        torch.manual_seed(0)
        np.random.seed(0)
        ref = BoltzLayer(384, 128, v2=True).to(device).eval()
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * args.scale)
        ours = PairformerLayer(384, 128, v2=True, grid=grid).to(device).eval()
        ours.load_state_dict(ref.state_dict())
        gen = torch.Generator(device=device).manual_seed(1)
        z = torch.randn(1, n, n, 128, device=device, generator=gen)
        s = torch.randn(1, n, 384, device=device, generator=gen)
        mask = torch.ones(1, n, device=device)
        mask[:, n - n // 16:] = 0  # some masked tokens
        pair_mask = mask[:, :, None] * mask[:, None, :]
        chunk = tri_attn_chunk_size(n, False)
        keep = pair_mask[..., None].double()
        torch.backends.cuda.matmul.allow_tf32 = False  # the reference: boltz in float32, IEEE products
        s_ref, z_ref = ref(s, z, mask, pair_mask, chunk)
        s_ref, z_ref = s_ref.double(), z_ref.double() * keep
        rows = []
        auto = torch.autocast(device.type, dtype=torch.bfloat16)

        def row(name, s_out, z_out):
            rows.append((name, _relative(z_out * keep, z_ref), _relative(s_out, s_ref)))

        s_out, z_out = ours(s, z.clone(), mask, pair_mask, chunk, inplace=True)
        row("foldcp_hpc float32", s_out, z_out)
        with auto:
            s_out, z_out = ours(s, z.clone(), mask, pair_mask, chunk, inplace=True)
        row("foldcp_hpc autocast bf16, z stored float32", s_out, z_out)
        with auto:
            s_out, z_out = ours(s, z.to(torch.bfloat16), mask, pair_mask, chunk, inplace=True)
        row("foldcp_hpc autocast bf16, z stored bf16", s_out, z_out)
        for name in (PARTS if args.parts else ()):
            with _without_autocast(getattr(ours, name), device.type), auto:
                s_out, z_out = ours(s, z.clone(), mask, pair_mask, chunk, inplace=True)
            row(f"  z stored float32, {name} without autocast", s_out, z_out)
        with auto:
            s_out, z_out = ref(s, z, mask, pair_mask, chunk)
        row("boltz autocast bf16, PyTorch", s_out, z_out)
        try:
            import cuequivariance_torch  # noqa: F401

            with auto:
                s_out, z_out = ref(s, z, mask, pair_mask, chunk, use_kernels=True)
            row("boltz autocast bf16, cuEquivariance", s_out, z_out)
        except ImportError:
            rows.append(("boltz cuEquivariance: not installed", float("nan"), float("nan")))
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(f"One Pairformer layer, N={n}, {name}; relative error against boltz in float32 (masked pairs excluded)")
        print(f"{'impl':<52} {'z':>10} {'s':>10}")
        for label, z_err, s_err in rows:
            print(f"{label:<52} {z_err:>10.2e} {s_err:>10.2e}")


if __name__ == "__main__":
    main()
