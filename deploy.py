"""C7's commands: each writes a smaller or cheaper classifier run folder (checkpoint.pt, vocab.txt,
metrics.json) that evaluate, export and finetune --init accept. The formulas are compress.py's.

    distill(out, DistillOptions(...))   a smaller student learns the teacher's softened predictions
                                        (compress.distillation_loss, in train.fit_classifier's loop)
    quantize(out, init)                 every weight matrix as int8, one scale per row: ~4x less
                                        on disk (compress.to_int8_rows)
    prune(out, PruneOptions(...))       zero the smallest weights of every matrix, or remove whole
                                        feed-forward units or attention heads; then a short
                                        recovery fine-tune
    finetune --lora R                   (compress.LowRankUpdate, in train.fit_classifier) a task
                                        stores its head and low-rank matrices, not an encoder:
                                        with --save delta, a task file of only those
                                        (checkpoint.save_task_file)

What each buys -- parameters, bytes on disk, CPU sentences per second, accuracy -- is measured
by experiments.py's C7 table (size_on_disk and sentences_per_second below); docs/claims.md reads it.

Run `python deploy.py` to run every remedy on a small toy world (a minute or two on a CPU).
"""

import io
import os
import time
from dataclasses import replace

import numpy as np
import torch

import data
from checkpoint import (
    load_checkpoint,
    make_checkpoint,
    open_model,
    prepare_out_folder,
    save_atomic,
    save_classifier,
    write_json,
)
from common import IGNORE_INDEX, InputError
from compress import (
    Teacher,
    every_other_layer,
    from_int8_rows,
    prune_smallest_weights,
    quantized_state,
    remove_feed_forward_units,
    remove_heads,
    zero_fraction,
)
from evaluation import classifier_logits, classify
from model import Classifier, Config, count_parameters, make_config
from options import SIZE_FIELDS, DistillOptions, PruneOptions, pick_device, sizes_given
from tokenizer import Tokenizer
from train import StartingPoint, fit_classifier

# ----------------------------------------------------------------------------------------
# Distillation: a smaller student, trained on the teacher's soft predictions
# ----------------------------------------------------------------------------------------


def distill(out, options, force=False, log=print, progress=True):
    """Train a student classifier on o.train's labels AND on the teacher's predictions for the
    transfer set (the labeled texts + up to o.max_unlabeled sentences of o.unlabeled, which
    carry no label): compress.distillation_loss, in train.fit_classifier's loop. The teacher
    only predicts (its logits are computed once, in eval mode); only the student trains."""
    o = options
    o.check()
    device = pick_device(o.device)
    teacher, teacher_tokenizer, teacher_checkpoint = open_classifier(o.teacher, "--teacher", log)
    label_names, pool = teacher_checkpoint["labels"], teacher_checkpoint.get("pool", "cls")
    texts, labels = data.read_tsv(o.train)
    label_ids = data.encode_labels(labels, label_names, o.train)  # the teacher's classes
    config, tokenizer, start = student_start(teacher, teacher_tokenizer, o, len(label_names))
    unlabeled = unlabeled_sentences(o.unlabeled, o.max_unlabeled, o.seed)
    transfer = texts + unlabeled
    prepare_out_folder(out, force=force)
    source = f"{o.train} + {len(unlabeled)} unlabeled sentences"
    teacher_rows = data.classification_inputs(teacher_tokenizer, transfer,
                                              teacher.config.max_positions, log, path=source)
    teacher.to(device)
    start.teacher = Teacher(classifier_logits(teacher, teacher_rows, device,
                                              pad_id=teacher_tokenizer.pad_id),
                            o.temperature, o.alpha)
    rows = data.classification_inputs(tokenizer, transfer, config.max_positions, log, path=source)
    log(f"distilling {o.teacher} ({count_parameters(teacher):,} parameters) into a "
        f"{config.num_layers}-layer student "
        f"({count_parameters(Classifier(config, len(label_names), pool)):,}, "
        f"--student-init {o.student_init}): "
        f"{len(texts)} labeled + {len(unlabeled)} unlabeled sentences, "
        f"T = {o.temperature:g}, alpha = {o.alpha:g}")
    student, info = fit_classifier(rows, label_ids + [IGNORE_INDEX] * len(unlabeled),
                                   len(label_names), config, o.finetune_options(pool), start=start,
                                   pad_id=tokenizer.pad_id, progress=progress)
    scored_on, scored_texts, scored_labels = ((o.valid, *data.read_tsv(o.valid)) if o.valid
                                              else (o.train, texts, labels))
    scored_ids = data.encode_labels(scored_labels, label_names, scored_on)
    # the scored texts in each model's own tokens (the student's vocabulary may differ)
    student_rows = data.classification_inputs(tokenizer, scored_texts, config.max_positions, log)
    teacher_scored_rows = data.classification_inputs(teacher_tokenizer, scored_texts,
                                                     teacher.config.max_positions, log)
    metrics = {**info, "teacher": str(o.teacher), "student_init": o.student_init,
               "temperature": o.temperature, "alpha": o.alpha, "labeled": len(texts),
               "unlabeled": len(unlabeled), "scored_on": scored_on,
               "teacher_parameters": count_parameters(teacher),
               **classify(student, student_rows, scored_ids, device, pad_id=tokenizer.pad_id),
               "teacher_metrics": classify(teacher, teacher_scored_rows, scored_ids, device,
                                           pad_id=teacher_tokenizer.pad_id)}
    save_classifier(out, student, tokenizer, label_names, metrics,
                    run={"teacher": str(o.teacher), "student_init": o.student_init,
                         "temperature": o.temperature, "alpha": o.alpha, "epochs": o.epochs,
                         "lr": o.lr, "seed": o.seed})
    return metrics


