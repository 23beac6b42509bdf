"""``python -m foldcp_hpc.bench.layer_parts --n 4096``: where one Pairformer layer's time goes on one GPU.

Times each part of our layer with CUDA events (inference, in place; z stored in ``--dtype``, bfloat16
autocast unless ``--no-autocast``): the two triangle multiplications, the two triangle attentions, the pair
transition and the single track (float32 with autocast off, as the layer runs it), and
prints seconds, share and the peak memory each part holds above z.
"""

from __future__ import annotations

import argparse

import torch


def main(argv=None) -> None:
    from ..distributed import ProcessGrid
    from ..model.pairformer import PairformerLayer, tri_attn_chunk_size

    parser = argparse.ArgumentParser(prog="python -m foldcp_hpc.bench.layer_parts")
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="z's storage dtype")
    parser.add_argument("--no-autocast", action="store_true", help="float32 without autocast")
    parser.add_argument("--profile", default="", help="comma-separated parts to profile (CUDA kernel table)")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    with ProcessGrid.create(backend="nccl") as grid, torch.no_grad():
        device = grid.device
        n = args.n
        torch.manual_seed(0)
        layer = PairformerLayer(384, 128, v2=True, grid=grid).to(device).eval()
        gen = torch.Generator(device=device).manual_seed(0)
        z = torch.randn(1, n, n, 128, device=device, dtype=dtype, generator=gen)
        s = torch.randn(1, n, 384, device=device, generator=gen)
        mask = torch.ones(1, n, device=device)
        pair_mask = torch.ones(1, n, n, device=device)
        chunk = tri_attn_chunk_size(n, False)
        auto = torch.autocast("cuda", dtype=torch.bfloat16, enabled=not args.no_autocast)
        parts = {
            "tri_mul_out": lambda: layer.tri_mul_out.add_update(z, pair_mask),
            "tri_mul_in": lambda: layer.tri_mul_in.add_update(z, pair_mask),
            "tri_att_start": lambda: layer.tri_att_start.add_update(z, pair_mask, chunk_size=chunk, n_tokens=n),
            "tri_att_end": lambda: layer.tri_att_end.add_update(z, pair_mask, chunk_size=chunk, n_tokens=n),
            "transition_z": lambda: layer.transition_z.add_update(z),
            "single track": lambda: layer.single_track(s, z, mask),
        }
        size = z.numel() * z.element_size() / 2**30
        print(f"{torch.cuda.get_device_name(device)}, N={n}, z {args.dtype} ({size:.2f} GiB)")
        total = 0.0
        rows = []
        for name, fn in parts.items():
            with auto:
                fn()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(args.repeats):
                    fn()
                stop.record()
                torch.cuda.synchronize()
            seconds = start.elapsed_time(stop) / 1000 / args.repeats
            rows.append((name, seconds, (torch.cuda.max_memory_allocated() - base) / 2**30))
            total += seconds
        for name in filter(None, args.profile.split(",")):
            with auto, torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                parts[name]()
                torch.cuda.synchronize()
            print(f"-- {name}")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70))
        for name, seconds, peak in rows:
            print(f"{name:>14} {seconds:8.4f} s {100 * seconds / total:5.1f} %  +{peak:6.2f} GiB")
        print(f"{'total':>14} {total:8.4f} s")


if __name__ == "__main__":
    main()
