"""LoRA-FAIR's compiled Adam kernel against the torch loop, and its build, cache and fallback."""

import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from strategy_testkit import lora_state, result

from strategies import fair_kernel
from strategies.fair import LoraFAIR, correct_batch, fair_objective

F64 = torch.float64

needs_kernel = pytest.mark.skipif(fair_kernel.load() is None, reason="no C compiler for the LoRA-FAIR kernel")


def problem(seed: int, n_mod: int, d_out: int, r: int, dtype: torch.dtype = F64):
    """Return ``(m, gram_a, norm_w, b_bar)`` of a random FAIR problem (FedIT of 3 clients at rank r)."""
    gen = torch.Generator().manual_seed(seed)
    d_in, kr = 9, 3 * r
    b_cat = torch.randn(n_mod, d_out, kr, generator=gen, dtype=F64)
    a_cat = torch.randn(n_mod, kr, d_in, generator=gen, dtype=F64)
    a_bar = torch.randn(n_mod, r, d_in, generator=gen, dtype=F64)
    b_bar = torch.randn(n_mod, d_out, r, generator=gen, dtype=F64)
    m = b_cat @ (a_cat @ a_bar.mT)
    norm_w = (b_cat @ a_cat).flatten(1).norm(dim=1)
    return tuple(x.to(dtype) for x in (m, a_bar @ a_bar.mT, norm_w, b_bar))


@needs_kernel
@pytest.mark.parametrize(
    ("d_out", "r"),
    [
        (7, 3),  # a rank without a vectorised dB gram_a: the generic loop
        (37, 4),  # vectorised (double: 4 per vector), rows not a multiple of the rows per pass
        (150, 16),  # three blocks of 64 rows, the last partial
        (5, 64),  # one row per pass, 64 x 64 gram_a
    ],
)
@pytest.mark.parametrize("lr", [1e-3, 5e-2])
def test_kernel_equals_torch_loop_in_float64(d_out, r, lr):
    m, gram_a, norm_w, b_bar = problem(d_out + r, 3, d_out, r)
    want = correct_batch(m, gram_a, norm_w, b_bar, 0.05, 40, lr, native=False)
    got = correct_batch(m, gram_a, norm_w, b_bar, 0.05, 40, lr)
    assert not torch.equal(want, torch.zeros_like(want))  # Adam moved: the comparison means something
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@needs_kernel
@pytest.mark.parametrize("r", [3, 8, 16])
def test_kernel_reaches_the_torch_loops_objective_in_float32(r):
    m, gram_a, norm_w, b_bar = problem(r, 2, 300, r, torch.float32)
    got = correct_batch(m, gram_a, norm_w, b_bar, 0.01, 60, 1e-2)
    want = correct_batch(m, gram_a, norm_w, b_bar, 0.01, 60, 1e-2, native=False)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)  # float32 sums in another order
    for i in range(2):
        args = (b_bar[i].double(), m[i].double(), gram_a[i].double(), float(norm_w[i]), 0.01)
        loss_got, loss_want = (
            fair_objective(got[i].double(), *args)[0],
            fair_objective(want[i].double(), *args)[0],
        )
        assert loss_got == pytest.approx(loss_want, abs=1e-6)
        assert loss_got < fair_objective(torch.zeros_like(got[i]).double(), *args)[0]  # it improved on FedIT


@needs_kernel
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_kernel_keeps_db_zero_when_every_step_is_worse(dtype):
    # Adam's first step moves every entry by ~lr: with lam = 1e6 the penalty 1e6 * 80 * 1e-4 = 8000 far
    # exceeds anything the cosine can gain (at most 2), so the best iterate is dB = 0 exactly
    m, gram_a, norm_w, b_bar = problem(5, 2, 20, 4, dtype)
    got = correct_batch(m, gram_a, norm_w, b_bar, 1e6, 20, 1e-2)
    assert torch.equal(got, torch.zeros_like(got))
    moved = correct_batch(m, gram_a, norm_w, b_bar, 0.0, 20, 1e-2)  # without the penalty it does move
    assert bool((moved != 0).all())