def student_start(teacher, teacher_tokenizer, o, num_labels):
    """The student: (Config, tokenizer, train.StartingPoint).
      every-other  the teacher's sizes with fewer layers; its embeddings, pooler and classifier,
                   and student layer i = teacher layer i * L_teacher // L_student (DistilBERT:
                   one layer in two); the teacher's vocabulary
      scratch      a random initialisation, the teacher's vocabulary
      RUN          a smaller pre-trained encoder (a run or BERT folder): its size and vocabulary"""
    if o.student_init not in ("every-other", "scratch"):
        if o.student_config or sizes_given(o):
            raise InputError("--student-config and the size flags: not with a pre-trained "
                             "--student-init (it brings its size)")
        model, tokenizer, _ = open_model(o.student_init)
        start, config = StartingPoint(encoder_state=model.encoder.state_dict()), model.config
    else:
        config, tokenizer = student_config(teacher.config, o), teacher_tokenizer
        start = StartingPoint()
        if o.student_init == "every-other":
            start = StartingPoint(encoder_state=every_other_layer(teacher, config),
                                  head_state=teacher.classifier.state_dict())
    with torch.device("meta"):  # parameter counts only: no memory, no time
        student_size = count_parameters(Classifier(config, num_labels))
        teacher_size = count_parameters(Classifier(teacher.config, num_labels))
    if student_size >= teacher_size:
        raise InputError(f"the student ({student_size:,} parameters: {config.num_layers} layers, "
                         f"hidden {config.hidden_size}) is not smaller than its teacher "
                         f"({teacher_size:,}); choose fewer layers or smaller sizes")
    return config, tokenizer, start


