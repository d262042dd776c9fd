"""Benchmark: tokens/s and MFU of an MLM training step and of an inference forward, ptft's
reading path and fast path, and (optionally) transformers' BertForMaskedLM on the same batch.

    python ptft.py bench --config small --compare-hf      (or: python bench.py, a quick tiny run)

MFU = model FLOPs of the step / its time / the matmul peak measured here (training_flops says
which FLOPs count). Measured numbers, with their machines, are in docs/performance.md.
"""

import gc
import os
import platform
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

import data
import fast
import options
import schedule
from checkpoint import write_json
from common import IGNORE_INDEX, InputError
from evaluation import to_tensors
from model import PreTrainingModel, mlm_loss
from tokenizer import SPECIAL_TOKENS, Tokenizer


def matmul_peak(device, dtype, size=None, repeats=5):
    """The device's practical matmul peak in FLOP/s: the median of a few size^3 matmuls, at a size
    that saturates it (8192 on a GPU, where 2048 leaves it half idle; 2048 on a CPU)."""
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = []
    for _ in range(repeats + 1):
        synchronize(device)
        started = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - started)
    return 2 * size ** 3 / float(np.median(times[1:]))


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def training_flops(config, lengths, num_predicted):
    """Model FLOPs of one training step (forward + backward = 3x forward, 2 FLOPs per multiply-add):
    6 x (weights of the layers) x tokens + attention's two T x T products + the MLM head and
    vocabulary projection at the positions actually computed. lengths: each sequence's real
    tokens -- computing on padding is not counted as work done."""
    hidden, layers = config.hidden_size, config.num_layers
    layer_weights = layers * (4 * hidden * hidden + 2 * hidden * config.intermediate_size)
    tokens = int(np.sum(lengths))
    attention = layers * 2 * 2 * int(np.sum(np.square(lengths))) * hidden
    head = (hidden * hidden + hidden * config.vocab_size) * num_predicted
    return 3 * (2 * layer_weights * tokens + attention + 2 * head)


