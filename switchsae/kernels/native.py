"""Compiled CPU kernels (``native.c``) for the steps torch has no fused op for.

``native.c`` is compiled once per machine with the system C compiler (``$CC``, split like a
shell would so ``CC="ccache gcc"`` works, else ``cc``; ``-O3 -march=native``) into
``<cache>/native/`` (see :func:`switchsae.host.cache_dir`: ``$SWITCHSAE_CACHE``, else
``~/.cache/switchsae``, else a private temp folder), under a name that hashes the source, the
compiler, its flags and the CPU: the ``/proc/cpuinfo`` flags where readable and always the
macros the compiler defines for ``-march=native``, so a CPU whose flags cannot be read still gets
a build of its own. It is loaded with ctypes. Where no compiler works (missing, failing, or not
done within ``COMPILE_TIMEOUT_S``, ``$SWITCHSAE_COMPILE_TIMEOUT`` overrides; a hung compiler's
process group is killed), :func:`available` is False, a warning says why once, and callers use
their plain-torch path, which computes the same thing (the tests check both).
``SWITCHSAE_NATIVE=0`` turns the kernels off.

Kernels that write in place bump the tensors' version counters, as torch's in-place ops do, so
autograd still notices a saved tensor that was modified.

Threads: the kernels use OpenMP. Loaded after torch, the library binds to the libgomp torch
already loaded (same soname), so kernels run on torch's thread team and follow
``torch.set_num_threads``; a second thread pool beside torch's would make the two spin
against each other on a small machine (measured: README, "Measured behind design choices").
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import signal
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from switchsae import host

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared"]
#: seconds one compiler call may take before it counts as hung (``$SWITCHSAE_COMPILE_TIMEOUT`` overrides)
COMPILE_TIMEOUT_S = 300.0
_I64, _F32, _PTR = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
SIGNATURES = {  # name: (argument types, return type); an int return is 0, or -1 when malloc failed
    "topk_f32": ([_PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR], ctypes.c_int),
    "topk_bf16": ([_PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR], ctypes.c_int),
    "adam_rows": ([_PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64] + [_F32] * 7 + [ctypes.c_int, _PTR, _I64, _PTR], None),
    "adam_rows_bf16": ([_PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64] + [_F32] * 7 + [ctypes.c_int, _PTR, _I64, _PTR],
                       None),
    "gather_dot": ([_PTR, _PTR, _PTR, _I64, _I64, _I64, _PTR], None),
    "transposed_product": ([_PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR], ctypes.c_int),
    "decode_residual": ([_PTR] * 5 + [_I64] * 3 + [_PTR, _PTR, _F32] + [_PTR] * 4, ctypes.c_int),
    "grouped_select": ([_PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _I64, _PTR, _PTR], ctypes.c_int),
}


def available() -> bool:
    """Whether the compiled kernels can be used (built and loaded, and not switched off)."""
    return os.environ.get("SWITCHSAE_NATIVE", "1") != "0" and _library() is not None


def usable(*tensors: Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.int64)) -> bool:
    """:func:`available`, and every tensor is a CPU tensor of one of ``dtypes`` (the wrappers
    below make their inputs contiguous)."""
    return available() and all(t.device.type == "cpu" and t.dtype in dtypes for t in tensors)


@functools.cache
def _library() -> ctypes.CDLL | None:
    try:
        library = ctypes.CDLL(str(_build()))
    except OSError as error:
        warnings.warn(f"switchsae: compiled CPU kernels unavailable ({error}); using torch ops (slower)", stacklevel=2)
        return None
    for name, (argtypes, restype) in SIGNATURES.items():
        getattr(library, name).argtypes, getattr(library, name).restype = argtypes, restype
    return library


def _kernels() -> ctypes.CDLL:
    """The loaded library, for a kernel wrapper (whose callers checked :func:`usable` first)."""
    library = _library()
    assert library is not None, "a compiled kernel was called where the compiled kernels are unavailable"
    return library


def _build() -> Path:
    """Compile native.c unless this machine's build is cached; the rename makes it atomic."""
    compiler = _compiler()
    version = _run([*compiler, "--version"])
    key_parts = [SOURCE.read_text(), version, shlex.join(compiler), *FLAGS, _cpu_features(compiler)]
    key = hashlib.sha256("\0".join(key_parts).encode()).hexdigest()[:16]
    cache = host.cache_dir("native")
    target = cache / f"native-{platform.machine()}-{key}.so"
    if not target.exists():
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            built = Path(tmp) / target.name
            _run([*compiler, *FLAGS, "-o", str(built), str(SOURCE)])
            os.replace(built, target)
    return target


