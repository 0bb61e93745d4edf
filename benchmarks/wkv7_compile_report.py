"""Compile the WKV-7 Triton kernels for sm_90a on a machine without a GPU and report what the
compiler says: registers, spill stores/loads, stack frame, and the tensor-core instructions in the
SASS (HGMMA = wgmma, HMMA = mma.sync). Costs no device time; run before a GPU call.

    python benchmarks/wkv7_compile_report.py [--module PATH] [--chunk 32] [--bv-scan 64] ...
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from rwkv_ft.kernels.launch_options import FIXED_LAUNCH_OPTIONS, register_cap

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def load_module(path):
    spec = importlib.util.spec_from_file_location("twk", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["twk"] = mod
    spec.loader.exec_module(mod)
    return mod


def compile_one(fn, args: dict, num_warps: int, num_stages: int = 3, aligned: bool = True, maxnreg: int | None = None):
    """aligned: every pointer and integer argument is marked divisible by 16, as the launcher
    specialises them at the benchmark shapes (aligned tensors, T, H, strides multiples of 16); the
    loads then vectorise, which changes layouts and instruction counts."""
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        v = args[name]
        if isinstance(v, str) and (v.startswith("*") or v in ("i32", "i64", "fp32")):
            sig[name] = v
            if aligned and v != "fp32":
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "constexpr"
            consts[name] = v
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    options = dict(num_warps=num_warps, num_stages=num_stages, **FIXED_LAUNCH_OPTIONS, **register_cap(maxnreg))
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.TemporaryDirectory() as d:
        cub = os.path.join(d, "k.cubin")
        open(cub, "wb").write(k.asm["cubin"])
        info = subprocess.run(
            [os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", cub], capture_output=True, text=True
        ).stdout
        sass = subprocess.run(
            [os.path.join(BIN, "cuobjdump"), "--dump-sass", cub], capture_output=True, text=True
        ).stdout
    regs = re.search(r"REG:(\d+)", info)
    stack = re.search(r"STACK:(\d+)", info)
    ops = collections.Counter(m.group(1) for m in re.finditer(r"\b([A-Z][A-Z0-9]{2,})(?=[.\s])", sass))
    # One opcode per instruction line ("/*0a80*/  @!P0 FADD R1, ..."): the instruction count.
    instr = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]+)", sass)
    smem = k.metadata.shared if hasattr(k.metadata, "shared") else None
    return dict(
        regs=int(regs.group(1)) if regs else None,
        stack=int(stack.group(1)) if stack else None,
        smem=smem,
        HGMMA=ops["HGMMA"],
        HMMA=ops["HMMA"],
        LDL=ops["LDL"],
        STL=ops["STL"],
        MUFU=ops["MUFU"],
        BAR=ops["BAR"],
        n_sass=sum(ops.values()),  # upper-case words in the SASS (opcodes and some operands)
        instr=len(instr),
        F2F=sum(op == "F2F" for op in instr),  # single conversions (quarter rate or less)
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--module", default=os.path.join(os.path.dirname(__file__), "..", "kernels", "rwkv7", "triton_wkv7.py")
    )
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--N", type=int, default=64)
    ap.add_argument("--bv-scan", type=int, default=64)
    ap.add_argument("--bv-grad", type=int, default=64)
    ap.add_argument("--warps", default="4")
    ap.add_argument("--prec", default="bf16x3")
    ap.add_argument("--kernels", default="prep,prep_mq,scan_fwd,scan_bwd,grad")
    ap.add_argument("--no-align", action="store_true", help="no divisibility-by-16 specialisation")
    ap.add_argument("--maxnreg", type=int, default=None, help="register cap per thread (the regs_* knobs)")
    ap.add_argument("--no-keep-key", action="store_true", help="grad computes the key side again (before v2.2)")
    a = ap.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    tw = load_module(a.module)
    L, N = a.chunk, a.N
    prec = tw.PRECISIONS[a.prec]
    common = dict(T="i32", H="i32", NC="i32", N=N, L=L)
    xin = dict(
        r_ptr="*bf16",
        w_ptr="*fp32",
        k_ptr="*bf16",
        v_ptr="*bf16",
        a_ptr="*bf16",
        b_ptr="*bf16",
        s_b="i64",
        s_t="i64",
        s_h="i64",
    )
    lev = dict(NLEV=(L // tw.SUB).bit_length() - 1, LOG2_L=L.bit_length() - 1)
    # The key side the backward's prep keeps for grad (--no-keep-key: grad computes it again).
    keep = not a.no_keep_key
    key_ptrs = dict(kp_ptr="*fp32", kinv_ptr="*fp32") if keep else dict(kp_ptr=None, kinv_ptr=None)
    no_key = dict(kp_ptr=None, kinv_ptr=None, KEEP_KEY=False)
    key_out = dict(key_ptrs, KEEP_KEY=keep)
    key_in = dict(key_ptrs, LOAD_KEY=keep)
    specs = {
        "prep": (
            tw._prep_kernel,
            dict(
                **common,
                **xin,
                **lev,
                reset_ptr=None,
                qt_ptr="*fp32",
                m_ptr="*fp32",
                yct_ptr="*fp32",
                d_ptr="*fp32",
                **no_key,
                HAS_RESET=False,
                VALUE_SIDE=True,
                Y_SIDE=True,
                PREC=prec,
                VE=True,
            ),
        ),
        "prep_mq": (
            tw._prep_kernel,
            dict(
                **common,
                **xin,
                **lev,
                reset_ptr=None,
                qt_ptr="*fp32",
                m_ptr="*fp32",
                yct_ptr=None,
                d_ptr=None,
                **key_out,
                HAS_RESET=False,
                VALUE_SIDE=False,
                Y_SIDE=False,
                PREC=prec,
                VE=True,
            ),
        ),
        "scan_fwd": (
            tw._scan_fwd_kernel,
            dict(
                **common,
                s0_ptr="*fp32",
                qt_ptr="*fp32",
                m_ptr="*fp32",
                yct_ptr="*fp32",
                d_ptr="*fp32",
                y_ptr="*bf16",
                sT_ptr="*fp32",
                ck_ptr="*fp32",
                BV=a.bv_scan,
                HAS_STATE=True,
                STORE_CK=True,
                STORE_Y=True,
                PREC=prec,
            ),
        ),
        "scan_bwd": (
            tw._scan_bwd_kernel,
            dict(
                **common,
                dsT_ptr="*fp32",
                qt_ptr="*fp32",
                m_ptr="*fp32",
                dy_ptr="*bf16",
                ds_ptr="*fp32",
                ds0_ptr="*fp32",
                BV=a.bv_scan,
                HAS_DST=True,
                HAS_DY=True,
                WANT_DS0=True,
                PREC=prec,
                GE=True,
            ),
        ),
        "grad": (
            tw._grad_kernel,
            dict(
                **common,
                **xin,
                **lev,
                reset_ptr=None,
                dy_ptr="*bf16",
                ck_ptr="*fp32",
                ds_ptr="*fp32",
                **key_in,
                dr_ptr="*bf16",
                dw_ptr="*fp32",
                dk_ptr="*bf16",
                dv_ptr="*bf16",
                da_ptr="*bf16",
                db_ptr="*bf16",
                BV=a.bv_grad,
                HAS_RESET=False,
                HAS_DY=True,
                ATOMIC=a.bv_grad < N,
                PREC=prec,
                VE=True,
                GE=True,
            ),
        ),
    }
    # The backward's run of the forward under recompute_states: the states, not y.
    prep_args = specs["prep"][1]
    specs["prep_rerun"] = (tw._prep_kernel, dict(prep_args, yct_ptr=None, Y_SIDE=False, **key_out))
    specs["scan_rerun"] = (tw._scan_fwd_kernel, dict(specs["scan_fwd"][1], yct_ptr=None, y_ptr=None, STORE_Y=False))
    print(
        f"triton {triton.__version__}, sm_90a, L={L} N={N} bv_scan={a.bv_scan} bv_grad={a.bv_grad} prec={a.prec} "
        f"maxnreg={a.maxnreg}"
    )
    for name in a.kernels.split(","):
        fn, args = specs[name]
        for w in map(int, a.warps.split(",")):
            t = time.time()
            try:
                r = compile_one(fn, args, w, aligned=not a.no_align, maxnreg=a.maxnreg)
                print(
                    f"{name:9s} warps={w}: {time.time() - t:5.1f}s " + " ".join(f"{k}={v}" for k, v in r.items()),
                    flush=True,
                )
            except Exception as e:  # noqa: BLE001
                print(f"{name:9s} warps={w}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)


if __name__ == "__main__":
    main()
