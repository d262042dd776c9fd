"""Fine-tuning on a labeled file: the finetune command (E3 on D, B4's frozen layers, C5's remedies).

    finetune(out, FinetuneOptions(...))   a TSV of text<TAB>label lines -> a classifier run folder
    starting_point(...)                   theta_0, and the unlabeled text that measures forgetting
    adapt_to_task(...)                    task-adaptive pre-training: MLM on the task's own texts

The loop itself is train.fit_classifier, on data in memory; this file reads the files, chooses
where fine-tuning starts, and writes the run folder.

Run `python finetuning.py` to pre-train briefly on a small toy world, then fine-tune everything.
"""

import dataclasses
import json
import os
from dataclasses import replace

import torch

import data
import toyworld
from checkpoint import (
    TASK_FILE,
    has_mlm_head,
    open_model,
    prepare_out_folder,
    save_classifier,
    save_task_file,
    with_task_applied,
    write_json,
)
from common import InputError
from evaluation import classify
from options import (
    FinetuneOptions,
    PretrainOptions,
    model_config,
    pick_device,
    trainable_layers,
)
from parallel import finish, on_rank_0, processes_from_environment, refuse_differences
from tokenizer import train_tokenizer
from train import StartingPoint, fit_classifier, pretrain


def finetune(out, options, force=False, log=print, progress=True):
    """Fine-tune a classifier on options.train (TSV) from options.init (a pre-training run, a
    Hugging Face BERT folder) or 'scratch'. Writes OUT/vocab.txt, OUT/metrics.json -- metrics on
    options.valid (or on the training set without it) and, when the init has an MLM head,
    forgetting (C5) -- and OUT/checkpoint.pt, or with --save delta OUT/task.safetensors (C7:
    only what trained, read on top of the init: save_fine_tuned)."""
    o = options
    o.check()
    device = pick_device(o.device)
    # under torchrun: rank 0 writes the run folder
    processes = processes_from_environment(device, o.collective_timeout)
    log = processes.log(log)
    if processes.world_size > 1 and o.adapt_steps:
        raise InputError("--adapt-steps under torchrun: run the task-adaptive step as one process")
    train_texts, train_label_names, label_names, valid_texts, valid_ids = read_labeled(o)
    if o.init == "scratch":
        tokenizer = train_tokenizer(train_texts, o.vocab_size)
        config = model_config(o, vocab_size=len(tokenizer), max_positions=o.max_length)
    else:
        model, tokenizer, checkpoint = open_model(o.init)
        config = model.config
    trainable_layers(o.freeze, config.num_layers)  # a too-deep top-K, refused before any work
    start = (StartingPoint() if o.init == "scratch"
             else starting_point(o.init, checkpoint, model, tokenizer, o, log))
    if o.adapt_steps and not has_mlm_head(checkpoint):
        raise InputError("--adapt-steps continues MLM, which needs a pre-trained MLM head; "
                         f"{o.init} has none")
    on_rank_0(processes, lambda: prepare_out_folder(out, resume=False, force=force))
    base = None if o.init == "scratch" else checkpoint  # what a task file is read on top of
    if o.adapt_steps:
        base = adapted_start(start, os.path.join(out, "adapted"), train_texts, o, config, log)
    train_rows = data.classification_inputs(tokenizer, train_texts, config.max_positions, log,
                                            path=o.train)
    valid_rows = data.classification_inputs(tokenizer, valid_texts, config.max_positions, log,
                                            path=o.valid)
    train_ids = data.encode_labels(train_label_names, label_names, o.train)
    # under torchrun every process fine-tunes the same model on the same rows, or all refuse
    rows = [list(map(int, row)) for row in train_rows] + [train_ids]
    refuse_differences({**dataclasses.asdict(o),
                        "vocabulary": data.fingerprint([json.dumps(tokenizer.vocab).encode()]),
                        "training rows": data.fingerprint([json.dumps(rows).encode()])}, processes)
    log(f"fine-tuning from {o.init} with --freeze {o.freeze}: {len(train_rows)} examples, "
        f"{len(label_names)} classes, {o.epochs} epochs, lr {o.peak_lr():g}, device {device}")
    model, info = fit_classifier(train_rows, train_ids, len(label_names), config, o, start=start,
                                 pad_id=tokenizer.pad_id, progress=progress)
    metrics = {**info, "init": o.init, "freeze": o.freeze, "lr": o.peak_lr(), "epochs": o.epochs,
               "labels": label_names, "schedule": o.schedule,
               "warmup_fraction": o.warmup_fraction, **vars(o.remedies), "lora": o.lora,
               "lora_alpha": o.lora_alpha, "lora_targets": o.lora_targets,
               "adapt_steps": o.adapt_steps,
               "scored_on": o.valid or f"{o.train} (training set: no --valid given)"}
    scored = (valid_rows, valid_ids) if o.valid else (train_rows, train_ids)
    metrics.update(classify(model, *scored, device, pad_id=tokenizer.pad_id))
    if processes.main:
        save_fine_tuned(out, (model, tokenizer, label_names), metrics, o, base, log)
    finish(processes)
    return metrics