def test_both_paths_run_through_the_strategy(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    dims = {"m0": (40, 12), "m1": (40, 12)}
    results = [result(i, 8, 16.0, 3 + i, lora_state(gen, 8, dims, head=None)) for i in range(3)]
    s = LoraFAIR(steps=10, lr=1e-2)
    state = s.init_state(lora_state(gen, 8, dims, head=None, zero_b=True), [x.spec for x in results])
    native = s.aggregate(state, results)
    monkeypatch.setenv("FEDLORA_NO_NATIVE", "1")
    fair_kernel._load_once.cache_clear()
    try:
        assert fair_kernel.load() is None
        fallback = s.aggregate(state, results)
    finally:
        monkeypatch.delenv("FEDLORA_NO_NATIVE")
        fair_kernel._load_once.cache_clear()
    for k in state:
        torch.testing.assert_close(native[k], fallback[k], rtol=1e-4, atol=1e-6)


def test_a_failing_compiler_falls_back_to_the_torch_loop(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setenv("FEDLORA_CACHE", str(tmp_path))
    with pytest.raises(subprocess.CalledProcessError):
        fair_kernel.build(tmp_path)
    fair_kernel._load_once.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="strategies.fair_kernel"):
            assert fair_kernel.load() is None
        assert "torch loop runs instead" in caplog.text
        m, gram_a, norm_w, b_bar = problem(1, 2, 6, 2)
        got = correct_batch(m, gram_a, norm_w, b_bar, 0.05, 5, 1e-2)  # still answers, by the torch loop
        assert torch.equal(got, correct_batch(m, gram_a, norm_w, b_bar, 0.05, 5, 1e-2, native=False))
    finally:
        fair_kernel._load_once.cache_clear()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # nothing half-built left behind


@needs_kernel
def test_build_is_cached_by_content(tmp_path):
    first = fair_kernel.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert fair_kernel.build(tmp_path) == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_kernel_refuses_half_precision_mixed_dtypes_and_bad_shapes():
    lib = fair_kernel.load()
    if lib is None:
        pytest.skip("no C compiler for the LoRA-FAIR kernel")
    ones = torch.ones(1, dtype=F64)
    m, gram_a, _, _ = problem(0, 1, 4, 2, torch.float16)
    with pytest.raises(TypeError, match="float32 or float64"):
        fair_kernel.correct_batch_native(lib, m, m, gram_a, ones, ones, ones, 0.1, 3, 1e-3, 1e-30)
    m, gram_a, _, _ = problem(0, 1, 4, 2)
    with pytest.raises(TypeError, match="share one dtype"):
        fair_kernel.correct_batch_native(lib, m, m, gram_a.float(), ones, ones, ones, 0.1, 3, 1e-3, 1e-30)
    with pytest.raises(ValueError, match="want M x r x r"):  # a 3 x 3 gram_a would be read past its end
        fair_kernel.correct_batch_native(
            lib, m, m, torch.ones(1, 3, 3, dtype=F64), ones, ones, ones, 0.1, 3, 1e-3, 1.0
        )
    with pytest.raises(ValueError, match=r"want \(M,\)"):
        fair_kernel.correct_batch_native(
            lib, m, m, gram_a, ones, ones, torch.ones(2, dtype=F64), 0.1, 3, 1e-3, 1.0
        )


@pytest.mark.parametrize(
    ("native", "dtype", "calls"), [(True, F64, 1), (False, F64, 0), (True, torch.float16, 0)]
)
def test_native_switch_picks_the_path(monkeypatch, native, dtype, calls):
    if fair_kernel.load() is None:
        pytest.skip("no C compiler for the LoRA-FAIR kernel")
    seen = []
    real = fair_kernel.correct_batch_native
    monkeypatch.setattr(fair_kernel, "correct_batch_native", lambda *a: seen.append(1) or real(*a))
    m, gram_a, norm_w, b_bar = problem(4, 1, 6, 2, dtype)
    got = correct_batch(m, gram_a, norm_w, b_bar, 0.05, 3, 1e-2, native=native)
    assert len(seen) == calls and got.dtype == dtype  # half precision takes the torch loop


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


has_compiler = pytest.mark.skipif(
    _compiler() is None or bool(os.environ.get("FEDLORA_NO_NATIVE")), reason="no C compiler here"
)


def _native_from(lib, m, gram_a, norm_w, b_bar, lam, steps, lr):
    """Run ``lib``'s kernel on a problem the way :func:`correct_batch` hands it over."""
    c_mat = torch.bmm(b_bar, gram_a)
    c_in = (b_bar * m).sum((-2, -1)).to(F64)
    c_q = (b_bar * c_mat).sum((-2, -1)).to(F64)
    tiny = torch.finfo(m.dtype).tiny
    norm_sq = norm_w.to(F64) ** 2
    return fair_kernel.correct_batch_native(lib, m, c_mat, gram_a, c_in, c_q, norm_sq, lam, steps, lr, tiny)


@has_compiler
def test_a_fresh_build_computes_what_the_torch_loop_does(tmp_path):
    """Where a compiler exists the kernel must build (no silent fallback) and match the torch loop.

    Built into an empty directory, so the source compiled is the current one (not a cached
    library); every element type and both kinds of ``dB gram_a`` (vectorised ranks and the
    generic loop) are run.
    """
    lib = fair_kernel.bind(fair_kernel.build(tmp_path))
    for dtype, r, tol in ((F64, 4, 1e-9), (F64, 3, 1e-9), (torch.float32, 8, 1e-4), (torch.float32, 5, 1e-4)):
        m, gram_a, norm_w, b_bar = problem(11, 2, 70, r, dtype)
        want = correct_batch(m, gram_a, norm_w, b_bar, 0.05, 12, 1e-2, native=False)
        got = _native_from(lib, m, gram_a, norm_w, b_bar, 0.05, 12, 1e-2)
        assert got.dtype == dtype and want.abs().max() > 1e-3  # the correction moved
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * 1e-2)


