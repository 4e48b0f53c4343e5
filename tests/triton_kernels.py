"""Checking Triton kernels without a GPU: run through Triton's interpreter on this CPU, or built for a Hopper
GPU by Triton's own compiler and the ptxas in its wheel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.helpers import REPO


def interpreted(code: str) -> dict:
    """`code`'s last printed line, as JSON, run with TRITON_INTERPRET=1 (in a subprocess, since the
    interpreter is chosen when Triton is imported)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def hopper_build(kernel, signature: dict[str, str], constexprs: dict, config) -> tuple[str, str]:
    """`kernel` built for an H100/H200 (sm_90) as a launch there would specialize it: every argument of
    `signature` (name: Triton type) 16-byte aligned or a multiple of 16, the other parameters the constants
    `constexprs` and `config`'s. Returns its PTX and cuobjdump's resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constants = {**constexprs, **config.kwargs}
    aligned = {(i,): [["tt.divisibility", 16]] for i, kind in enumerate(signature.values()) if kind != "fp32"}
    source = ASTSource(
        kernel, {**signature, **dict.fromkeys(constants, "constexpr")}, constexprs=constants, attrs=aligned
    )
    built = triton.compile(
        source,
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(built.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [str(cuobjdump), "--dump-resource-usage", cubin.name], capture_output=True, text=True, check=True
        ).stdout
    return built.asm["ptx"], usage
