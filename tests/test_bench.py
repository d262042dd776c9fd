"""bench.py: what it counts. (How fast things are is what it prints, never what a test asserts.)"""

import numpy as np
import pytest
import torch

import bench
from model import make_config
from options import BenchOptions


def test_drawn_real_lengths_have_the_asked_share_and_fit_the_sequence():
    generator = np.random.default_rng(0)
    for fraction in (0.05, 0.2, 0.39, 0.5, 0.8, 1.0):
        for length in (16, 128, 512):
            lengths = bench.real_lengths(generator, 4000, length, fraction)
            assert lengths.min() >= min(3, length) and lengths.max() <= length
            assert abs(lengths.mean() / length - max(fraction, 3 / length)) < 0.03, (fraction, length)
    for batch_size in (1, 4, 32, 256):  # and each batch has the share exactly, to the token
        for fraction in (0.1, 0.39, 0.7):
            lengths = bench.real_lengths(generator, batch_size, 128, fraction)
            assert lengths.sum() == max(3 * batch_size, round(fraction * batch_size * 128))


def test_model_flops_count_real_tokens_only():
    config = make_config("small", vocab_size=1000, max_positions=128)
    full = bench.training_flops(config, np.full(8, 128), num_predicted=0)
    assert bench.training_flops(config, np.full(16, 64), num_predicted=0) < full  # same tokens, shorter attention
    assert bench.training_flops(config, [0], 0) == 0
    # the position-wise part is linear in real tokens: half the tokens, half of it
    position_wise = 6 * config.num_layers * (4 * 256 * 256 + 2 * 256 * config.intermediate_size)
    assert full - bench.training_flops(config, np.full(8, 64), 0) >= position_wise * 8 * 64
    assert bench.training_flops(config, [10], 3) - bench.training_flops(config, [10], 0) == 6 * 3 * (256 * 256 + 256 * 1000)


@pytest.mark.parametrize("real_fraction, as_pretrain, other", [(0.4, "fast, packed (as pretrain) (", "fast, not packed ("),
                                                          (0.9, "fast (", "fast, packed (")])
def test_a_padded_bench_times_the_fast_rows_packed_unpacked_and_computing_on_padding(real_fraction, as_pretrain, other):
    # pretrain's --packing auto packs rows at most half real (fast.packing_pays), on the CPU too: the
    # first fast rows are what pretrain would run, then the other packing choice, then padding computed
    rows = bench.bench(BenchOptions(config="tiny", batch_size=4, vocab_size=500, steps=1, real_fraction=real_fraction,
                                    peak_tflops=["fp32=1", "bf16=1"], device="cpu"), log=lambda line: None)
    variants = [row["variant"] for row in rows]
    assert variants[0].startswith("reading path") and variants[1].startswith(as_pretrain)
    firsts = [r for r in rows if r["variant"].startswith(as_pretrain)]
    others = [r for r in rows if r["variant"].startswith(other)]
    computing = [r for r in rows if r["variant"].startswith("fast, padding computed")]
    assert len(firsts) == len(others) == len(computing) >= 1
    assert all(r["train_tokens_per_s"] > 0 and 0 < r["mfu"] and r["peak_memory_gb"] is None for r in rows)  # None: a CPU


def test_the_table_compares_speed_and_peak_memory_with_transformers_like_for_like():
    row = {"variant": "v", "compiled": False, "train_tokens_per_s": 100.0, "infer_tokens_per_s": 1.0, "mfu": 0.5}
    rows = [{**row, "impl": "ptft", "precision": "bf16", "train_tokens_per_s": 160.0, "peak_memory_gb": 7.0},
            {**row, "impl": "hf", "precision": "bf16", "peak_memory_gb": 10.0},
            {**row, "impl": "ptft", "precision": "fp32", "peak_memory_gb": None}]  # no hf row in fp32; a CPU's memory
    lines = []
    bench.print_table(rows, lines.append)
    assert lines[2].endswith("| 7.0 GB | 1.60x | 0.70x |")
    assert lines[3].endswith("| 10.0 GB | 1.00x | 1.00x |")
    assert lines[4].endswith("| — | — | — |")


def test_the_precision_flag_chooses_the_fast_rows_precision_and_the_reading_path_stays_fp32():
    for precision, expected in (("bf16", ["fp32", "bf16"]), ("fp32", ["fp32", "fp32"])):
        rows = bench.bench(BenchOptions(config="tiny", batch_size=2, vocab_size=100, steps=1, precision=precision,
                                        peak_tflops=["fp32=1", "bf16=1"], device="cpu"), log=lambda line: None)
        assert [row["precision"] for row in rows] == expected
        assert rows[0]["variant"].startswith("reading path")


def test_the_profile_splits_one_step_into_data_wait_forward_backward_and_optimizer_summing_to_the_step():
    options = BenchOptions(config="tiny", batch_size=4, vocab_size=200, steps=1, real_fraction=0.5, device="cpu")
    device = torch.device("cpu")
    batch = bench.bench_batch(options, device, np.random.default_rng(0))
    lines = []
    split, step_seconds = bench.profile_fast_row(batch, "fp32", device, lines.append)
    assert list(split) == ["data wait", "forward+backward", "optimizer"]
    assert all(seconds > 0 for seconds in split.values())
    # each part's span lies inside the step; between them only the loop's own few instructions
    assert 0.8 * step_seconds <= sum(split.values()) <= step_seconds * 1.001
    assert lines[0].startswith("profile of one step (fast, packed, fp32): data wait ")  # half real: pretrain packs
    assert "forward+backward" in lines[0] and "optimizer" in lines[0]


def test_serving_costs_shrink_with_each_structured_remedy_and_int8_stores_a_quarter():
    rows = {row["variant"]: row for row in bench.serving(BenchOptions(config="tiny", vocab_size=500,
                                                                      device="cpu"),
                                                         log=lambda *a: None, rows_count=8, seconds=0.05)}
    full = rows["float32 (the model as trained)"]
    for name in ("half the layers (distill's student)", "50% of feed-forward units removed",
                 "50% of attention heads removed"):
        assert rows[name]["parameters"] < full["parameters"] and rows[name]["bytes"] < full["bytes"], name
        assert rows[name]["peak_memory"] < full["peak_memory"], name
    int8 = rows["int8 weights, float32 arithmetic (quantize)"]
    assert int8["parameters"] == full["parameters"] and int8["bytes"] < 0.35 * full["bytes"]
    assert all(row["speed_1"]["median"] > 0 and row["speed_32"]["low"] <= row["speed_32"]["median"]
               for row in rows.values())