def read_labeled(o):
    """The labeled files: (training texts, their label names, the sorted classes, validation
    texts, their class ids); a training file with one class is refused."""
    train_texts, train_label_names = data.read_tsv(o.train)
    label_names = sorted(set(train_label_names))
    if len(label_names) < 2:
        raise InputError(f"{o.train}: only one class ({label_names[0]!r}); "
                         "a classifier needs at least two")
    valid_texts, valid_labels = data.read_tsv(o.valid) if o.valid else ([], [])
    valid_ids = data.encode_labels(valid_labels, label_names, o.valid) if o.valid else []
    return train_texts, train_label_names, label_names, valid_texts, valid_ids


def save_fine_tuned(out, classifier, metrics, o, base, log=print):
    """The run folder: vocab.txt, metrics.json and the weights -- checkpoint.pt (--save full), or
    (--save delta, C7) task.safetensors: only the tensors that trained (trained_tensors), with
    the base's fingerprint. A task file is written only once base + it gives this model's every
    weight bit for bit (checkpoint.with_task_applied, the loader's own merge); metrics.json
    records which file holds the weights and its size in bytes (saved_as, saved_bytes)."""
    model, tokenizer, label_names = classifier
    run = {"init": str(o.init), "freeze": o.freeze, "lr": o.peak_lr(), "epochs": o.epochs,
           "seed": o.seed, "lora": o.lora, "lora_alpha": o.lora_alpha,
           "lora_targets": o.lora_targets}
    if o.save == "delta":
        tensors, lora_scale = trained_tensors(model)
        applied = with_task_applied(base["model"], tensors, lora_scale)
        state = model.state_dict()
        if applied.keys() == state.keys() and all(torch.equal(applied[name], value.cpu())
                                                   for name, value in state.items()):
            path = os.path.join(out, TASK_FILE)
            metrics.update(saved_as=TASK_FILE, saved_bytes=None)
            tokenizer.save(os.path.join(out, "vocab.txt"))
            metrics["saved_bytes"] = save_task_file(path, tensors, base, {
                "labels": label_names, "pool": model.pool, "lora_scale": lora_scale,
                "step": metrics.get("steps", 0), "run": run})
            write_json(os.path.join(out, "metrics.json"), metrics)
            return
        log("--save delta: the base and the trained tensors do not give this model's weights "
            "exactly; the whole model is saved instead")
    metrics.update(saved_as="checkpoint.pt", saved_bytes=None)
    save_classifier(out, model, tokenizer, label_names, metrics, run=run)
    metrics["saved_bytes"] = os.path.getsize(os.path.join(out, "checkpoint.pt"))
    write_json(os.path.join(out, "metrics.json"), metrics)


def trained_tensors(model):
    """What fine-tuning changed, after fit_classifier: every parameter that trained
    (requires_grad) -- the head, the top-K layers -- and for LoRA each layer's A and B as
    LAYER.A, LAYER.B in place of the merged LAYER.weight (compress.merge_low_rank_updates kept
    them). Returns ({name: tensor}, LoRA's alpha / r scale, 1.0 without LoRA)."""
    merged = getattr(model, "merged_low_rank", {})
    merged_weights = {f"{layer}.weight" for layer in merged} | {f"{layer}.bias" for layer in merged}
    tensors = {name: p.detach().cpu() for name, p in model.named_parameters()
               if p.requires_grad and name not in merged_weights}
    scales = {scale for _, _, scale in merged.values()}
    for layer, (A, B, _) in merged.items():
        tensors[f"{layer}.A"], tensors[f"{layer}.B"] = A, B
    return tensors, scales.pop() if scales else 1.0