def median_seconds(function, steps, device):
    times = []
    for _ in range(steps):
        synchronize(device)
        started = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def time_step_and_forward(step, forward, steps, device):
    """(median seconds of a training step, of an inference forward, peak GPU memory of training in
    bytes -- weights, gradients, optimizer state and activations; None on a CPU), after 3 warm-up
    steps."""
    if device.type == "cuda":
        # the previous rows' models (compiled ones hold reference cycles) are gone before counting
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(3):  # warm-up: allocator, kernels, autotuning
        step()
    training = median_seconds(step, steps, device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    with torch.no_grad():
        return training, median_seconds(forward, steps, device), peak


def time_ptft(model_config, batch, precision, attention, compiled, steps, device, speed=None):
    """One ptft row: seconds per training step and per inference forward on `batch`; speed: None
    (the reading path) or the fast.Speed pretrain would use for it; compiled: pretrain's --compile
    (off, model, step: the optimizer's update too, graphs: step as CUDA graphs on a GPU)."""
    torch.manual_seed(0)
    model = PreTrainingModel(replace(model_config, attention=attention)).to(device).train()
    optimizer = schedule.make_optimizer(model, 1e-4)
    training_model = fast.compiled_model(model, compiled)
    encoder = model.encoder if compiled == "off" else torch.compile(model.encoder)
    update = fast.Update(optimizer, torch.amp.GradScaler(device.type, enabled=False), compiled)

    def step():
        with options.autocast(device, precision):
            scores, targets, _ = training_model(batch["input_ids"], batch["segment_ids"],
                                                batch["attention_mask"], batch["mlm_labels"],
                                                with_nsp=False, speed=speed)
            loss = mlm_loss(scores, targets)  # E4
        loss.backward()
        update()
        optimizer.zero_grad(set_to_none=True)

    def forward():
        with options.autocast(device, precision):
            if speed is None or speed.unpadded is None:
                sequence_output = encoder(batch["input_ids"], batch["segment_ids"],
                                          batch["attention_mask"])[0]
            else:
                sequence_output = fast.encode_unpadded(
                    model.encoder, batch["input_ids"], batch["segment_ids"],
                    batch["attention_mask"], speed.unpadded, speed.packed)[0]
            model.mlm_scores(sequence_output, batch["mlm_labels"])

    return time_step_and_forward(step, forward, steps, device)


def time_transformers(model_config, batch, precision, compiled, steps, device):
    """transformers' BertForMaskedLM (SDPA attention) on the same batch, in the same precision
    (autocast), with the same optimizer (fused AdamW), compiled when the ptft row it is compared
    with is."""
    try:
        import transformers
    except ImportError:
        raise InputError("--compare-hf needs `transformers` (pip install transformers)") from None
    hf_config = transformers.BertConfig(
        vocab_size=model_config.vocab_size, hidden_size=model_config.hidden_size,
        num_hidden_layers=model_config.num_layers, num_attention_heads=model_config.num_heads,
        intermediate_size=model_config.intermediate_size,
        max_position_embeddings=model_config.max_positions, attn_implementation="sdpa")
    torch.manual_seed(0)
    hf_model = transformers.BertForMaskedLM(hf_config).to(device).train()
    optimizer = schedule.make_optimizer(hf_model, 1e-4)
    run = torch.compile(hf_model) if compiled else hf_model
    # no padding on a GPU: no mask at all, as ptft's fast rows do (SDPA may pick FlashAttention)
    no_padding_on_gpu = device.type == "cuda" and bool(batch["attention_mask"].all())
    attention_mask = None if no_padding_on_gpu else batch["attention_mask"].long()

    def step():
        with options.autocast(device, precision):
            loss = run(input_ids=batch["input_ids"], attention_mask=attention_mask,
                       labels=batch["mlm_labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def forward():
        with options.autocast(device, precision):
            run(input_ids=batch["input_ids"], attention_mask=attention_mask)

    return time_step_and_forward(step, forward, steps, device)


def profile_fast_row(batch, precision, device, log):
    """--profile: one step of pretrain's fast row, after two warm-up steps, split by the PyTorch
    profiler (fast.profile_step) into data wait -- here the batch's arrays to the device and their
    fast.Speed, what pretrain's loop does each step once a batch is built (building it is
    pretrain's data_wait_fraction) --, forward+backward, and optimizer (fused AdamW, zero_grad).
    Logs the split and the operators that took longest; returns (split, step seconds)."""
    torch.manual_seed(0)
    model = PreTrainingModel(replace(batch.model_config, attention="sdpa")).to(device).train()
    optimizer = schedule.make_optimizer(model, 1e-4)
    arrays = batch.layouts[batch.pretrain_packs]
    max_predictions = data.MaskingRule().max_predictions(batch.length)
    loaded = {}

    def load():
        loaded["speed"] = fast.speed_for(arrays, device, max_predictions)
        loaded["batch"] = to_tensors(arrays, device)

    def forward_backward():
        b = loaded["batch"]
        with options.autocast(device, precision):
            scores, targets, _ = model(b["input_ids"], b["segment_ids"], b["attention_mask"],
                                       b["mlm_labels"], with_nsp=False, speed=loaded["speed"])
            loss = mlm_loss(scores, targets)  # E4
        loss.backward()

    def update():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    parts = [("data wait", load), ("forward+backward", forward_backward), ("optimizer", update)]
    for _ in range(2):  # warm-up: allocator, kernels
        for _, function in parts:
            function()
    split, step_seconds, profiler = fast.profile_step(parts, device)
    log(f"profile of one step ({'fast, packed' if batch.pretrain_packs else 'fast'}, "
        f"{precision}): " + ", ".join(f"{name} {1000 * seconds:.1f} ms "
                                     f"({seconds / step_seconds:.0%})"
                                     for name, seconds in split.items())
        + f"; the step {1000 * step_seconds:.1f} ms")
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    log(profiler.key_averages().table(sort_by=sort_by, row_limit=12))
    return split, step_seconds


def real_lengths(generator, batch_size, length, real_fraction):
    """Each sequence's real tokens: all `length` at real_fraction 1; otherwise uniform draws around
    real_fraction x length, as short documents leave real text's batches (at least 3: [CLS], one
    token, [SEP]), then nudged one token at a time until the batch's share is real_fraction exactly
    (to the token)."""
    if real_fraction >= 1:
        return np.full(batch_size, length)
    mean = max(3, real_fraction * length)
    low, high = (2 * mean - length, length) if real_fraction >= 0.5 else (3, 2 * mean - 3)
    lengths = np.clip(np.round(generator.uniform(low, high, batch_size)), 3, length).astype(int)
    target = max(3 * batch_size, round(real_fraction * batch_size * length))
    while lengths.sum() != target:
        step = 1 if lengths.sum() < target else -1
        movable = np.flatnonzero(lengths < length if step > 0 else lengths > 3)
        chosen = generator.permutation(movable)[:abs(target - lengths.sum())]
        lengths[chosen] += step
    return lengths


def data_path_speed(generator, batch_size, length, vocab_size=8192):
    """Tokens/s of the data path that feeds the step (B2 sentence pairs + B1 80/10/10 masking,
    numpy, one core) on random documents of 8-40 token sentences."""
    words = [f"w{i}" for i in range(vocab_size - len(SPECIAL_TOKENS))]
    tokenizer = Tokenizer(SPECIAL_TOKENS + words)
    documents = [[generator.integers(5, vocab_size, size) for size in generator.integers(8, 40, 12)]
                 for _ in range(2000)]
    started, produced = time.perf_counter(), 0
    for _ in range(20):
        batch = data.pretraining_batch(documents, tokenizer, generator, batch_size, length)
        produced += int(batch["attention_mask"].sum())
    return produced / (time.perf_counter() - started)


def bench(o, log=print):
    """Time the MLM training step and an inference forward at BERT-like shapes (seq 128, 15%
    masked, dropout 0.1; o: options.BenchOptions). Returns the rows (and writes them as JSON)."""
    o.check()
    device = options.pick_device(o.device)
    generator = np.random.default_rng(0)
    batch = bench_batch(o, device, generator)
    precisions = fast_row_precisions(o.precision, device)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peaks = {p: o.peaks().get(p) or matmul_peak(device, dtypes[p])
             for p in dict.fromkeys(["fp32"] + precisions)}
    config = batch.model_config
    log(f"{o.config}: {config.num_layers} layers, hidden {config.hidden_size}, "
        f"vocab {config.vocab_size}, seq {batch.length}, batch {batch.batch_size}, "
        f"{batch.tokens / batch.lengths.size / batch.length:.0%} real tokens, "
        f"{batch.num_masked} masked; device {device_name(device)}; matmul peak "
        + ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" + (" (given)" if k in o.peaks() else "")
                    for k, v in peaks.items()))
    rows = []
    for variant in bench_variants(batch, precisions, o.compile):
        rows += time_variant(o, batch, variant, peaks, device)
    print_table(rows, log)
    if o.profile:
        profile_fast_row(batch, precisions[-1], device, log)
    # it must be far faster than any row above
    data_speed = data_path_speed(generator, batch.batch_size, batch.length,
                                 config.vocab_size)
    fastest = max(r["train_tokens_per_s"] for r in rows)
    log(f"data path (sentence pairs + masking): {data_speed:,.0f} tokens/s = "
        f"{data_speed / fastest:.0f}x the fastest training step above")
    if o.json:
        write_json(o.json, rows)
    return rows


@dataclass
class BenchBatch:
    """The one batch every row times, in the layouts the rows use:
    model_config        the --config preset at the bench's vocabulary and length
    lengths             each sequence's real tokens (B,); tokens: their sum, counted as work
    num_masked          the MLM targets (B1's 15%)
    layouts             {packed?: the numpy arrays}: False, one pair per row; True (only with
                        padding), pack_pairs'
    batches, speeds     {packed?: tensors on the device}, {packed?: fast.Speed as pretrain would
                        give it}
    pretrain_packs      whether pretrain's --packing auto would pack this batch here"""
    model_config: object
    batch_size: int
    length: int
    lengths: np.ndarray
    tokens: int
    num_masked: int
    padded: bool
    layouts: dict
    batches: dict
    speeds: dict
    pretrain_packs: bool


def bench_batch(o, device, generator):
    """The bench's batch: --real-fraction's share of real tokens ([CLS] w ... w [SEP], padding
    after), 15% of them selected and masked 80/10/10 by data.mask_tokens itself (B1)."""
    batch_size, vocab_size, length = o.batch_size_on(device), o.vocab_size_of(), 128
    model_config = options.model_config(options.PretrainOptions(config=o.config),
                                        vocab_size=vocab_size, max_positions=length)
    # all `length` unless --real-fraction
    lengths = real_lengths(generator, batch_size, length, o.real_fraction)
    real = np.arange(length)[None, :] < lengths[:, None]                     # (B, T)
    words = [f"w{i}" for i in range(vocab_size - len(SPECIAL_TOKENS))]
    tokenizer = Tokenizer(SPECIAL_TOKENS + words)
    ids = np.where(real, generator.integers(len(SPECIAL_TOKENS), vocab_size, (batch_size, length)),
                   tokenizer.pad_id)
    ids[:, 0], ids[np.arange(batch_size), lengths - 1] = tokenizer.cls_id, tokenizer.sep_id
    masked_ids, mlm_labels = data.mask_tokens(ids, tokenizer, generator)
    padded = not real.all()
    arrays = {"input_ids": masked_ids, "segment_ids": np.zeros_like(ids), "attention_mask": real,
              "mlm_labels": mlm_labels}
    # the fast rows use what pretrain would for this batch on this device (fast.speed_for): the
    # real tokens only where there is padding, a fixed number of predictions on a GPU, and the
    # pairs packed several per row where --packing auto would (fast.packing_pays); with padding,
    # a row "fast, packed" or "fast, not packed" shows the other choice
    max_predictions = data.MaskingRule().max_predictions(length)
    packed_arrays = fast.pack_pairs(arrays, length, tokenizer.pad_id) if padded else None
    layouts = {False: arrays, True: packed_arrays}
    speeds = {pack: fast.speed_for(layout, device, max_predictions)
              for pack, layout in layouts.items() if layout is not None}
    batches = {pack: {key: torch.from_numpy(value).to(device) for key, value in layout.items()}
               for pack, layout in layouts.items() if layout is not None}
    return BenchBatch(
        model_config=model_config, batch_size=batch_size, length=length, lengths=lengths,
        tokens=int(lengths.sum()),  # tokens/s counts real tokens
        num_masked=int((mlm_labels != IGNORE_INDEX).sum()), padded=padded,
        layouts={pack: layout for pack, layout in layouts.items() if layout is not None},
        batches=batches,
        speeds=speeds,  # as --packing auto would:
        pretrain_packs=padded and fast.packing_pays(arrays, length))


def fast_row_precisions(precision, device):
    """The fast rows' precisions (--precision); the reading path's row is always fp32."""
    auto_bf16 = options.pick_precision("auto", device) == "bf16"
    return {"auto": ["fp32"] + (["bf16"] if auto_bf16 else []),
            "fp32": ["fp32"], "bf16": ["bf16"]}[precision]


def bench_variants(batch, precisions, compiled):
    """The rows to time, (name, precision, attention, --compile's off/model/step/graphs, speed
    devices, batch): the reading path first, then the fast rows as pretrain would run them; with
    padding, the fast rows once more with the other packing choice and once computing on the
    padding, to show what packing and fast.Unpadded buy; with --compile, pretrain's fast rows
    compiled: the model, the whole step (the update too), and on a GPU the step replayed as CUDA
    graphs."""
    speed, tensors = batch.speeds[batch.pretrain_packs], batch.batches[batch.pretrain_packs]
    computing_padding = replace(batch.speeds[False], unpadded=None)
    fast_name = "fast, packed (as pretrain)" if batch.pretrain_packs else "fast"
    variants = [("reading path", "fp32", "explicit", "off", None, batch.batches[False])]
    variants += [(fast_name, p, "sdpa", "off", speed, tensors) for p in precisions]
    if batch.padded:
        other = "fast, not packed" if batch.pretrain_packs else "fast, packed"
        other_speed = batch.speeds[not batch.pretrain_packs]
        other_tensors = batch.batches[not batch.pretrain_packs]
        variants += [(other, p, "sdpa", "off", other_speed, other_tensors) for p in precisions]
        variants += [("fast, padding computed", p, "sdpa", "off", computing_padding,
                      batch.batches[False]) for p in precisions]
    if compiled:  # pretrain's --compile model, step and (on a GPU) graphs
        modes = [("", "model"), (", whole step", "step")] + (
            [(", CUDA graphs", "graphs")] if tensors["input_ids"].is_cuda else [])
        variants += [(fast_name + suffix, p, "sdpa", how, speed, tensors)
                     for suffix, how in modes for p in precisions]
    return variants


def time_variant(o, batch, variant, peaks, device):
    """One variant's row, and (--compare-hf, for pretrain's own fast rows) transformers' row in
    the same precision, compiled alike."""
    name, precision, attention, how, speed, tensors = variant
    config, compiled = batch.model_config, how != "off"
    train_seconds, infer_seconds, peak = time_ptft(
        config, tensors, precision, attention, compiled=how, steps=o.steps, device=device,
        speed=speed)
    fixed = speed is not None and speed.max_predictions
    prediction = f"fixed {fixed} per sequence" if fixed else "sparse"
    row = {"impl": "ptft", "variant": f"{name} ({attention} attention, {prediction} MLM)",
           "precision": precision, "compiled": compiled, "config": o.config,
           "device": device_name(device), "batch_size": batch.batch_size,
           "train_tokens_per_s": batch.tokens / train_seconds,
           "infer_tokens_per_s": batch.tokens / infer_seconds,
           "mfu": training_flops(config, batch.lengths, batch.num_masked) / train_seconds
           / peaks[precision],
           "peak_memory_gb": peak and peak / 2 ** 30}
    # transformers once per precision and compilation: beside the eager and the model-compiled row
    if not (o.compare_hf and speed is batch.speeds[batch.pretrain_packs]
            and how in ("off", "model")):
        return [row]
    train_seconds, infer_seconds, peak = time_transformers(
        config, batch.batches[False], precision, compiled=compiled, steps=o.steps, device=device)
    hf_flops = training_flops(config, batch.lengths, batch.tokens)
    return [row, {**row, "impl": "hf", "variant": "BertForMaskedLM (sdpa)",
                  "train_tokens_per_s": batch.tokens / train_seconds,
                  "infer_tokens_per_s": batch.tokens / infer_seconds,
                  "peak_memory_gb": peak and peak / 2 ** 30,
                  "mfu": hf_flops / train_seconds / peaks[precision]}]


def device_name(device):
    """The GPU's name, or the CPU's model, instruction set as torch uses it, and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type != "cpu":
        return device.type
    model = platform.processor() or "cpu"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), model)
    return (f"cpu: {model}, {torch.backends.cpu.get_cpu_capability()}, "
            f"{torch.get_num_threads()} threads")


def print_table(rows, log):
    """Markdown; "vs hf" compares each ptft row with transformers in the same precision and
    compilation: its speed, and (on a GPU) its peak training memory."""
    reference = {(r["precision"], r["compiled"]): r for r in rows if r["impl"] == "hf"}
    log("| impl | variant | precision | compiled | train tokens/s | inference tokens/s | MFU "
        "| peak memory |" + (" vs hf: speed | memory |" if reference else ""))
    log("|---|---|---|---|---|---|---|---|" + ("---|---|" if reference else ""))
    for r in rows:
        hf = reference.get((r["precision"], r["compiled"]))
        memory = f"{r['peak_memory_gb']:.1f} GB" if r["peak_memory_gb"] else "—"
        versus = ""
        if reference:
            speed = f"{r['train_tokens_per_s'] / hf['train_tokens_per_s']:.2f}x" if hf else "—"
            versus = f" {speed} | " + (f"{r['peak_memory_gb'] / hf['peak_memory_gb']:.2f}x |"
                                       if hf and r["peak_memory_gb"] else "— |")
        log(f"| {r['impl']} | {r['variant']} | {r['precision']} | "
            f"{'yes' if r['compiled'] else 'no'} | "
            f"{r['train_tokens_per_s']:,.0f} | {r['infer_tokens_per_s']:,.0f} | "
            f"{100 * r['mfu']:.0f}% | {memory} |" + versus)

# ----------------------------------------------------------------------------------------
# C7 at a size the C7 table cannot train on a CPU: what each remedy buys in serving (--serving)
# ----------------------------------------------------------------------------------------


def serving(o, log=print, rows_count=64, seconds=1.0):
    """C7's serving costs at --config's size (bench --serving): a classifier with random weights
    -- speed, memory and bytes do not depend on what was learned; accuracy does, and only
    experiments' C7 table measures it -- and each remedy made from it: int8 (bytes of quantize's
    file; on the CPU also computed in int8), half the layers, 50% of the feed-forward units, 50%
    of the heads. rows_count random sentences of 8 to 128 tokens. Per row: parameters, bytes on
    disk (torch.save), sentences/s at batch 1 and 32 (the median of 5 repeats, about `seconds`
    in all, and their range), and the peak memory of serving a batch of 32 (deploy.peak_memory).
    Returns the rows."""
    import compress
    import deploy
    from model import Classifier, make_config

    o.check()
    device = options.pick_device(o.device)
    torch.manual_seed(0)
    vocab_size = o.vocab_size or (30522 if o.config == "base" else 8192)
    config = make_config(o.config, vocab_size=vocab_size, max_positions=128, dropout=0.0,
                         attention_dropout=0.0)
    teacher = Classifier(config, 2).eval()
    generator = np.random.default_rng(0)
    sentences = [generator.integers(5, vocab_size, generator.integers(8, 129)).tolist()
                 for _ in range(rows_count)]
    variants = {"float32 (the model as trained)": teacher,
                "int8 weights, float32 arithmetic (quantize)": teacher,
                "half the layers (distill's student)": Classifier(
                    replace(config, num_layers=max(1, config.num_layers // 2)), 2).eval(),
                "50% of feed-forward units removed": compress.remove_feed_forward_units(teacher,
                                                                                         0.5),
                "50% of attention heads removed": compress.remove_heads(teacher, 0.5)}
    if device.type == "cpu":
        variants["int8 weights, int8 arithmetic (CPU)"] = compress.with_int8_arithmetic(teacher)
    log(f"{o.config}, vocab {vocab_size}: {rows_count} random sentences of 8-128 tokens, "
        f"random weights; device {device_name(device)}")
    log("| variant | parameters | bytes on disk | sentences/s, batch 1 (range %) | "
        "sentences/s, batch 32 (range %) | peak memory, batch 32 |")
    log("|---|---|---|---|---|---|")
    results = []
    for name, model in variants.items():
        if model is None:
            continue  # this torch has no int8 kernels
        model = model.to(device)
        int8 = name.startswith("int8")  # stored as quantize stores the float32 teacher
        stored = teacher if int8 else model
        state = stored.state_dict()
        row = {"variant": name, "parameters": sum(p.numel() for p in stored.parameters()),
               "bytes": deploy.size_on_disk(compress.quantized_state(state) if int8 else state),
               "peak_memory": deploy.peak_memory(model, sentences, 32)["peak_bytes"]}
        cells = []
        for size in (1, 32):  # each of the 5 repeats runs every sentence at least once
            row[f"speed_{size}"] = speed = deploy.sentences_per_second(model, sentences, size,
                                                                       seconds=seconds)
            cells.append(f"{speed['median']:,.1f} "
                         f"({100 * (speed['high'] - speed['low']) / speed['median']:.0f}%)")
        results.append(row)
        log(f"| {name} | {row['parameters']:,} | {row['bytes'] / 1e6:,.1f} MB | "
            f"{cells[0]} | {cells[1]} | {row['peak_memory'] / 1e6:,.0f} MB |")
    if o.json:
        write_json(o.json, results)
    return results


if __name__ == "__main__":
    # `python bench.py`: the tiny config, a few steps -- a check that every row runs (numbers noisy)
    try:
        bench(options.BenchOptions(config="tiny", steps=3, compare_hf=True))
    except InputError as error:
        sys.exit(f"error: {error}")
