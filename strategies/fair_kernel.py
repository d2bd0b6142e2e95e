"""LoRA-FAIR's Adam loop as one compiled C kernel: every step one pass over the module's data.

:func:`strategies.fair.correct_batch`'s torch loop makes ~9 torch calls a step, each a pass over
the d_out x r tensors; the loop is memory-bound, so its time is the number of passes. Here a step
is one pass, a block of rows (4 KiB of each tensor, in L1) at a time: the gradient, Adam's two
moments and the update, then ``dB gram_a`` for those rows (the rows' r values in vector
registers), then the four inner products of the next step's objective. The per-module scalars
(cosine, loss, best iterate, Adam's bias corrections) are the torch loop's float64 arithmetic.

The kernel is compiled once per machine with the system's C compiler (``CC``, else ``cc``) and
cached under ``$FEDLORA_CACHE/kernels`` (default ``~/.cache/fedlora/kernels``), keyed by source,
flags, compiler and CPU. Where no compiler works, :func:`load` returns ``None`` and the torch loop
runs instead: the results agree to rounding (tests compare the two paths).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from fedlora.modelstore import cache_root

# REAL (float or double), RANK and SQRT are filled in by _source(). g = d gram, any rank:
_GENERIC = r"""
static inline void rows_times_gram_REAL(
    long long rows, long long r, const REAL *restrict d, const REAL *restrict gram, REAL *restrict g)
{
    for (long long i = 0; i < rows; ++i) {
        REAL *gi = g + i * r;
        for (long long k = 0; k < r; ++k) gi[k] = 0;
        for (long long j = 0; j < r; ++j)
            for (long long k = 0; k < r; ++k) gi[k] += d[i * r + j] * gram[j * r + k];
    }
}
"""
# A constant rank, a multiple of the 32-byte vector: U rows at a time, each row of g in NV vector
# registers (GCC/Clang vector extensions, lowered to whatever the CPU has).
_MATVEC = r"""
static inline void rows_times_gram_REAL_RANK(
    long long rows, const REAL *restrict d, const REAL *restrict gram, REAL *restrict g)
{
    enum { W = 32 / sizeof(REAL), NV = RANK / W, U = NV >= 8 ? 1 : 8 / NV };
    long long i = 0;
    for (; i + U <= rows; i += U) {
        vec_REAL acc[U][NV];
        for (int u = 0; u < U; ++u) for (int v = 0; v < NV; ++v) acc[u][v] = (vec_REAL){0};
        for (int j = 0; j < RANK; ++j)
            for (int v = 0; v < NV; ++v) {
                const vec_REAL row = *(const vec_REAL *)(gram + j * RANK + v * W);
                for (int u = 0; u < U; ++u) acc[u][v] += d[(i + u) * RANK + j] * row;
            }
        for (int u = 0; u < U; ++u)
            for (int v = 0; v < NV; ++v) *(vec_REAL *)(g + (i + u) * RANK + v * W) = acc[u][v];
    }
    rows_times_gram_REAL(rows - i, RANK, d + i * RANK, gram, g + i * RANK);
}
"""
_CASE = "                case RANK: rows_times_gram_REAL_RANK(hi - lo, d_b + e0, gram, g + e0); break;\n"
RANKS = {"float": (8, 16, 32, 64), "double": (4, 8, 16, 32, 64)}  # with a vectorised dB gram_a
# One module: m, c = B_bar gram_a (d_out x r), gram_a (r x r), scratch d_b, g, mom, var (d_out x r
# each) and the output best (d_out x r); fair_adam_REAL runs n_mod modules stored one after another.
_TEMPLATE = r"""
static void fair_module_REAL(
    long long rows, long long r, const REAL *restrict m, const REAL *restrict c, const REAL *restrict gram,
    double c_inner, double c_q, double norm_sq, double lam, long long steps, double lr, double tiny,
    REAL *restrict d_b, REAL *restrict g, REAL *restrict mom, REAL *restrict var, REAL *restrict best)
{
    const double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
    const long long n = rows * r, block_rows = BLOCK / r > 0 ? BLOCK / r : 1;
    double r_m = 0.0, r_c = 0.0, r_g = 0.0, r_d = 0.0, best_loss = INFINITY;
    memset(d_b, 0, n * sizeof(REAL)); memset(g, 0, n * sizeof(REAL));
    memset(mom, 0, n * sizeof(REAL)); memset(var, 0, n * sizeof(REAL)); memset(best, 0, n * sizeof(REAL));
    for (long long t = 1; t <= steps + 1; ++t) {
        double inner = c_inner + r_m;                       /* <B, m> */
        double q = c_q + 2.0 * r_c + r_g;                   /* ||B A_bar||^2 */
        q = (0.0 > q) ? 0.0 : q;                            /* Python's max(q, 0.0): NaN stays NaN */
        double den = sqrt(norm_sq * q + tiny);
        double loss = 1.0 - inner / den + lam * r_d;
        int improved = loss < best_loss;
        if (improved) {
            best_loss = loss;
            memcpy(best, d_b, n * sizeof(REAL));
        }
        if (t > steps) break;
        double coef = q > 0.0 ? inner / (q * den) : 0.0;
        const REAL w_m = (REAL)(-1.0 / den), w_c = (REAL)coef, w_d = (REAL)(2.0 * lam);
        const REAL keep = (REAL)(1.0 - beta1);
        const REAL v_scale = (REAL)((1.0 - beta2) / pow(beta2, (double)t));
        const double bc1 = 1.0 - pow(beta1, (double)t), bc2_sqrt = sqrt(1.0 - pow(beta2, (double)t));
        const double root = pow(beta2, (double)t / 2.0);
        const REAL add = (REAL)(eps * bc2_sqrt / root), step = (REAL)(-lr * bc2_sqrt / (bc1 * root));
        r_m = r_c = r_g = r_d = 0.0;
        for (long long lo = 0; lo < rows; lo += block_rows) {  /* a block of rows stays in L1 */
            const long long hi = lo + block_rows < rows ? lo + block_rows : rows;
            const long long e0 = lo * r, e1 = hi * r;
            for (long long e = e0; e < e1; ++e) {           /* gradient and Adam, elementwise */
                REAL grad = w_m * m[e] + w_c * (c[e] + g[e]) + w_d * d_b[e];
                REAL o = mom[e] + keep * (grad - mom[e]);
                REAL v = var[e] + v_scale * (grad * grad);
                mom[e] = o; var[e] = v;
                d_b[e] = d_b[e] + step * (o / (SQRT(v) + add));
            }
            switch (r) {                                    /* g = dB gram_a for the block */
CASES                default: rows_times_gram_REAL(hi - lo, r, d_b + e0, gram, g + e0);
            }
            REAL am[LANES] = {0}, ac[LANES] = {0}, ag[LANES] = {0}, ad[LANES] = {0};
            long long e = e0;
            for (; e + LANES <= e1; e += LANES)             /* the next step's inner products, in lanes */
                for (int k = 0; k < LANES; ++k) {
                    const REAL x = d_b[e + k];
                    am[k] += x * m[e + k]; ac[k] += x * c[e + k]; ag[k] += x * g[e + k]; ad[k] += x * x;
                }
            for (int k = 0; e < e1; ++e, ++k) {
                const REAL x = d_b[e];
                am[k] += x * m[e]; ac[k] += x * c[e]; ag[k] += x * g[e]; ad[k] += x * x;
            }
            for (int k = 0; k < LANES; ++k) { r_m += am[k]; r_c += ac[k]; r_g += ag[k]; r_d += ad[k]; }
        }
    }
}

