"""Compile every Triton kernel variant bitflux launches for real GPU targets, on a machine without a GPU.

Triton's interpreter (what CI runs the kernels with) checks the arithmetic, not the compiler: a construct it
accepts can still fail to compile, or compile into a slow form. This compiles each variant for
sm_80 (A100), sm_89 (Ada: fp8) and sm_90 (H100/H200) with Triton's own compiler and ptxas, and reports what
the main loop became: tensor-core instruction (wgmma = Hopper's warpgroup MMA; "RS" when the left operand
comes from registers), loads pipelined through shared memory (async copies) vs. plain loads, shared memory,
registers per thread and spills (ptxas), and the main loop's machine-code length and integer -> float
conversions (nvdisasm).

    python benchmarks/gpu_compile.py [--quick] [--out DIR] [--only NAME]   (no GPU needed; exit 1 if any fails)

Writes gpu_compile.json and gpu_compile.md to --out when given.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

if os.environ.pop("TRITON_INTERPRET", None):  # must precede Triton's import: compiled, not interpreted
    pass

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from bitflux.kernels import triton as tk  # noqa: E402

TARGETS = {"sm_80": GPUTarget("cuda", 80, 32), "sm_89": GPUTarget("cuda", 89, 32), "sm_90": GPUTarget("cuda", 90, 32)}
SHARED_LIMIT = {"sm_80": 166912, "sm_89": 101376, "sm_90": 232448}  # bytes per block (CUDA programming guide)
_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int8: "i8", torch.int16: "i16",
          torch.uint8: "u8", torch.int32: "i32", torch.float8_e4m3fn: "fp8e4nv"}


def compile_variant(kernel, target: GPUTarget, pointers: dict, constexprs: dict, num_warps: int, num_stages: int):
    """kernel's arguments: `pointers` name -> torch dtype, `constexprs` name -> value, the rest i32 scalars.
    Pointers and scalars but M are taken as divisible by 16, as Triton specializes them at launch for FLUX
    shapes (K slices are whole 256-column blocks)."""
    fn = kernel if isinstance(kernel, JITFunction) else kernel.fn  # the JITFunction under an autotuner
    missing = [p.name for p in fn.params if p.is_constexpr and not p.has_default and p.name not in constexprs]
    if missing:  # else they would be compiled as run-time scalars
        raise ValueError(f"{fn.__name__}: no value for constexpr {', '.join(missing)}")
    constexprs = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **constexprs}
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = f"*{_TYPES[pointers[name]]}" if name in pointers else "i32"
        if name != "M":
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=target, options={"num_warps": num_warps, "num_stages": num_stages})


def registers(compiled, target: str) -> dict:
    """Registers per thread and spilled bytes, from ptxas (the one Triton ships) on the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    arch = int(target.removeprefix("sm_"))
    try:
        ptxas = get_ptxas(arch).path
    except TypeError:  # older Triton: one ptxas for every architecture
        ptxas = get_ptxas().path
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        log = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}", str(ptx), "-o",
                              str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True).stderr
    used, spilled = re.search(r"Used (\d+) registers", log), re.search(r"(\d+) bytes spill stores", log)
    return {"registers": int(used.group(1)) if used else None,
            "spill_bytes": int(spilled.group(1)) if spilled else None}


def describe(compiled) -> dict:
    """What the main loop of the kernel became."""
    ttgir = compiled.asm["ttgir"]
    loop = ttgir[ttgir.index("scf.for"):] if "scf.for" in ttgir else ""
    body = loop.split("scf.yield")[0]
    wgmma = re.findall(r"ttng\.warp_group_dot [^{]*\{[^}]*\} : (\S+)", body)
    if wgmma:
        mma = "wgmma " + "/".join(sorted({"RS" if operand.startswith("tensor<") else "SS" for operand in wgmma}))
        # pendings > 0: the next MMA is issued before this one is waited for (tensor cores kept busy)
        if max(map(int, re.findall(r"warp_group_dot_wait .*?pendings = (\d+)", body)), default=0) > 0:
            mma += " overlapped"
    else:
        mma = "mma" if "tt.dot " in body else "none"
    return {"mma": mma, "async_loads": body.count("async_copy_global_to_local"),
            "plain_loads": len(re.findall(r"= tt\.load ", body)), "shared_bytes": compiled.metadata.shared,
            "grid_waits": compiled.asm["ptx"].count("griddepcontrol.wait"),
            "fused_products": fused_products(compiled.asm["ptx"])}


