"""Spot-check named mutants without a full mutmut run (the mutation passes' study; not part of CI).

Each case is one source edit that a mutation run left alive and the test written to kill it.
The edited module is re-executed in-process (every loaded module is pointed at the new
objects), the test runs, and the original source is restored; the whole list takes seconds
because torch is imported once. A case whose text no longer matches the source is reported as
NOT-APPLIED (the code moved on: rerun ``scripts/mutation.py`` instead). The passes and every
survivor are written up in ``experiments/mutation.md``; test paths follow the merged test files
(each mutation-pass file merged into its unit's test file).

Usage (from the repository root)::

    python experiments/mutation_spotcheck.py      # prints KILLED / SURVIVED / NOT-APPLIED per case
"""

import importlib
import sys
import types

import pytest

ARGS = ["-x", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", "-p", "no:unraisableexception"]

R = "tests/adversary/test_robust_math.py::"
L = "tests/privacy/test_ledger_mutation.py::"
C = "tests/privacy/test_client_dp_mutation.py::"
K = "tests/strategies/test_strategy_common.py::"
AC = "tests/privacy/test_accounting_mutation.py::"
HE = "tests/strategies/test_hetlora.py::"
FL = "tests/strategies/test_flexlora.py::"
FA = "tests/strategies/test_fair.py::"
CA = "tests/privacy/test_mutation_kills_calibrate.py::"
CASES = [
    (
        "strategies.robust",
        "        total += scale**2 * _module_sq(",
        "        total = scale**2 * _module_sq(",
        R + "test_update_norm_sums_every_module_and_measures_b_when_the_result_lacks_a",
    ),
    (
        "strategies.robust",
        "    if a0 is None or a1 is None:",
        "    if a0 is None and a1 is None:",
        R + "test_update_norm_sums_every_module_and_measures_b_when_the_result_lacks_a",
    ),
    (
        "strategies.robust",
        "return math.sqrt(total) if math.isfinite(total) else math.inf",
        "return math.sqrt(total) if math.isfinite(total) or True else math.inf",
        R + "test_update_norm_sums_every_module_and_measures_b_when_the_result_lacks_a",
    ),
    (
        "strategies.robust",
        "    if factor <= 0 or len(results) < 2:",
        "    if factor <= 0 or len(results) < 3:",
        R + "test_example_counts_of_two_results_are_capped",
    ),
    (
        "strategies.robust",
        "        if norms[node] <= limit:",
        "        if norms[node] < limit:",
        R + "test_bound_one_clips_to_the_median_and_a_norm_at_the_limit_is_kept",
    ),
    (
        "strategies.robust",
        "    if bound <= 0 or len(kept) < 2:",
        "    if bound <= 1 or len(kept) < 2:",
        R + "test_bound_one_clips_to_the_median_and_a_norm_at_the_limit_is_kept",
    ),
    (
        "strategies.robust",
        "    if bound <= 0 or len(kept) < 2:",
        "    if bound <= 0 and len(kept) < 2:",
        R + "test_a_single_kept_result_is_never_clipped_even_below_bound_one",
    ),
    (
        "strategies.robust",
        "    strategy.load_state_dict(saved)\n    return state,",
        "    strategy.load_state_dict(None)\n    return state,",
        R + "test_aggregate_checked_restores_strategy_state_when_rolling_back",
    ),
    (
        "strategies.robust",
        'exceeds {max_abs:g}"})\n            continue',
        'exceeds {max_abs:g}"})\n            break',
        R + "test_bound_updates_goes_on_after_a_rejection_and_keeps_norms_on_every_path",
    ),
    (
        "strategies.robust",
        "        return Bounded(kept, rejected, clipped, norms)\n    limit",
        "        return Bounded(kept, rejected, clipped, None)\n    limit",
        R + "test_bound_updates_goes_on_after_a_rejection_and_keeps_norms_on_every_path",
    ),
    (
        "strategies.robust",
        "    if 2 * k >= len(tensors):",
        "    if 3 * k >= len(tensors):",
        R + "test_median_of_an_even_count_and_trimmed_mean_caps_the_trim",
    ),
    (
        "strategies.robust",
        "        k = (len(tensors) - 1) // 2",
        "        k = (len(tensors) - 2) // 2",
        R + "test_median_of_an_even_count_and_trimmed_mean_caps_the_trim",
    ),
    (
        "strategies.robust",
        "    for name in results[0].state:",
        "    for name in results[1].state:",
        R + "test_robust_center_of_one_result_is_that_result",
    ),
    (
        "strategies.robust",
        'c = coordinate_median(values) if self.center == "median" else',
        'c = coordinate_median(values) if self.center == "median" or True else',
        R + "test_robust_center_trimmed_mean_keeps_unsent_tensors_and_dtypes",
    ),
    (
        "strategies.robust",
        '    if getattr(inner, "name", "") not in CENTER_STRATEGIES:',
        '    if getattr(inner, "name") not in CENTER_STRATEGIES:',
        R + "test_robust_center_refuses_an_unnamed_inner_object_with_its_repr",
    ),
    (
        "strategies.robust",
        "not {getattr(inner, 'name', inner)!r}",
        "not {getattr(inner, 'name', None)!r}",
        R + "test_robust_center_refuses_an_unnamed_inner_object_with_its_repr",
    ),
    (
        "fedlora.privacy.ledger",
        '"update is released)"',
        '"XXupdate is released)XX"',
        L + "test_rounds_strictly_increase_within_a_run_but_runs_are_independent",
    ),
    (
        "fedlora.privacy.ledger",
        "(e.round, compute_epsilon(hist[: i + 1], self.delta, accountant))",
        "(e.round, compute_epsilon(hist[: i + 1], self.delta))",
        L + "test_epsilon_trajectory_uses_the_requested_accountant",
    ),
    (
        "fedlora.privacy.client_dp",
        "sorted(set(upd) ^ set(ref))[:3]",
        "sorted(set(upd) ^ set(ref))[:4]",
        C + "test_a_name_mismatch_lists_at_most_three_names",
    ),
    (
        "fedlora.privacy.calibrate",
        '"fewer steps / a smaller sample rate"',
        '"FEWER STEPS / A SMALLER SAMPLE RATE"',
        AC + "test_an_unreachable_budget_names_every_way_out",
    ),
    (
        "strategies.base",
        "        self.dp_tensors = inner.dp_tensors",
        "        self.dp_tensors = None",
        K + "test_wrapper_delegates_every_hook_to_the_inner_method",
    ),
    (
        "strategies.common",
        "like[name].dtype if name in like else states[0][name].dtype",
        "like[name].dtype if name in like else states[1][name].dtype",
        K + "test_average_named_casts_to_like_or_to_the_first_state",
    ),
    # Survivors of passes 1 and 3 (hetlora, flexlora, fair, calibrate), killed by new tests.
    (
        "strategies.hetlora",
        "a64, b64 = a.to(torch.float64), b.to(torch.float64)",
        "a64, b64 = a.to(None), b.to(torch.float64)",
        HE + "test_product_norm_is_exact_where_float32_gram_entries_cancel",
    ),
    (
        "strategies.hetlora",
        "a64, b64 = a.to(torch.float64), b.to(torch.float64)",
        "a64, b64 = a.to(torch.float64), b.to(None)",
        HE + "test_product_norm_is_exact_where_float32_gram_entries_cancel",
    ),
    *[
        (
            "strategies.hetlora",
            "for p, s in zip(pairs, scales, strict=True)]",
            f"for p, s in zip(pairs, scales{tail})]",
            HE + "test_norm_weights_refuses_scales_that_do_not_match_the_clients",
        )
        for tail in (", strict=None", ", strict=False", ", ")
    ],
    (
        "strategies.flexlora",
        "[p.b.to(f64)[None] for p in pairs],",
        "[p.b.to(None)[None] for p in pairs],",
        FL + "test_flexlora_module_computes_float32_factors_in_float64",
    ),
    *[
        (
            "strategies.flexlora",
            old,
            new,
            FL + "test_orthonormal_completion_keeps_the_rows_dtype_whatever_the_defaults",
        )
        for old, new in (
            ("hint.to(rows.dtype)", "hint.to(None)"),
            ("torch.eye(d, dtype=rows.dtype)", "torch.eye(d, dtype=None)"),
            ("torch.eye(d, dtype=rows.dtype)", "torch.eye(d, )"),
            ("d, dtype=rows.dtype)\n    return", "d, dtype=None)\n    return"),
            ("d, dtype=rows.dtype)\n    return", "d, )\n    return"),
        )
    ],
    *[
        (
            "strategies.flexlora",
            old,
            new,
            FL + "test_svds_of_mixed_dtype_factors_compute_in_float64",
        )
        for old, new in (
            ("= compute_dtype(b_cat, a_cat)\n    b, a_t", "= None\n    b, a_t"),
            ("compute_dtype(b_cat, a_cat)\n    b, a_t", "compute_dtype(a_cat)\n    b, a_t"),
            ("compute_dtype(b_cat, a_cat)\n    b, a_t", "compute_dtype(b_cat, )\n    b, a_t"),
            ("b, a_t = b_cat.to(dtype), a_cat.to(dtype)", "b, a_t = b_cat.to(None), a_cat.to(dtype)"),
            ("b, a_t = b_cat.to(dtype), a_cat.to(dtype)", "b, a_t = b_cat.to(dtype), a_cat.to(None)"),
            ("compute_dtype(b_cat, a_cat)\n    b, a = ", "compute_dtype(a_cat)\n    b, a = "),
            ("compute_dtype(b_cat, a_cat)\n    b, a = ", "compute_dtype(b_cat, )\n    b, a = "),
            ("b, a = b_cat.to(dtype), a_cat.to(dtype)", "b, a = b_cat.to(None), a_cat.to(dtype)"),
            ("b, a = b_cat.to(dtype), a_cat.to(dtype)", "b, a = b_cat.to(dtype), a_cat.to(None)"),
        )
    ],
    *[
        (
            "strategies.flexlora",
            "amax(dim=(-2, -1), keepdim=True)",
            new,
            FL + "test_gram_rescales_each_matrix_by_its_own_largest_entry",
        )
        for new in (
            "amax(dim=None, keepdim=True)",
            "amax(keepdim=True)",
            "amax(dim=(-2, -1), )",
            "amax(dim=(-2, +1), keepdim=True)",
            "amax(dim=(-2, -1), keepdim=False)",
        )
    ],
    (
        "strategies.flexlora",
        "vals.clamp_min(0.0).sqrt().unsqueeze(-2)",
        "vals.clamp_min(0.0).sqrt().unsqueeze(-3)",
        FL + "test_gram_factor_falls_back_per_matrix_for_several_singular_grams",
    ),
    (
        "strategies.flexlora",
        "w[..., -k:].flip(-1)",
        "w[..., -k:].flip(+1)",
        FL + "test_gram_top_svd_keeps_the_leading_subspace_when_top_is_below_m",
    ),
    *[
        (
            "strategies.flora",
            "for c, p in zip(coeffs, pairs, strict=True):",
            f"for c, p in zip(coeffs, pairs{tail}):",
            "tests/strategies/test_flora.py::"
            "test_flora_module_refuses_coefficients_that_do_not_match_the_clients",
        )
        for tail in (", strict=None", ", strict=False", ", ")
    ],
    *[
        (
            "strategies.flora",
            old,
            new,
            "tests/strategies/test_flora.py::"
            "test_flora_module_scales_half_precision_stacks_in_float32_and_rounds_once",
        )
        for old, new in (
            ("work = dtype if dtype in (", "work = dtype if True or dtype in ("),
            ("return LoraPair(a=a.to(dtype), b=b)", "return LoraPair(a=a.to(None), b=b)"),
        )
    ],
    *[
        (
            "strategies.flora",
            old,
            new,
            "tests/strategies/test_flora.py::test_extend_merge_and_compact_keep_the_templates_float32",
        )
        for old, new in (
            ("b=u.to(pair.b.dtype))", "b=u.to(None))"),
            ("a, b = pair.a.to(like[a_name(module)].dtype), pair.b", "a, b = pair.a.to(None), pair.b"),
            ("pair.b.to(like[b_name(module)].dtype)", "pair.b.to(None)"),
        )
    ],
    *[
        ("strategies.fair", old, new, FA + test)
        for old, new, test in (
            (
                "g_b = (b_cat.mT @ b_cat) * (cw",
                "g_b = (b_cat.mT @ b_cat) / (cw",
                "test_weighted_gram_norm_by_hand",
            ),
            (
                ".sum((-2, -1)).clamp_min(0.0)",
                ".sum((-2, -1)).clamp_min(1.0)",
                "test_weighted_gram_norm_by_hand",
            ),
            (
                "if steps == 0 or math.isinf(lam)",
                "if steps == 1 or math.isinf(lam)",
                "test_one_adam_step_already_corrects_b",
            ),
            (
                "d_b[~active] = 0.0",
                "d_b[~active] = 1.0",
                "test_a_module_without_update_keeps_fedits_b_next_to_a_corrected_one",
            ),
        )
    ],
    *[
        (
            "strategies.batched",
            old,
            new,
            "tests/strategies/test_batched.py::test_module_batches_names_the_clients_that_lack_a_module",
        )
        for old, new in (
            ("missing = [i for i, cp in enumerate(client_pairs) if module not in cp]", "missing = None"),
            (
                'StrategyError(f"client results {missing} lack',
                'StrategyError(None and f"client results {missing} lack',
            ),
        )
    ],
    *[
        (
            "strategies.fair",
            old,
            new,
            FA + "test_vectorised_adam_at_a_zero_and_a_small_product_equals_textbook_adam",
        )
        for old, new in (
            ("q = max(c_q[i] + 2.0 * r_c + r_g, 0.0)", "q = max(c_q[i] + 2.0 * r_c + r_g, 1.0)"),
            ("den = math.sqrt(norm_sq[i] * q + tiny)", "den = math.sqrt(norm_sq[i] * q - tiny)"),
            ("coef = inner / (q * den) if q > 0.0 else", "coef = inner / (q * den) if True else"),
            ("coef = inner / (q * den) if q > 0.0 else", "coef = inner / (q * den) if q >= 0.0 else"),
            ("coef = inner / (q * den) if q > 0.0 else", "coef = inner / (q * den) if q > 1.0 else"),
        )
    ],
    (
        "strategies.fair",
        "        pairs[0].a.to(f64)[None],",
        "        pairs[1].a.to(f64)[None],",
        FA + "test_fair_module_of_one_client_returns_its_factors",
    ),
    (
        "strategies.fair",
        "        pairs[0].b.to(f64)[None],",
        "        pairs[1].b.to(f64)[None],",
        FA + "test_fair_module_of_one_client_returns_its_factors",
    ),
    (
        "strategies.fair",
        "torch.sqrt(den_sq.clamp_min(0.0) + _TINY)",
        "torch.sqrt(den_sq.clamp_min(1.0) + _TINY)",
        FA + "test_factored_cosine_of_products_smaller_than_one",
    ),
    (
        "fedlora.privacy.calibrate",
        "    if spent > target_epsilon:",
        "    if spent >= target_epsilon:",
        CA + "test_a_sigma_that_spends_exactly_the_target_is_accepted",
    ),
    *[
        (
            "fedlora.privacy.calibrate",
            '            "lower epsilon_tolerance"\n',
            new,
            CA + "test_a_sigma_from_the_search_that_overspends_is_refused",
        )
        for new in ('            "XXlower epsilon_toleranceXX"\n', '            "LOWER EPSILON_TOLERANCE"\n')
    ],
    (
        "fedlora.privacy.calibrate",
        'f"calibrated sigma={sigma} spends epsilon={spent} > target {target_epsilon}; "\n'
        '            "lower epsilon_tolerance"\n',
        "None\n",
        CA + "test_a_sigma_from_the_search_that_overspends_is_refused",
    ),
]


def swap(modname: str, source: str) -> None:
    """Re-execute ``source`` as module ``modname`` and point every loaded module at the new objects."""
    mod = sys.modules[modname]
    old = dict(vars(mod))
    # A strategy module registers its classes on import: free their names for the re-execution.
    registry = getattr(sys.modules.get("strategies.registry"), "_REGISTRY", {})
    for name in [n for n, cls in registry.items() if cls.__module__ == modname]:
        del registry[name]
    exec(compile(source, mod.__file__, "exec"), vars(mod))
    new = vars(mod)
    by_id = {id(v): new[k] for k, v in old.items() if k in new and new[k] is not v}
    for m in list(sys.modules.values()):
        if not isinstance(m, types.ModuleType) or m is mod:
            continue
        d = getattr(m, "__dict__", None)
        if not d:
            continue
        for k, v in list(d.items()):
            if id(v) in by_id:
                d[k] = by_id[id(v)]


def main() -> int:
    """Run every case; return 1 if a test fails on the unmutated source, else 0."""
    # Import everything once (collection), then mutate and run.
    pytest.main(["--collect-only", "-q", *ARGS, *sorted({c[3].split("::")[0] for c in CASES if c[3]})])
    # Clean run of each test first: every test must pass unmutated.
    tests = sorted({c[3] for c in CASES if c[3]})
    if pytest.main([*ARGS, *tests]) != 0:
        print("a test fails on the unmutated source: fix that first")
        return 1
    results = []
    # Controls: re-executing each module unchanged must leave its tests passing (no false kills).
    controls = [(m, o, o, t) for m, o, _, t in {c[0]: c for c in CASES}.values()]
    for modname, old, new, test in [*controls, *CASES]:
        if test is None:
            continue
        mod = importlib.import_module(modname)
        src = open(mod.__file__, encoding="utf-8").read()
        if src.count(old) != 1:
            results.append(("NOT-APPLIED", modname, old))
            continue
        swap(modname, src.replace(old, new))
        try:
            rc = pytest.main([*ARGS, test])
        finally:
            swap(modname, src)
        verdict = "KILLED" if rc != 0 else "SURVIVED"
        label = verdict if old != new else f"CONTROL (unchanged source) {verdict}"
        results.append((label, modname, f"{old.strip()[:60]} -> {new.strip()[:60]}"))
    if pytest.main([*ARGS, *tests]) != 0:
        print("a test fails after restoring the source")
        return 1
    print("\n=== verification ===")
    for r in results:
        print(*r, sep=" | ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