def adapted_start(start, folder, texts, o, config, log=print):
    """--adapt-steps: theta_0 becomes the encoder adapted to the task's texts (adapt_to_task, in
    `folder`); forgetting is still measured on the init's text. Returns the adapted run's
    checkpoint: the base a task file of this run is read on top of."""
    fitting = replace(o, mlm_max_length=min(o.mlm_max_length, config.max_positions))
    adapted, _, checkpoint = open_model(adapt_to_task(folder, o.init, texts, fitting, log), log)
    start.encoder_state = adapted.encoder.state_dict()
    start.pretrained_state = (adapted.state_dict() if start.pretrained_state is not None
                              else None)
    return checkpoint


def adapt_to_task(folder, init, texts, o, log=print):
    """Task-adaptive pre-training (Gururangan et al. 2020, "Don't Stop Pretraining"): continue
    E4's masked language modelling from `init` on the task's own texts, without their labels,
    for o.adapt_steps steps, before fine-tuning. Each text is a one-sentence document, so MLM
    only (no NSP). Writes a pre-training run in `folder` (its texts in folder/texts.txt) and
    returns the folder."""
    prepare_out_folder(folder, force=True)
    corpus = os.path.join(folder, "texts.txt")
    data.write_corpus(corpus, [[text] for text in texts])
    log(f"adapting {init} to the task: {o.adapt_steps} steps of MLM on its {len(texts)} "
        "training texts")
    pretrain(os.path.join(folder, "run"), PretrainOptions(
        corpus=[corpus], init=str(init), steps=o.adapt_steps, nsp=False, batch_size=32,
        max_length=o.mlm_max_length, save_every=0, eval_every=o.adapt_steps, seed=o.seed,
        device=o.device, deterministic=o.deterministic, packing=o.packing),
        force=True, log=lambda *args: None, progress=False)
    return os.path.join(folder, "run")


def starting_point(init, checkpoint, model, tokenizer, o, log):
    """finetune's StartingPoint from a loaded init: theta_0 and, when the init has a pre-trained
    MLM head and its unlabeled text is known (o.unlabeled; without it, a built-in corpus the
    checkpoint names, stdlib or the toy world -- never a path stored in the checkpoint), held-out
    batches for forgetting (C5) and a stream of batches for --aux-mlm."""
    mlm_head = has_mlm_head(checkpoint)
    if o.remedies.aux_mlm and not mlm_head:
        raise InputError(f"--aux-mlm: {init} has no pre-trained MLM head "
                         "(a classifier checkpoint or a headless BERT)")
    start = StartingPoint(encoder_state=model.encoder.state_dict())
    text = (data.pretraining_text(checkpoint.get("run", {}).get("corpus"), o.unlabeled)
            if mlm_head else None)
    if o.remedies.aux_mlm and not (text and text[0]):
        raise InputError(f"--aux-mlm: no unlabeled text for {init}; "
                         "name it with --unlabeled FILE (or stdlib)")
    if text:
        length = min(o.mlm_max_length, model.config.max_positions)
        start.pretrained_state = model.state_dict()
        start.held_out = data.held_out_batches(data.encode_documents(tokenizer, text[1]),
                                               tokenizer, length, use_nsp=False)
        if o.remedies.aux_mlm:
            start.aux_batches = data.mlm_batch_stream(data.encode_documents(tokenizer, text[0]),
                                                      tokenizer, o.batch_size, length, o.seed)
    elif mlm_head:
        log(f"{init}: its pre-training text is not named (a path a checkpoint stores is not "
            "opened on its word); pass --unlabeled to measure forgetting")
    return start


if __name__ == "__main__":
    # `python finetuning.py`: both loops end to end on a small toy world, a minute or two on a
    # CPU -- pre-training (E4 falls from ln|V|), then fine-tuning everything on its labels (E3).
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        files = data.write_world(folder, toyworld.toy_world(seed=0, num_documents=3000))
        pre = pretrain(os.path.join(folder, "pre"),
                       PretrainOptions(corpus=[files["unlabeled.txt"]], steps=500, vocab_size=1024),
                       progress=False)
        print(f"pre-training: held-out MLM loss {pre['held_out_mlm_loss']:.3f} "
              f"(ln|V| = {pre['ln_vocab']:.3f})")
        tuned = finetune(os.path.join(folder, "full"),
                         FinetuneOptions(init=os.path.join(folder, "pre"), train=files["train.tsv"],
                                         valid=files["test.tsv"], epochs=10),
                         progress=False)
        print(f"fine-tuning everything: test accuracy {tuned['accuracy']:.3f} "
              f"(chance {1 / len(toyworld.TOPICS):.3f})")
