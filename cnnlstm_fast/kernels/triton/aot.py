"""Ahead-of-time compilation of every shipped Triton kernel specialisation (no GPU needed).

``python -m cnnlstm_fast.kernels.triton.aot --arch 80 90`` compiles each kernel for
each cell, dtype and flag combination the launchers use, with Triton's bundled ptxas,
and prints one line per specialisation. Must run with TRITON_INTERPRET unset (under
the interpreter ``triton.jit`` makes interpreted functions, which do not compile).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from concurrent.futures import ProcessPoolExecutor

CELLS = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
DTYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}

# Argument kinds: "x" pointer of the input dtype, "f" fp32 pointer, "i" 32-bit pointer,
# "s" int32 scalar.
_ARGS = {
    "recurrence_step_forward": "gx:x h_in:f h_out:f c:f y:x w_hh:x b_hn:x act:f extra:f "
    "n_active:s batch:s hidden:s out_size:s",
    "recurrence_step_matmul": "a:f w:x keep:f out:f y:x n_active:s batch:s "
    "n_size:s k_size:s stride_wn:s stride_wk:s",
    "recurrence_step_backward": "dh:f dy:x dc:f act:f extra:f h_prev:f w_hr:x dgx:f dgh:f "
    "dh_all:f n_active:s batch:s hidden:s out_size:s",
    "recurrence_forward_persistent": "gx:x h_state:f c0:f c_out:f y:x w_hh:x b_hn:x act:f "
    "extra:f batch_sizes:i counter:i timed_out:i steps:s batch:s hidden:s spin_limit:s",
    "recurrence_backward_persistent": "d_y:x dh:f dc:f act:f extra:f h_prev:f w_hh:x dgx:f "
    "dgh:f batch_sizes:i counter:i timed_out:i steps:s batch:s hidden:s spin_limit:s",
}


def specialisations() -> list[tuple[str, str, dict]]:
    """(kernel name, dtype, constexprs) for everything the launchers can launch on a GPU."""
    from .recurrence import CELL_IDS

    specs = []
    for (cell, gates), dtype in itertools.product(CELLS.items(), DTYPES):
        cell_id = dict(CELL=CELL_IDS[cell], NGATES=gates, INTERPRET=False)
        blocks = dict(BLOCK_B=16, BLOCK_H=16, BLOCK_K=64 if dtype != "fp32" else 32)
        for proj in (False, True) if cell == "lstm" else (False,):
            specs.append(("recurrence_step_forward", dtype, dict(
                **cell_id, HAS_B_HN=cell == "gru", PROJ=proj, SAVE=True, **blocks)))
            specs.append(("recurrence_step_backward", dtype, dict(**cell_id, PROJ=proj, **blocks)))
        specs.append(("recurrence_forward_persistent", dtype, dict(
            **cell_id, HAS_B_HN=cell == "gru", SAVE=True, REVERSE=False,
            BLOCK_B=16, BLOCK_H=16, BLOCK_K=256)))
        specs.append(("recurrence_backward_persistent", dtype, dict(
            **cell_id, REVERSE=False, BLOCK_B=16, BLOCK_H=16, BLOCK_K=256)))
    for dtype in DTYPES:
        specs.append(("recurrence_step_matmul", dtype, dict(
            INTERPRET=False, BLOCK_B=16, BLOCK_N=16, BLOCK_K=64 if dtype != "fp32" else 32)))
    return specs


def compile_one(name: str, dtype: str, constexprs: dict, arch: int) -> tuple[int, int]:
    """Compiles one specialisation for sm_<arch>; returns (PTX chars, cubin bytes)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from . import persistent, recurrence

    fn = getattr(recurrence, name, None) or getattr(persistent, name)
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError("TRITON_INTERPRET is set: kernels are interpreted, not compilable")
    kinds = {"x": "*" + dtype, "f": "*fp32", "i": "*i32", "s": "i32"}
    runtime_args = _ARGS[name].split()
    if len(runtime_args) + len(constexprs) != len(fn.arg_names):
        raise RuntimeError(f"{name}: the argument table in aot.py is out of date")
    signature = {p: kinds[a.split(":")[1]] for p, a in zip(fn.arg_names, runtime_args)}
    signature.update({k: "constexpr" for k in constexprs})
    target = GPUTarget("cuda", arch, 32)
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    options = {"num_warps": 4}
    if name.endswith("_persistent"):  # with the launch options the launcher passes now
        from .launch import persistent_launch_options

        options.update(num_warps=8, **persistent_launch_options())
    compiled = triton.compile(src, target=target, options=options)
    if compiled.metadata.launch_cooperative_grid != options.get("launch_cooperative_grid", False):
        raise RuntimeError(f"{name}: the compiled kernel's launch_cooperative_grid differs "
                           f"from the options {options}")
    return len(compiled.asm["ptx"]), len(compiled.asm["cubin"])


def _job(args):
    name, dtype, constexprs, arch = args
    try:
        return args, compile_one(name, dtype, constexprs, arch), None
    except Exception as e:  # reported per specialisation by the caller
        return args, None, f"{type(e).__name__}: {e}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    jobs = [(n, d, c, a) for a in args.arch for n, d, c in specialisations()]
    failed = 0
    with ProcessPoolExecutor(args.jobs) as pool:
        for (name, dtype, constexprs, arch), sizes, error in pool.map(_job, jobs):
            flags = ",".join(f"{k}={v}" for k, v in constexprs.items() if not k.startswith("BLOCK"))
            if error is None:
                print(f"ok sm_{arch} {name} {dtype} {flags} ptx={sizes[0]} cubin={sizes[1]}")
            else:
                failed += 1
                print(f"FAIL sm_{arch} {name} {dtype} {flags}: {error}")
    print(f"{len(jobs) - failed}/{len(jobs)} compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