void fair_adam_REAL(
    long long n_mod, long long rows, long long r, const REAL *m, const REAL *c, const REAL *gram,
    const double *c_inner, const double *c_q, const double *norm_sq, double lam, long long steps,
    double lr, double tiny, REAL *scratch, REAL *best)
{
    const long long n = rows * r;
    for (long long i = 0; i < n_mod; ++i)
        fair_module_REAL(rows, r, m + i * n, c + i * n, gram + i * r * r, c_inner[i], c_q[i], norm_sq[i],
                         lam, steps, lr, tiny, scratch, scratch + n, scratch + 2 * n, scratch + 3 * n,
                         best + i * n);
}
"""
# BLOCK elements of each array per block (4 KiB of float32: the block's ~7 arrays stay in L1);
# LANES partial sums per inner product, added in float64 after each block.


def _source() -> str:
    """Return the kernel's C source: both element types, a vectorised ``dB gram_a`` per rank in ``RANKS``."""
    parts = ["#include <math.h>\n#include <string.h>\n#define BLOCK 1024\n#define LANES 16\n"]
    for real, sqrt in (("float", "sqrtf"), ("double", "sqrt")):
        vec = "typedef REAL vec_REAL __attribute__((vector_size(32), aligned(sizeof(REAL))));\n"
        kernels = [vec, _GENERIC, *(_MATVEC.replace("RANK", str(rank)) for rank in RANKS[real])]
        cases = "".join(_CASE.replace("RANK", str(rank)) for rank in RANKS[real])
        kernels.append(_TEMPLATE.replace("CASES", cases))
        parts += [x.replace("REAL", real).replace("SQRT", sqrt) for x in kernels]
    return "".join(parts)


# -fno-math-errno lets sqrt vectorise; nothing that changes IEEE results (no -ffast-math).
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared")
_log = logging.getLogger(__name__)
_lock = threading.Lock()