def _compiler() -> list[str]:
    """The C compiler command: ``$CC`` split into words (it may carry a wrapper or flags), else cc or gcc."""
    configured = shlex.split(os.environ.get("CC", ""))
    if configured:
        return configured
    found = shutil.which("cc") or shutil.which("gcc")
    if found is None:
        raise OSError("no C compiler found (set CC)")
    return [found]


def _cpu_features(compiler: list[str]) -> str:
    """What the build depends on in the CPU: its ``/proc/cpuinfo`` flags (empty where unreadable)
    and the macros ``compiler`` defines for ``-march=native`` (e.g. ``__AVX512BF16__``)."""
    macros = _run([*compiler, "-march=native", "-dM", "-E", "-x", "c", os.devnull])
    return host.cpu_identity()[1] + "\0" + "\n".join(sorted(macros.splitlines()))


def _run(command: list[str]) -> str:
    """The standard output of a compiler call; OSError (with the tail of its error output) if it
    fails, and if it runs past the timeout, after its whole process group is killed."""
    timeout = _compile_timeout()
    with subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise OSError(f"{shlex.join(command[:2])} ... did not finish within {timeout:g} s "
                          "(SWITCHSAE_COMPILE_TIMEOUT sets the limit)") from None
    if process.returncode:
        what = f"{command[0]} failed on {SOURCE.name}" if str(SOURCE) in command else f"{shlex.join(command)} failed"
        raise OSError(f"{what}: {err.strip()[-500:]}")
    return out


def _compile_timeout() -> float:
    """``COMPILE_TIMEOUT_S``, or ``$SWITCHSAE_COMPILE_TIMEOUT`` where set (an empty value counts as unset)."""
    value = os.environ.get("SWITCHSAE_COMPILE_TIMEOUT") or str(COMPILE_TIMEOUT_S)
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise OSError(f"SWITCHSAE_COMPILE_TIMEOUT={value!r} is not a positive number of seconds")
    return seconds