def fused_products(ptx: str) -> int:
    """fp32 multiply-adds in the PTX but those by zero (x * 0 + s, exact: the NaN check of a row's absmax): each
    rounds once where a multiply and an add round twice."""
    factors = ([factor.strip() for factor in operands.split(",")[1:3]]
               for operands in re.findall(r"fma\.rn\.f32\s+([^;]+);", ptx))
    return sum("0f00000000" not in pair for pair in factors)


def sass_loop(compiled) -> dict:
    """The innermost main loop in machine code (SASS, by the nvdisasm Triton ships): its instructions, and
    how many convert an integer to a float (I2F: a quarter of the FMA rate or less; the one-token GEMV once
    spent one a code, which no unpack needs: see docs/GPU_KERNELS.md)."""
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    if not nvdisasm.exists():
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        text = subprocess.run([str(nvdisasm), "-c", str(cubin)], capture_output=True, text=True, check=False).stdout
    labels, instructions, label = {}, [], None
    for line in text.splitlines():
        if match := re.match(r"\s*\.(L_x_\d+):", line):
            label = match.group(1)
        elif match := re.match(r"\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;", line):
            address = int(match.group(1), 16)
            if label:
                labels[label], label = address, None
            instructions.append((address, match.group(2)))
    loops = [[op for address, op in instructions if labels[target.group(1)] <= address <= end]
             for end, op in instructions
             if (target := re.search(r"BRA.*\.(L_x_\d+)", op)) and labels.get(target.group(1), end) < end]
    if not loops:
        return {}
    body = max(loops, key=len)  # the main loop: its body has the most instructions
    opcodes = [re.sub(r"^@!?U?P\w+\s+", "", op).split()[0] for op in body]
    return {"loop_instructions": len(opcodes), "int_to_float": sum(op.startswith("I2F") for op in opcodes)}


def _loop_text(row: dict) -> str:
    text = (f"{row['mma']}, {row['async_loads']} pipelined + {row['plain_loads']} plain loads, "
            f"{row['shared_bytes']} B shared" + ("" if row["fits"] else " (too much: skipped)")
            + f", {row['registers']} registers")
    text += f", {row['spill_bytes']} B spilled" if row["spill_bytes"] else ""
    text += ", waits for the grid before it (PDL)" if row.get("grid_waits") else ""
    if "loop_instructions" in row:
        text += f"; {row['loop_instructions']} SASS instructions a loop, {row['int_to_float']} int->float"
    return text


def variants(quick: bool):
    """(name, kernel, pointers, constexprs, num_warps, num_stages, targets) for what linear() launches; the
    first variant of each kernel launched with programmatic dependent launch (those with a PDL constexpr) again
    with it ("pdl ...", sm_90: tk.PDL)."""
    with_pdl = set()
    for name, kernel, pointers, constexprs, warps, stages, targets in _launched(quick):
        yield name, kernel, pointers, constexprs, warps, stages, targets
        fn = kernel if isinstance(kernel, JITFunction) else kernel.fn
        if "PDL" in fn.arg_names and kernel not in with_pdl and "sm_90" in targets:
            with_pdl.add(kernel)
            yield f"pdl {name}", kernel, pointers, {**constexprs, "PDL": True}, warps, stages, ("sm_90",)


