"""Compile the flash triangle-attention kernel for an H100 (sm_90a) without a GPU and print what ptxas says.

Run as a script by ``test_kernel_codegen.py`` (in a process of its own: the tests' Triton runs in its CPU
interpreter, which compiles nothing). Prints one line per case:
``even=<0|1> gate=<0|1> folded=<0|1> fixed=<0|1> regs=<n> spill=<bytes> C7515=<0|1>``, then one for the
warp-specialised Gluon kernel, ``ws regs=<n> spill=<bytes> C7515=<0|1> C7511=<0|1>`` (or ``ws unsupported``);
exits with ``UNSUPPORTED`` where this Triton's compile API differs from the one this script was written for
(3.6 to 3.9).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile

import triton


def compile_case(jit, config, even: bool, gate: bool, folded: bool, fixed: bool, sass: str | None = None) -> str:
    """ptxas's report for one specialisation: bfloat16, head dim 32, the model's strides (all divisible by 16,
    the bias contiguous along keys, as Triton specialises them at launch); folded: the key mask in the bias;
    fixed: a fixed shift in place of the running max (with folded). sass: a path to write the machine code to."""
    from triton.backends.compiler import GPUTarget

    names = jit.arg_names
    const = dict(HEAD_DIM=32, BLOCK_D=32, IEEE=False, SPLIT_P=False, UPCAST=False, GATE=gate, FOLDED=folded,
                 FIXED=fixed, REDO=0, EVEN_J=even, EVEN_K=even, WHOLE=True, **config.kwargs)
    pointers = {"mask_ptr": "*fp32", "lse_ptr": "*fp32", "flag_ptr": "*i8", "shift_ptr": "*fp32"}
    sig, attrs, constexprs = {}, {}, {}
    for i, name in enumerate(names):
        if name in const:
            sig[name], constexprs[(i,)] = "constexpr", const[name]
        elif name == "sb_k":  # unit stride: specialised to the constant 1
            sig[name], constexprs[(i,)] = "constexpr", 1
        elif name.endswith("_ptr"):
            sig[name], attrs[(i,)] = pointers.get(name, "*bf16"), [["tt.divisibility", 16]]
        elif name == "scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if even or name not in ("n_j", "n_k"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    if config.maxnreg:
        options["maxnreg"] = config.maxnreg
    kernel = triton.compile(triton.compiler.ASTSource(fn=jit, signature=sig, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options=options)
    return ptxas_report(kernel.asm["ptx"], sass)


def ptxas_report(ptx_text: str, sass: str | None) -> str:
    """ptxas -v's report on PTX for sm_90a; sass: a path to write the machine code to."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path  # the ptxas Triton itself runs for this target
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(ptx_text)
        # (the PTX carries the register cap as .maxnreg)
        args = [ptxas, "-arch=sm_90a", "-v", ptx, "-o", os.path.join(tmp, "k.cubin")]
        done = subprocess.run(args, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"ptxas failed: {done.stderr[-2000:]}")
        if sass:
            nvdisasm = os.path.join(os.path.dirname(ptxas), "nvdisasm")
            with open(sass, "w") as f:
                f.write(subprocess.run([nvdisasm, "-c", os.path.join(tmp, "k.cubin")], capture_output=True,
                                       text=True).stdout)
        return done.stderr


def compile_ws(sass: str | None = None) -> str | None:
    """ptxas's report for the warp-specialised Gluon kernel (:mod:`foldcp_hpc.kernels.flash_ws`): bfloat16, head
    dim 32, gate on, descriptors as the model's tensors give them; None where this Triton has no Gluon."""
    try:
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon._runtime import GluonASTSource
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
        from foldcp_hpc.kernels import flash_ws as ws
    except (ImportError, AttributeError):  # no Gluon, or another Gluon API
        return None
    import torch

    base = torch.empty(1024, 128, dtype=torch.bfloat16)  # (offline: the descriptors' types only)

    def desc(rows, cols):
        return TensorDescriptor(base, [1024, 128], [128, 1], [rows, cols],
                                gl.NVMMASharedLayout.get_default_for([rows, cols], gl.bfloat16))

    descs = {"q_desc": desc(ws.BLOCK_M, 32), "k_desc": desc(ws.BLOCK_N, 32), "v_desc": desc(ws.BLOCK_N, 32),
             "b_desc": desc(ws.BLOCK_M, ws.BLOCK_N)}
    const = dict(HEAD_DIM=32, BLOCK_M=ws.BLOCK_M, BLOCK_N=ws.BLOCK_N, GATE=True, STAGES=ws.STAGES, ROWS=ws.ROWS,
                 GROUP=ws.GROUP, CONSUMER_REGS=ws.CONSUMER_REGS, LOADER_REGS=ws.LOADER_REGS, num_warps=4)
    pointers = {"out_ptr": "*bf16", "lse_ptr": "*fp32", "g_ptr": "*bf16", "shift_ptr": "*fp32"}
    sig, attrs, constexprs = {}, {}, {}
    for i, name in enumerate(ws._kernel.arg_names):
        if name in const:
            sig[name], constexprs[(i,)] = "constexpr", const[name]
        elif name in descs:
            sig[name] = descs[name].__mangle__()
        elif name in pointers:
            sig[name], attrs[(i,)] = pointers[name], [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32" if name == "qk_scale" else "i32"
    from triton.backends.compiler import GPUTarget

    kernel = triton.compile(GluonASTSource(fn=ws._kernel, signature=sig, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=ws.MAX_REGS))
    return ptxas_report(kernel.asm["ptx"], sass)


def registers_and_spill(report: str) -> tuple[str, str]:
    """(registers used, bytes of spill stores) from ptxas -v's report."""
    return (report.split("Used ")[1].split(" registers")[0],
            report.split(" bytes spill stores")[0].rsplit(" ", 1)[-1])


UNSUPPORTED = 3  # exit status: this Triton compiles differently (its compile API or NVIDIA backend differ)


def main() -> int:
    os.environ.pop("TRITON_INTERPRET", None)
    from foldcp_hpc.kernels.triangle_attention import _build

    autotuned = _build()
    jit = autotuned.fn.fn  # autotune -> heuristics -> the JIT function
    config = autotuned.configs[0]
    sass = os.environ.get("FOLDCP_SASS")  # a folder: each case's machine code written there (for reading)
    for even, gate, folded, fixed in itertools.product((True, False), repeat=4):
        if fixed and not folded:
            continue
        try:
            name = f"e{int(even)}g{int(gate)}f{int(folded)}x{int(fixed)}.sass"
            report = compile_case(jit, config, even, gate, folded, fixed, sass and os.path.join(sass, name))
        except (ImportError, TypeError, AttributeError) as err:
            print(f"unsupported: Triton {triton.__version__}: {err!r}", flush=True)
            return UNSUPPORTED
        regs, spill = registers_and_spill(report)
        print(f"even={int(even)} gate={int(gate)} folded={int(folded)} fixed={int(fixed)} regs={regs} spill={spill} "
              f"C7515={int('C7515' in report)}", flush=True)
    report = compile_ws(sass and os.path.join(sass, "ws.sass"))
    if report is None:
        print("ws unsupported: this Triton has no Gluon for Hopper", flush=True)
    else:
        regs, spill = registers_and_spill(report)
        print(f"ws regs={regs} spill={spill} C7515={int('C7515' in report)} C7511={int('C7511' in report)}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