def student_config(teacher_config, o):
    """--student-config (a preset; default: the teacher's sizes) refined by the size flags; without
    --num-layers, half the teacher's layers (at least one)."""
    base = teacher_config if o.student_config is None else make_config(o.student_config)
    given = sizes_given(o)
    if "num_layers" not in given and o.student_config is None:
        given["num_layers"] = max(1, teacher_config.num_layers // 2)
    # the vocabulary and position table are the teacher's: the student reads the same token ids
    try:
        config = replace(base, vocab_size=teacher_config.vocab_size,
                         max_positions=teacher_config.max_positions,
                         dropout=teacher_config.dropout,
                         attention_dropout=teacher_config.attention_dropout,
                         attention=teacher_config.attention, **given)
    except ValueError as error:
        raise InputError(f"the student's sizes: {error}") from None
    if o.student_init == "every-other":
        differing = [f for f in SIZE_FIELDS
                     if f != "num_layers" and getattr(config, f) != getattr(teacher_config, f)]
        if differing or config.num_layers > teacher_config.num_layers:
            needed = ", ".join(differing) or "sizes"
            raise InputError("--student-init every-other copies the teacher's layers: the student "
                             f"needs the teacher's {needed} and at most its "
                             f"{teacher_config.num_layers} layers (or use --student-init scratch)")
    return config


def unlabeled_sentences(corpus, limit, seed):
    """Up to `limit` sentences of a corpus (text files, or ["stdlib"]), chosen at random: the
    part of the transfer set that has no labels. None -> none."""
    if not corpus or not limit:
        return []
    sentences = [s for document in data.load_corpus(corpus)[1] for s in document]
    chosen = np.random.default_rng(seed).permutation(len(sentences))[:limit]
    return [sentences[i] for i in sorted(chosen)]


# ----------------------------------------------------------------------------------------
# Quantisation: int8 weight matrices on disk
# ----------------------------------------------------------------------------------------


def quantize(out, init, force=False, log=print):
    """Every weight matrix (linear layers and embedding tables) of a run as int8 with one float32
    scale per row (compress.to_int8_rows has the formula); biases and LayerNorms stay float32.
    Our own format rather than PyTorch's dynamic quantisation: its packed weights are deprecated
    quantized types that torch.load(weights_only=True) cannot be trusted to read, and tie the
    file to one CPU backend. Loading turns the matrices back into float32 (W ~ s_r * q_r), so
    every command reads the run as before: 4x less to store and ship, not a faster forward."""
    checkpoint = load_checkpoint(init, log)
    if checkpoint.get("stored_as") == "int8":
        raise InputError(f"{init}: already stored as int8")
    quantized, scales = quantized_state(checkpoint["model"])
    config, tokenizer = Config(**checkpoint["config"]), Tokenizer.from_checkpoint(checkpoint)
    kept = {key: checkpoint[key] for key in ("labels", "pool", "step", "run", "fresh", "source")
            if key in checkpoint}
    payload = make_checkpoint(checkpoint["kind"], quantized, config, tokenizer, int8_scales=scales,
                              quantized_from=str(init), **kept)
    float_payload = make_checkpoint(checkpoint["kind"], checkpoint["model"], config, tokenizer,
                                    **kept)
    errors = [(checkpoint["model"][name] - from_int8_rows(quantized[name], scale))
              .abs().max().item()
              for name, scale in scales.items()]
    prepare_out_folder(out, force=force)
    save_atomic(os.path.join(out, "checkpoint.pt"), payload)
    tokenizer.save(os.path.join(out, "vocab.txt"))
    metrics = {"quantized_from": str(init), "kind": checkpoint["kind"],
               "int8_matrices": len(scales),
               "bytes_float32": size_on_disk(float_payload), "bytes_int8": size_on_disk(payload),
               "max_weight_error": max(errors, default=0.0)}
    write_json(os.path.join(out, "metrics.json"), metrics)
    return metrics


# ----------------------------------------------------------------------------------------
# Pruning: remove the least important weights or units, then recover
# ----------------------------------------------------------------------------------------


def prune(out, options, force=False, log=print, progress=True):
    """o.unit "weights": zero the o.sparsity smallest-|w| of every weight matrix of the encoder's
    layers (magnitude pruning); "ffn-units" or "heads": remove that fraction of every layer's
    feed-forward units or attention heads (a smaller dense model). Then o.epochs of fine-tuning
    on o.train to recover, the pruned weights held at zero. Unstructured zeros save bytes only
    when compressed and time only with sparse kernels; removed units save both (the C7 table
    measures which)."""
    o = options
    o.check()
    device = pick_device(o.device)
    model, tokenizer, checkpoint = open_classifier(o.init, "--init", log)
    label_names, pool = checkpoint["labels"], checkpoint.get("pool", "cls")
    train_texts, train_labels = data.read_tsv(o.train) if o.train else ([], [])
    train_ids = data.encode_labels(train_labels, label_names, o.train)
    scored_on, texts, labels = ((o.valid, *data.read_tsv(o.valid)) if o.valid
                                else (o.train, train_texts, train_labels))
    scored_ids = data.encode_labels(labels, label_names, scored_on) if scored_on else []
    prepare_out_folder(out, force=force)

    def score(classifier):
        rows = data.classification_inputs(tokenizer, texts, classifier.config.max_positions, log)
        return (classify(classifier, rows, scored_ids, device, pad_id=tokenizer.pad_id)
                if scored_on else {})

    before = score(model.to(device))
    remove = {"weights": prune_smallest_weights, "ffn-units": remove_feed_forward_units,
              "heads": remove_heads}[o.unit]
    model = remove(model, o.sparsity)
    metrics = {"pruned_from": str(o.init), "unit": o.unit, "sparsity": o.sparsity,
               "before_pruning": before, "after_pruning": score(model.to(device)),
               "scored_on": scored_on, "steps": 0}
    if o.epochs:
        start = StartingPoint(encoder_state=model.encoder.state_dict(),
                              head_state=model.classifier.state_dict(),
                              pruned=o.unit == "weights")
        rows = data.classification_inputs(tokenizer, train_texts, model.config.max_positions, log,
                                          path=o.train)
        log(f"recovery fine-tuning: {len(rows)} examples, {o.epochs} epochs, lr {o.lr:g}")
        model, info = fit_classifier(rows, train_ids, len(label_names), model.config,
                                     o.finetune_options(pool), start=start,
                                     pad_id=tokenizer.pad_id, progress=progress)
        metrics.update(info)
    metrics.update(score(model), parameters=count_parameters(model),
                   zero_fraction=zero_fraction(model))
    save_classifier(out, model, tokenizer, label_names, metrics,
                    run={"pruned_from": str(o.init), "unit": o.unit, "sparsity": o.sparsity,
                         "epochs": o.epochs, "lr": o.lr, "seed": o.seed})
    return metrics


# ----------------------------------------------------------------------------------------
# Shared: open a classifier, and measure size and speed
# ----------------------------------------------------------------------------------------


def open_classifier(path, flag, log=print):
    """open_model, refusing anything but a fine-tuned classifier (what distill and prune start
    from)."""
    model, tokenizer, checkpoint = open_model(path, log)
    if checkpoint.get("kind") != "classifier":
        raise InputError(f"{flag} {path}: a {checkpoint.get('kind')} checkpoint; expected a "
                         "fine-tuned classifier (ptft.py finetune writes one)")
    return model, tokenizer, checkpoint


def size_on_disk(payload):
    """The bytes of checkpoint.pt holding `payload` (torch.save's format, weights and
    vocabulary)."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.tell()


@torch.inference_mode()
def sentences_per_second(model, rows, batch_size, pad_id=0, seconds=2.0, repeats=5):
    """CPU inference speed: forward passes over `rows` in batches (padded to each batch's
    longest), after one warm-up batch, timed `repeats` times for about seconds / repeats each.
    Returns {"median", "low", "high"} sentences / second over the repeats: one timing moves
    with whatever else the machine does; the median and the range say how much."""
    model.eval()
    batches = [data.pad(rows[first:first + batch_size], pad_id)
               for first in range(0, len(rows), batch_size)]
    batches = [(torch.from_numpy(ids), torch.from_numpy(mask)) for ids, mask in batches]
    model(batches[0][0], None, batches[0][1])  # warm-up
    rates = []
    for _ in range(repeats):
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / repeats:
            for ids, mask in batches:
                model(ids, None, mask)
                done += len(ids)
        rates.append(done / (time.perf_counter() - started))
    return {"median": float(np.median(rates)), "low": min(rates), "high": max(rates)}


def tensor_bytes(model):
    """The bytes of a model's tensors as they sit in memory: parameters and buffers, and an int8
    layer's packed weights (PyTorch's dynamic quantisation keeps them outside nn.Parameter)."""
    def size(value):
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        return sum(size(item) for item in value) if isinstance(value, (tuple, list)) else 0
    return sum(size(value) for value in model.state_dict().values())


@torch.inference_mode()
def peak_memory(model, rows, batch_size=32, pad_id=0):
    """Peak memory of serving one batch of `rows` (padded to its longest): the model's tensors
    (tensor_bytes; an int8 run read back for float32 arithmetic is float32 here) plus the most
    bytes the forward pass holds at once. On the CPU the second is read from PyTorch's profiler,
    which reports the allocator's running total at each allocation and free made while it
    records; on a GPU it is torch.cuda.max_memory_allocated over the pass. Returns
    {"model_bytes", "activation_bytes", "peak_bytes"}; the same model and batch give the same
    numbers every time (no timing is involved)."""
    model.eval()
    device = next(model.parameters()).device
    ids, mask = (torch.from_numpy(array).to(device) for array in data.pad(rows[:batch_size],
                                                                          pad_id))
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        model(ids, None, mask)
        activations = torch.cuda.max_memory_allocated() - before
    else:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as recorded:
            model(ids, None, mask)
        events = all_events(recorded.profiler.kineto_results.experimental_event_tree())
        allocations = [event.extra_fields for event in sorted(
            (event for event in events if event.tag == _EventType.Allocation),
            key=lambda event: event.start_time_ns)]
        if not allocations:
            activations = 0
        else:  # the running total before the first allocation of the pass is the baseline
            baseline = allocations[0].total_allocated - allocations[0].alloc_size
            activations = max(fields.total_allocated for fields in allocations) - baseline
    model_bytes = tensor_bytes(model)
    return {"model_bytes": model_bytes, "activation_bytes": int(activations),
            "peak_bytes": model_bytes + int(activations)}


def all_events(events):
    """Every event of the profiler's event tree, children included."""
    for event in events:
        yield event
        yield from all_events(event.children)