def _launched(quick: bool):
    bf16, i8, u8, f32, fp8 = torch.bfloat16, torch.int8, torch.uint8, torch.float32, torch.float8_e4m3fn
    all_targets, fp8_targets = ("sm_80", "sm_90"), ("sm_89", "sm_90")
    epilogue_ptrs = {"scale_ptr": f32, "act_scale_ptr": f32, "bias_ptr": bf16}

    expand_tiles = {tq1: ({"EXPAND_N": block_n, "EXPAND_BYTES": block_bytes}, warps)  # per packing
                    for tq1, (block_n, block_bytes, warps) in ((False, tk.EXPAND_TILES["tq2"]),
                                                               (True, tk.EXPAND_TILES["tq1"]))}

    for fp8_out in (False, True):
        q_dtype = fp8 if fp8_out else i8
        for plane in (0, tk.PLANE):
            for one_pass, block in ((True, tk._ONE_PASS_COLUMNS), *((False, b) for b in tk.QUANTIZE_BLOCKS)):
                quantize = {"FP8": fp8_out, "PLANE": plane, "BLOCK": block, "ONE_PASS": one_pass}
                name = (f"quantize {'fp8' if fp8_out else 'int8'}{' plane-major' if plane else ''}"
                        f"{' one pass' if one_pass else f' two passes of {block}'}")
                yield (name, tk._operands_kernel, {"x_ptr": bf16, "q_ptr": q_dtype, "scale_ptr": f32,
                                                   "w_ptr": q_dtype, "table_ptr": torch.int16, "codes_ptr": q_dtype,
                                                   "row_scale_ptr": f32},  # (scale's placeholder: compiled out)
                       {"QUANTIZE": True, "EXPAND": False, "SCALED": False, "TQ1": False, **quantize,
                        **expand_tiles[False][0]},
                       tk._QUANTIZE_WARPS, 1,
                       fp8_targets if fp8_out else all_targets)
                if not plane:  # the expanded GEMMs' operands, in one launch
                    for tq1, (tile, _) in expand_tiles.items():  # in the quantizer's warps
                        yield (f"{name} + expand{' tq1' if tq1 else ''}", tk._operands_kernel,
                               {"x_ptr": bf16, "q_ptr": q_dtype, "scale_ptr": f32, "w_ptr": u8,
                                "table_ptr": torch.int16, "codes_ptr": q_dtype, "row_scale_ptr": f32},
                               {"QUANTIZE": True, "EXPAND": True, "SCALED": False, "TQ1": tq1, **quantize, **tile},
                               tk._QUANTIZE_WARPS, 1, fp8_targets if fp8_out else all_targets)
    # the codes in the GEMM's operand dtype; scaled by their row's scale (a16 on cuBLAS, 16-bit floats)
    for dtype, scaled in ((i8, False), (fp8, False), (bf16, False), (bf16, True), (torch.float16, True)):
        for tq1, (tile, warps) in expand_tiles.items():
            yield (f"expand {_TYPES[dtype]}{' scaled' if scaled else ''}{' tq1' if tq1 else ''}", tk._operands_kernel,
                   {"x_ptr": dtype, "q_ptr": dtype, "scale_ptr": dtype, "w_ptr": u8, "table_ptr": torch.int16,
                    "codes_ptr": dtype, "row_scale_ptr": f32 if scaled else dtype},
                   {"QUANTIZE": False, "EXPAND": True, "SCALED": scaled, "TQ1": tq1, "FP8": False, "PLANE": 0,
                    "BLOCK": 1, "ONE_PASS": True, **tile}, warps, 1,
                   fp8_targets if dtype == fp8 else all_targets)
    yield ("epilogue int32", tk._epilogue_kernel, {"partial_ptr": torch.int32, **epilogue_ptrs, "out_ptr": bf16},
           {"SCALE_MODE": 0, "ACT_SCALED": True, "HAS_BIAS": True, "BLOCK_M": 16, "BLOCK_N": 128}, 4, 1, all_targets)
    acts = {"a16": (bf16, 0), "a8": (i8, 1), "fp8": (fp8, 2)}
    for act, (x_dtype, code) in acts.items():
        tiles = [("splitk", tk.SPLITK_TILE), ("gemv", tk.GEMV_TILE)]
        if not quick:  # the tiles that some layers or the gemv8 variant take
            tiles += [("gemv", tile) for tile in (tk.GEMV_QUANTIZING_TILES if act != "a16" else (tk.GEMV_WIDE_TILE,))]
        if act != "a16":  # qgemv: the GEMV on activations the quantizer's launch quantized
            tiles.append(("qgemv", tk.GEMV_TILE))
        for kind, (block_m, block_n, block_k, warps, stages) in tiles:
            fma = kind != "splitk"
            quantize = kind == "gemv" and code != 0  # the GEMV quantizes its one float row
            # K a whole number of steps (every FLUX.1-dev layer in tq2: unmasked byte loads), or not (masked;
            # the GEMV's own loop for each activation type, as it quantizes int8/e4m3 itself)
            for tq1, even_k in ((False, True), (True, True), (False, False), (True, False)):
                if not even_k and act != "a16" and not (quantize and (block_m, block_n, block_k) == tk.GEMV_TILE[:3]):
                    continue
                default = (block_m, block_n, block_k) in (tk.GEMV_TILE[:3], tk.SPLITK_TILE[:3])
                rows = "" if default else f" {block_n} rows"
                yield (f"{kind} {act}{' tq1' if tq1 else ''}{'' if even_k else ' masked'}{rows}",
                       tk._gemv_kernel,
                       {"x_ptr": bf16 if quantize else x_dtype, "w_ptr": u8, "table_ptr": torch.int16,
                        **epilogue_ptrs, "out_ptr": bf16},
                       {"ACT": code, "FMA": fma, "QUANTIZE": quantize, "TQ1": tq1, "FUSED": True,
                        "SCALE_MODE": 0, "HAS_BIAS": True, "DOT_FP32": False, "EVEN_K": even_k, "BLOCK_M": block_m,
                        "BLOCK_N": block_n, "BLOCK_K": block_k}, warps, stages,
                       fp8_targets if act == "fp8" else all_targets)
    # a8 in DP4A: one token's own loop (dp4a1: quantizing its float row), and the token tiles of 2-16 (masked:
    # one of each)
    dp4a_tiles = ((1, tk.DP4A_TILE, False), (1, tk.DP4A_QUANTIZING_TILE, True), (1, tk.DP4A_LONG_TILE, False),
                  *((m, tk.DP4A_FEW_TILE, False) for m in (2, 4, 8, 16)))
    for block_m, (block_n, words, warps), quantize in dp4a_tiles:
        for even_k in ((True, False) if block_m in (1, 16) else (True,)):
            yield (f"dp4a{'1' if quantize else ''} a8 {block_m}x{block_n}{'' if even_k else ' masked'}",
                   tk._dp4a_gemv_kernel,
                   {"x_ptr": bf16 if quantize else torch.int32, "w_ptr": torch.int32, **epilogue_ptrs, "out_ptr": bf16},
                   {"SCALE_MODE": 0, "HAS_BIAS": True, "FUSED": True, "QUANTIZE": quantize, "EVEN_K": even_k,
                    "BLOCK_M": block_m, "BLOCK_N": block_n, "WORDS": words, "PLANE_WORDS": tk.PLANE // 4}, warps, 1,
                   all_targets)
    for act, (x_dtype, code) in acts.items():
        for block_m, block_n, warps, stages in (tk.PLANAR_FEW_TILE, (64, 128, 4, 4), (128, 128, 8, 3)):
            yield (f"planar {act} {block_m}x{block_n}", tk._planar_matmul,
                   {"x_ptr": x_dtype, "w_ptr": u8, **epilogue_ptrs, "out_ptr": bf16},
                   {"SCALE_MODE": 0, "ACT": code, "HAS_BIAS": True, "DOT_FP32": False, "FUSED": True,
                    "EVEN_K": True, "BLOCK_M": block_m, "BLOCK_N": block_n, "PLANE": tk.PLANE}, warps, stages,
                   fp8_targets if act == "fp8" else all_targets)
    configs = tk._ternary_matmul.configs
    for config in configs[:1] + [c for c in configs if c.kwargs["BLOCK_M"] == 128] if quick else configs:
        kw = config.kwargs
        blocks = f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}" + (" swap" if kw["SWAP"] else "")
        cases = [("tiled a16", bf16, u8, 0, 1, False), ("tiled a8 group", i8, u8, 1, 2, False),
                 ("tiled fp8", fp8, u8, 2, 0, False)]
        if not kw["SWAP"] and kw["BLOCK_M"] == 128:
            cases += [("expanded a16", bf16, bf16, 0, 0, True), ("expanded a8", i8, i8, 1, 0, True),
                      ("expanded fp8", fp8, fp8, 2, 0, True)]
        for label, x_dtype, w_dtype, code, scale_mode, dense in cases:
            yield (f"{label} {blocks}", tk._ternary_matmul,
                   {"x_ptr": x_dtype, "w_ptr": w_dtype, **epilogue_ptrs, "out_ptr": bf16},
                   {"SCALE_MODE": scale_mode, "ACT": code, "DENSE": dense, "HAS_BIAS": True, "DOT_FP32": False,
                    **kw, "GROUP_M": 8}, config.num_warps, config.num_stages,
                   fp8_targets if code == 2 else all_targets)