def _cpu_key() -> str:
    """Return what identifies this CPU for ``-march=native`` code (model and flags where Linux says)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(lines)))


def build(directory: Path) -> Path:
    """Compile the kernel into ``directory`` (once per source, flags, compiler and CPU) and return its path.

    Raises
    ------
    OSError
        If no C compiler is found (set ``CC``) or the directory cannot be written.
    subprocess.CalledProcessError
        If the compiler fails.
    """
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler found for the LoRA-FAIR kernel: install gcc or set CC")
    source = _source()  # built per call (microseconds), so the cache key always follows the code
    key = hashlib.sha256("\0".join((source, *FLAGS, compiler, _cpu_key())).encode()).hexdigest()[:16]
    target = Path(directory) / f"fair_adam_{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src, out = Path(tmp) / "fair_adam.c", Path(tmp) / "fair_adam.so"
            src.write_text(source)
            cmd = [compiler, *FLAGS, str(src), "-o", str(out), "-lm"]
            subprocess.run(cmd, check=True, capture_output=True, timeout=120)
            os.replace(out, target)  # atomic: concurrent builders each install a complete file
    return target


def load() -> ctypes.CDLL | None:
    """Return the kernel library (built and cached on first use), or ``None`` where it cannot be built.

    ``FEDLORA_NO_NATIVE=1`` skips it; either way the caller then runs the torch loop. Thread-safe
    (LoRA-FAIR's worker threads call it).
    """
    with _lock:
        return _load_once()


@functools.lru_cache(maxsize=1)
def _load_once() -> ctypes.CDLL | None:
    if os.environ.get("FEDLORA_NO_NATIVE"):
        return None
    try:
        return bind(build(cache_root() / "kernels"))
    except (OSError, subprocess.SubprocessError) as exc:
        _log.warning("LoRA-FAIR's compiled kernel is unavailable (%s); its torch loop runs instead", exc)
        return None


def bind(path: Path) -> ctypes.CDLL:
    """Open the kernel library at ``path`` (from :func:`build`) with its functions' C signatures.

    Raises
    ------
    OSError
        If the library cannot be opened.
    AttributeError
        If it lacks ``fair_adam_float`` or ``fair_adam_double``.
    """
    lib = ctypes.CDLL(str(path))
    i64, f64, ptr = ctypes.c_longlong, ctypes.c_double, ctypes.c_void_p
    for name in ("fair_adam_float", "fair_adam_double"):
        fn = getattr(lib, name)
        fn.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, f64, i64, f64, f64, ptr, ptr]
        fn.restype = None
    return lib


def correct_batch_native(
    lib: ctypes.CDLL,
    m: torch.Tensor,
    c_mat: torch.Tensor,
    gram_a: torch.Tensor,
    c_inner: torch.Tensor,
    c_q: torch.Tensor,
    norm_sq: torch.Tensor,
    lam: float,
    steps: int,
    lr: float,
    tiny: float,
) -> torch.Tensor:
    """Return the best ``dB`` per module (M x d_out x r), as :func:`strategies.fair.correct_batch` does.

    ``m``, ``c_mat = B_bar gram_a`` (M x d_out x r) and ``gram_a`` (M x r x r) are float32 or
    float64; ``c_inner = <B_bar, m>``, ``c_q = <B_bar, C>`` and ``norm_sq = ||delta_W||^2`` are
    float64 (M,). The call releases the GIL (ctypes), so worker threads run modules in parallel.

    Raises
    ------
    TypeError
        If the tensors are not float32/float64 or do not share one dtype.
    ValueError
        If the shapes do not match (the C code would read out of bounds).
    """
    scalars = (c_inner, c_q, norm_sq)
    dtype = m.dtype
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"the FAIR kernel runs float32 or float64, got {dtype}; cast the factors first")
    if c_mat.dtype != dtype or gram_a.dtype != dtype:
        raise TypeError(
            f"m, c_mat and gram_a must share one dtype, got {dtype}, {c_mat.dtype}, {gram_a.dtype}"
        )
    n_mod, d_out, r = m.shape
    if c_mat.shape != m.shape or gram_a.shape != (n_mod, r, r) or any(x.shape != (n_mod,) for x in scalars):
        raise ValueError(
            f"shapes do not match M x d_out x r = {tuple(m.shape)}: c_mat {tuple(c_mat.shape)}, gram_a "
            f"{tuple(gram_a.shape)} (want M x r x r), scalars {[tuple(x.shape) for x in scalars]} (want (M,))"
        )
    m, c_mat, gram_a = (x.contiguous() for x in (m, c_mat, gram_a))
    c_inner, c_q, norm_sq = (x.to(torch.float64).contiguous() for x in scalars)
    scratch = torch.empty(4, d_out, r, dtype=dtype)
    best = torch.empty(n_mod, d_out, r, dtype=dtype)
    fn = lib.fair_adam_float if dtype == torch.float32 else lib.fair_adam_double
    fn(
        n_mod, d_out, r, m.data_ptr(), c_mat.data_ptr(), gram_a.data_ptr(),
        c_inner.data_ptr(), c_q.data_ptr(), norm_sq.data_ptr(),
        float(lam), int(steps), float(lr), float(tiny), scratch.data_ptr(), best.data_ptr(),
    )  # fmt: skip
    return best