if __name__ == "__main__":
    # `python deploy.py`: every C7 remedy on a small toy world -- a teacher fine-tuned from a short
    # pre-training, then distilled, quantised and pruned; each one's accuracy and size.
    import tempfile

    import evaluation
    import finetuning
    import toyworld
    import train
    from options import FinetuneOptions, PretrainOptions

    with tempfile.TemporaryDirectory() as folder:
        paths = data.write_world(folder, toyworld.toy_world(seed=0, num_documents=3000))
        quiet = lambda *args: None  # noqa: E731
        pre = os.path.join(folder, "pre")
        train.pretrain(pre, PretrainOptions(corpus=[paths["unlabeled.txt"]], steps=400,
                                            vocab_size=1024, device="cpu"),
                       log=quiet, progress=False)
        teacher = os.path.join(folder, "teacher")
        finetuning.finetune(teacher, FinetuneOptions(init=pre, train=paths["train.tsv"],
                                                     valid=paths["test.tsv"], epochs=10,
                                                     device="cpu"),
                            log=quiet, progress=False)
        runs = {
            "distilled (1 layer)": lambda out: distill(
                out, DistillOptions(teacher=teacher, train=paths["train.tsv"],
                                    valid=paths["test.tsv"], unlabeled=[paths["unlabeled.txt"]],
                                    device="cpu"),
                log=quiet, progress=False),
            "int8": lambda out: quantize(out, teacher, log=quiet),
            "50% of weights pruned": lambda out: prune(
                out, PruneOptions(init=teacher, train=paths["train.tsv"], valid=paths["test.tsv"],
                                  device="cpu"),
                log=quiet, progress=False),
        }
        teacher_accuracy = evaluation.evaluate(teacher, paths["test.tsv"], "cpu", quiet)["accuracy"]
        print(f"teacher: test accuracy {teacher_accuracy:.3f}, "
              f"{os.path.getsize(os.path.join(teacher, 'checkpoint.pt')):,} bytes")
        for name, run in runs.items():
            out = os.path.join(folder, name.split()[0])
            run(out)
            accuracy = evaluation.evaluate(out, paths["test.tsv"], "cpu", quiet)["accuracy"]
            print(f"{name}: test accuracy {accuracy:.3f}, "
                  f"{os.path.getsize(os.path.join(out, 'checkpoint.pt')):,} bytes")