_VARIANTS: list[tuple] = []  # variants() of this run, set before the worker processes fork
# Variants whose float arithmetic is the epilogue of exact int32 sums alone: a multiply fused with the add after
# it would round once where reference.linear_a8 rounds twice (Triton fuses by default; _rounded_product opts out)
_UNFUSED = ("splitk a8", "planar a8", "dp4a", "tiled a8", "expanded a8", "epilogue int32")


def compile_row(job: tuple[int, str]) -> dict:
    """The report row of variant `index` of _VARIANTS, compiled for `target`."""
    index, target = job
    name, kernel, pointers, constexprs, warps, stages, _ = _VARIANTS[index]
    row = {"variant": name, "target": target}
    try:
        compiled = compile_variant(kernel, TARGETS[target], pointers, constexprs, warps, stages)
        row.update(describe(compiled))
        row.update(registers(compiled, target))
        row.update(sass_loop(compiled))
        # too much shared memory is not an error: the launch refuses it and the autotuner skips it
        row["fits"] = row["shared_bytes"] <= SHARED_LIMIT[target]
        if name.removeprefix("pdl ").startswith(_UNFUSED) and row["fused_products"]:
            row["error"] = f"{row['fused_products']} fused fp32 multiply-adds: not bit for bit as reference.linear_a8"
    except Exception as exc:  # noqa: BLE001 - every failure is reported, then the exit status says so
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the first and the compute-bound tile configs only")
    parser.add_argument("--out", type=Path, help="folder for gpu_compile.json and gpu_compile.md")
    parser.add_argument("--only", default="", help="the variants whose names start with this (e.g. 'dp4a')")
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                        help="variants compiled at once (processes; default: the CPUs this process may use)")
    args = parser.parse_args(argv)
    rows, start = [], time.perf_counter()
    _VARIANTS[:] = [variant for variant in variants(args.quick) if variant[0].startswith(args.only)]
    jobs = [(index, target) for index, variant in enumerate(_VARIANTS) for target in variant[-1]]
    # Each compile is one thread's work (LLVM, then ptxas and nvdisasm): processes use the other cores. Forked,
    # so a worker finds each variant by its index in the list it inherits, not by pickling kernels; a worker
    # that dies (a compiler crash) fails the run (BrokenProcessPool) instead of hanging it.
    with ProcessPoolExecutor(max(1, args.jobs), mp_context=multiprocessing.get_context("fork")) as pool:
        for row in pool.map(compile_row, jobs):
            rows.append(row)
            print(" | ".join(f"{key} {value}" for key, value in row.items()), flush=True)
    failed = [row for row in rows if "error" in row]
    summary = (f"{len(rows) - len(failed)} of {len(rows)} variants compiled in {time.perf_counter() - start:.0f} s "
               f"(Triton {triton.__version__})")
    print(summary)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_compile.json").write_text(json.dumps({"triton": triton.__version__, "rows": rows},
                                                              indent=1))
        lines = [f"# Triton kernels compiled offline: {summary}", "", "| variant | target | main loop |",
                 "|---|---|---|"]
        lines += [f"| {row['variant']} | {row['target']} | {row.get('error') or _loop_text(row)} |" for row in rows]
        (args.out / "gpu_compile.md").write_text("\n".join(lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