@has_compiler
def test_the_cache_key_follows_source_and_flags(monkeypatch, tmp_path):
    """A changed source or changed flags build a new library; a stale one is never reused."""
    first = fair_kernel.build(tmp_path)
    source = fair_kernel._source()
    monkeypatch.setattr(fair_kernel, "_source", lambda: source + "\n/* changed */\n")
    second = fair_kernel.build(tmp_path)
    monkeypatch.setattr(fair_kernel, "FLAGS", (*fair_kernel.FLAGS, "-DFEDLORA_TEST_FLAG"))
    third = fair_kernel.build(tmp_path)
    assert len({first, second, third}) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (first, second, third))
    assert all(p.name.startswith("fair_adam_") and p.suffix == ".so" for p in (first, second, third))


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="no /proc/cpuinfo")
def test_the_cpu_key_is_this_cpus_model_and_flags():
    """The cache key names the CPU by its model and feature lines (``-march=native`` code is per CPU)."""
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    want = sorted({ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features")})
    assert want and fair_kernel._cpu_key().split("\n") == want


def _path_with(tmp_path: Path, names: tuple[str, ...]) -> str:
    """Return a PATH holding only links named ``names`` to this machine's C compiler (and its tools)."""
    real = shutil.which("cc") or shutil.which("gcc")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in names:
        (bin_dir / name).symlink_to(real)
    for tool in ("as", "ld"):  # the compiler driver runs the assembler and linker found on PATH
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    return str(bin_dir)


@has_compiler
@pytest.mark.parametrize("names", [("cc",), ("gcc",)])
def test_build_finds_cc_or_gcc_on_the_path(monkeypatch, tmp_path, names):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", _path_with(tmp_path, names))
    built = fair_kernel.build(tmp_path / "cache" / "nested")  # directories made as needed
    assert built.parent == tmp_path / "cache" / "nested" and built.is_file()


def test_build_without_a_compiler_says_how_to_get_one(monkeypatch, tmp_path):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no compiler anywhere
    with pytest.raises(
        OSError, match=r"^no C compiler found for the LoRA-FAIR kernel: install gcc or set CC$"
    ):
        fair_kernel.build(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


@needs_kernel
def test_kernel_takes_scalars_of_any_float_dtype():
    """The per-module scalars are cast to float64 for C: float32 ones give the same answer."""
    m, gram_a, norm_w, b_bar = problem(5, 2, 40, 4)
    lib = fair_kernel.load()
    c_mat = torch.bmm(b_bar, gram_a)
    scalars = ((b_bar * m).sum((-2, -1)), (b_bar * c_mat).sum((-2, -1)), norm_w**2)
    args = (0.05, 8, 1e-2, torch.finfo(F64).tiny)
    want = fair_kernel.correct_batch_native(lib, m, c_mat, gram_a, *scalars, *args)
    got = fair_kernel.correct_batch_native(lib, m, c_mat, gram_a, *(s.float() for s in scalars), *args)
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)  # float32 rounding of the scalars only