def topk(pre: Tensor, k: int, offsets: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Values (fp32) and indices of the ``k`` largest entries in each row of ``pre: [T, m]`` (fp32
    or bf16), in no particular order; row ``t``'s indices are shifted by ``offsets[t]``. A row
    with NaNs still gets k distinct in-range indices, in no defined order (torch.topk ranks NaN
    highest; either way the NaN reaches the loss)."""
    n_rows, m = pre.shape
    if not 0 < k <= m:
        raise ValueError(f"k = {k} must be in [1, {m}]")
    _require(offsets is None or offsets.shape == (n_rows,), "top-k needs one offset per row", pre,
             *([] if offsets is None else [offsets]))
    pre = pre.contiguous()
    offsets = None if offsets is None else offsets.to(torch.int64).contiguous()
    values = torch.empty(n_rows, k, dtype=torch.float32)
    indices = torch.empty(n_rows, k, dtype=torch.int64)
    kernel = {torch.float32: _kernels().topk_f32, torch.bfloat16: _kernels().topk_bf16}[pre.dtype]
    if kernel(pre.data_ptr(), n_rows, m, k, _pointer(offsets), values.data_ptr(), indices.data_ptr()):
        raise MemoryError(f"top-k: no memory for {2 * m} scratch entries per thread")
    return values, indices


def _pointer(tensor: Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _require(condition: bool, what: str, *tensors: Tensor) -> None:
    """Shapes the C side trusts are checked here: a mismatch is an error, not a stray read."""
    if not condition:
        raise ValueError(f"{what}; got shapes {', '.join(str(tuple(t.shape)) for t in tensors)}")


def _check_rows(indices: Tensor, n_rows: int) -> None:
    """The C kernels index without bounds checks, so every index is checked here first."""
    if indices.numel():
        low, high = torch.aminmax(indices)
        if int(low) < 0 or int(high) >= n_rows:
            raise IndexError(f"latent index out of range [0, {n_rows})")


def gather_dot(x: Tensor, W: Tensor, indices: Tensor) -> Tensor:
    """``out_tj = W[indices_tj] · x_t`` → ``[T, k]``."""
    _require(indices.ndim == 2 and x.shape[0] == indices.shape[0] and x.shape[1] == W.shape[1],
             "gather_dot needs x [T, d], W [M, d], indices [T, k]", x, W, indices)
    _check_rows(indices, W.shape[0])
    x, W, indices = x.contiguous(), W.contiguous(), indices.contiguous()
    out = torch.empty(indices.shape, dtype=torch.float32)
    _kernels().gather_dot(x.data_ptr(), W.data_ptr(), indices.data_ptr(), *indices.shape, W.shape[1], out.data_ptr())
    return out


def transposed_product(weights: Tensor, rows: Tensor, inputs: Tensor, n_rows: int, W: Tensor | None = None,
                       W_rows: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """``out[i] = Σ_{tj: rows_tj = i} weights_tj inputs_t`` → ``[n_rows, d]`` (zero where no entry),
    and with ``W`` also ``Σ_i c_i W[W_rows[i]]`` (``W[i]`` without ``W_rows``), ``c_i`` the sum of
    row ``i``'s weights → ``[d]``; else None."""
    _require(rows.ndim == 2 and weights.shape == rows.shape and inputs.shape[0] == rows.shape[0]
             and (W is None or (W.shape[1] == inputs.shape[1]
                                and (W.shape[0] if W_rows is None else W_rows.numel()) >= n_rows)),
             "transposed_product needs weights and rows [T, k], inputs [T, d], W [>= n_rows, d]", weights, rows, inputs)
    _check_rows(rows, n_rows)
    if W is not None and W_rows is not None:
        _check_rows(W_rows, W.shape[0])
    # contiguous copies held in locals: the pointers below must outlive the call
    weights, rows, inputs = weights.contiguous(), rows.contiguous(), inputs.contiguous()
    W, W_rows = (None, None) if W is None else (W.contiguous(), None if W_rows is None else W_rows.contiguous())
    out = torch.empty(n_rows, inputs.shape[1], dtype=torch.float32)
    W_sum = None if W is None else torch.empty(inputs.shape[1], dtype=torch.float32)
    if _kernels().transposed_product(rows.data_ptr(), weights.data_ptr(), inputs.data_ptr(), *rows.shape,
                                     inputs.shape[1], n_rows, out.data_ptr(), _pointer(W), _pointer(W_rows),
                                     _pointer(W_sum)):
        raise MemoryError(f"transposed product: no memory to bucket {rows.numel()} entries")
    return out, W_sum


def decode_residual(z: Tensor, indices: Tensor, W: Tensor, b: Tensor, x: Tensor, value_grads: bool,
                    out_rows: Tensor | None = None, out_scale: float = 1.0,
                    ) -> tuple[Tensor, Tensor, Tensor | None, float, Tensor]:
    """``x̂_t = b + Σ_j z_tj W[i_tj]``, ``r = x̂ − x`` and, with ``value_grads``, ``P_tj = W[i_tj] · r_t``,
    in one pass per token; ``x̂`` is returned times ``out_scale`` with token ``t`` in row
    ``out_rows[t]`` (a permutation of the tokens; row ``t`` if None). Returns
    ``(x̂, r, P or None, Σ_t ‖r_t‖², Σ_t r_t)``."""
    n_tokens, d = x.shape
    _require(indices.ndim == 2 and z.shape == indices.shape and indices.shape[0] == n_tokens
             and W.shape[1] == d and b.shape == (d,) and (out_rows is None or out_rows.shape == (n_tokens,)),
             "decode_residual needs z and indices [T, k], W [M, d], b [d], x [T, d], out_rows [T]", z, indices, W, b, x)
    _check_rows(indices, W.shape[0])
    if out_rows is not None:
        _check_rows(out_rows, n_tokens)
        out_rows = out_rows.contiguous()
    z, indices, W, b, x = (t.contiguous() for t in (z, indices, W, b, x))
    x_hat, residual = torch.empty(n_tokens, d, dtype=torch.float32), torch.empty(n_tokens, d, dtype=torch.float32)
    residual_sum = torch.empty(d, dtype=torch.float32)
    P = torch.empty(indices.shape, dtype=torch.float32) if value_grads else None
    squares = ctypes.c_double()
    if _kernels().decode_residual(z.data_ptr(), indices.data_ptr(), W.data_ptr(), b.data_ptr(), x.data_ptr(),
                                  *indices.shape, d, x_hat.data_ptr(), _pointer(out_rows), out_scale,
                                  residual.data_ptr(), _pointer(P), ctypes.addressof(squares), residual_sum.data_ptr()):
        raise MemoryError("decode_residual: no memory for per-thread sums")
    return x_hat, residual, P, squares.value, residual_sum


def adam_rows(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, rows: Tensor | None = None, *,
              lr: float, beta1: float, beta2: float, eps: float, step: int, unit_norm: bool = False,
              low: Tensor | None = None, key_rows: Tensor | None = None, grad_scale: float = 1.0) -> None:
    """Adam step ``step`` (1-based) in place on ``param[rows]`` (all rows if None) and its moments,
    with the gradient ``grad_scale · grad``, ``grad`` one row per updated row; ``param`` and the moments ``[n, d]`` and contiguous, ``rows``
    distinct. The moments are fp32, or both bf16: then they are updated in fp32 and stored with
    stochastic rounding keyed by ``step`` and each element's flat index, row ``key_rows[r]`` for
    row ``r`` where given (see native.c and :func:`switchsae.optim.stochastic_round_bf16`). ``unit_norm``: project the gradient off each
    row before and renormalise it after; ``low``: a contiguous bf16 copy of ``param`` whose
    updated rows are rewritten (see native.c)."""
    n = param.shape[0] if rows is None else rows.numel()
    _require(param.ndim == 2 and grad.shape == (n, param.shape[1]) and exp_avg.shape == exp_avg_sq.shape == param.shape
             and param.dtype == grad.dtype == torch.float32
             and exp_avg.dtype == exp_avg_sq.dtype in (torch.float32, torch.bfloat16)
             and all(t.is_contiguous() for t in (param, exp_avg, exp_avg_sq))
             and (low is None or (low.shape == param.shape and low.dtype == torch.bfloat16 and low.is_contiguous())),
             "adam_rows needs contiguous fp32 param, moments (fp32 or bf16, and bf16 copy) of one shape [n, d], "
             "fp32 grad [len(rows), d]", param, grad)
    _require(key_rows is None or key_rows.shape == (param.shape[0],), "adam_rows needs one key row per row", param)
    if rows is not None:
        _check_rows(rows, param.shape[0])
        rows = rows.contiguous()
    key_rows = None if key_rows is None else key_rows.to(torch.int64).contiguous()
    grad = grad.contiguous()  # held here: the pointer below must outlive the call
    kernel = _kernels().adam_rows_bf16 if exp_avg.dtype == torch.bfloat16 else _kernels().adam_rows
    kernel(param.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(), grad.data_ptr(), _pointer(rows), n,
           param.shape[1], lr, beta1, beta2, eps, 1 - beta1 ** step, (1 - beta2 ** step) ** 0.5, grad_scale, int(unit_norm),
           _pointer(low), step, _pointer(key_rows))
    increment_version((param, exp_avg, exp_avg_sq) + (() if low is None else (low,)))


#: tokens per gemm of the fused selection, whatever the expert width: MKL's sgemm runs faster on
#: wider tiles, more than the top-k loses when its [tile, m] buffer outgrows L2 (README, "Measured
#: behind design choices")
SELECTION_TILE = 256


@functools.cache
def _sgemm() -> int | None:
    """Address of the Fortran ``SGEMM`` of the MKL linked into torch (x86-64 CPU wheels), or None."""
    try:
        return ctypes.cast(ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so")).SGEMM,
                           ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None


def fused_selection_available() -> bool:
    """Whether :func:`grouped_select` can run (compiled kernels, and torch's MKL to call)."""
    return available() and _sgemm() is not None


def grouped_select(x: Tensor, W: Tensor, counts: list[int], k: int) -> tuple[Tensor, Tensor]:
    """Top-k of ``x_t W_{e_t}ᵀ`` for fp32 tokens grouped by expert (``counts[e]`` tokens of expert
    ``e``, whose rows of ``W: [M, d]`` are ``[e·m, (e+1)·m)``), matmul and selection fused per
    tile of :data:`SELECTION_TILE` tokens. Returns the fp32 products and global indices, ``[T, k]``."""
    n_tokens, d = x.shape
    m = W.shape[0] // len(counts)
    if sum(counts) != n_tokens or m * len(counts) != W.shape[0] or W.shape[1] != d:
        raise ValueError(f"{len(counts)} experts with {sum(counts)} tokens do not fit x {tuple(x.shape)}, "
                         f"W {tuple(W.shape)}")
    if not 0 < k <= m:
        raise ValueError(f"k = {k} must be in [1, {m}]")
    x, W = x.float().contiguous(), W.float().contiguous()
    starts = torch.tensor([0, *counts], dtype=torch.int64).cumsum(0)
    values = torch.empty(n_tokens, k, dtype=torch.float32)
    indices = torch.empty(n_tokens, k, dtype=torch.int64)
    if _kernels().grouped_select(_sgemm(), x.data_ptr(), W.data_ptr(), starts.data_ptr(), len(counts), d, m, k,
                                 SELECTION_TILE, values.data_ptr(), indices.data_ptr()):
        raise MemoryError("fused selection: no memory for its per-thread buffers")
    return values, indices
