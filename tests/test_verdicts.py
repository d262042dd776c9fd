"""verdicts.py as a specification: the rule of docs/claims.md decides a comparison from per-seed
numbers -- a paired 95% t interval with the sample std, against the claim's margin."""

import math

import pytest

import verdicts


def seeds(*values):
    return dict(enumerate(values))


def test_a_clear_win_holds_and_a_clear_loss_does_not():
    pre_trained, scratch = seeds(0.91, 0.93, 0.90, 0.92, 0.94), seeds(0.50, 0.55, 0.48, 0.52, 0.51)
    assert verdicts.compare(pre_trained, scratch)["verdict"] == "holds"
    assert verdicts.compare(scratch, pre_trained)["verdict"] == "does not hold"


def test_an_interval_that_straddles_the_margin_is_not_settled():
    # differences +0.03, -0.02, +0.01: mean +0.007, interval about -0.06 .. +0.07
    result = verdicts.compare(seeds(0.53, 0.48, 0.51), seeds(0.50, 0.50, 0.50))
    low, high = result["interval"]
    assert low < 0 < high and result["verdict"] == "not settled"


def test_the_interval_is_the_t_interval_of_the_paired_differences_with_the_sample_std():
    a, b = seeds(3.0, 5.0, 4.0, 8.0), seeds(1.0, 2.0, 2.0, 3.0)   # differences 2, 3, 2, 5
    result = verdicts.compare(a, b)
    differences = [2.0, 3.0, 2.0, 5.0]
    mean = sum(differences) / 4
    sample_std = math.sqrt(sum((d - mean) ** 2 for d in differences) / 3)   # ddof = 1, not 4
    assert result["difference"] == pytest.approx(3.0) and result["n"] == 4
    assert result["interval"] == pytest.approx([mean - 3.182 * sample_std / 2, mean + 3.182 * sample_std / 2])
    assert verdicts.sample_std(differences) == pytest.approx(sample_std)


def test_pairing_is_by_seed_not_by_position():
    # seed 2 is missing from b: it is left out, and the others pair with their own seed
    result = verdicts.compare({0: 1.0, 1: 2.0, 2: 9.0, 3: 4.0}, {0: 0.0, 1: 1.0, 3: 3.0})
    assert result["differences"] == [1.0, 1.0, 1.0] and result["n"] == 3


def test_one_seed_gives_a_difference_but_no_interval_and_is_not_settled():
    result = verdicts.compare(seeds(0.99), seeds(0.10))
    assert result["difference"] == pytest.approx(0.89)
    assert result["interval"] is None and result["verdict"] == "not settled"


def test_identical_values_decide_only_against_the_margin():
    equal = seeds(1.0, 1.0, 1.0)
    assert verdicts.compare(equal, equal)["verdict"] == "not settled"            # 0 is not above 0
    assert verdicts.compare(equal, equal, margin=-0.02)["verdict"] == "holds"    # as good as, within 2 points
    # every seed the same difference: the interval is that point
    assert verdicts.compare(seeds(0.5, 0.6, 0.7), seeds(0.4, 0.5, 0.6))["interval"] == pytest.approx([0.1, 0.1])


def test_a_negative_margin_asks_as_good_as():
    head, full = seeds(0.980, 0.984, 0.985), seeds(0.990, 0.993, 0.995)   # head about 1 point behind
    assert verdicts.compare(head, full)["verdict"] == "does not hold"
    assert verdicts.compare(head, full, margin=-0.02)["verdict"] == "holds"
    far_behind = seeds(0.70, 0.72, 0.74)
    assert verdicts.compare(far_behind, full, margin=-0.02)["verdict"] == "does not hold"


def test_nothing_measured_is_not_tested():
    assert verdicts.compare({}, seeds(1.0))["verdict"] == "not tested"
    assert verdicts.combine([]) == "not tested"
    assert verdicts.combine([("toy", "not tested")]) == "not tested"


def test_settings_combine_into_one_verdict_or_a_mixed_line_that_names_them():
    assert verdicts.combine([("toy", "holds"), ("real text", "holds")]) == "holds"
    assert verdicts.combine([("toy", "not settled"), ("real text", "not settled")]) == "not settled"
    assert verdicts.combine([("toy k=4", "holds"), ("real text k=4", "does not hold"), ("toy k=16", "holds"),
                             ("real text k=16", "not settled"), ("C8", "not tested")]) == \
        "mixed: holds for toy k=4, k=16; not for real text k=4; not settled for real text k=16"


def test_a_long_mixed_line_counts_a_verdicts_settings_past_a_few_and_names_the_rest():
    many = [(f"remedy {i}", "holds") for i in range(7)] + [("int8", "does not hold"), ("lora", "not settled")]
    assert verdicts.combine(many) == "mixed: holds for 7 of 9 settings; not for int8; not settled for lora"
    few = [(f"remedy {i}", "holds") for i in range(5)] + [("int8", "does not hold")]
    assert verdicts.combine(few) == "mixed: holds for remedy 0, 1, 2, 3, 4; not for int8"


def test_groups_read_one_by_one_each_with_its_own_verdict_or_listing():
    rows = [("quick toy", "k=4", "holds"), ("quick toy", "k=all", "not settled"),
            ("real-text text", "k=4", "holds"), ("real-text text", "k=all", "holds"),
            ("sentiment", "k=16", "not settled"), ("sentiment", "k=16", "not settled"), ("C8", "x", "not tested")]
    assert verdicts.combine_groups(rows) == ("mixed. quick toy: holds for k=4; not settled for k=all. "
                                             "real-text text: holds. sentiment: not settled.")
    assert verdicts.combine_groups([("toy", "k=4", "holds"), ("text", "k=4", "holds")]) == "holds"
    assert verdicts.combine_groups([("toy", "k=4", "not tested")]) == "not tested"


def test_t_quantiles_match_the_tables_and_approach_the_normal():
    assert verdicts.t_quantile(1) == 12.706 and verdicts.t_quantile(2) == 4.303 and verdicts.t_quantile(30) == 2.042
    assert 2.03 < verdicts.t_quantile(31) < 2.042 and verdicts.t_quantile(10_000) == pytest.approx(1.96, abs=1e-3)
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 3, 4, 9, 29, 31, 60, 200):
        assert verdicts.t_quantile(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=1e-3)
