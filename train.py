"""Training: the pre-training loop (E2 through E4, + B2/B3), the fine-tuning loop (E3, B4 and
section 3.2 of the document), and evaluation. docs/equations.md writes every formula out.

    pretrain(out, PretrainOptions(...))   MLM (+ NSP) on unlabeled text -> a run folder
    fit_classifier(rows, labels, ...)     the fine-tuning loop itself, on data in memory
    finetune(out, FinetuneOptions(...))   fit_classifier on TSV files -> a run folder
    evaluate(init, data) / fill_mask(init, text)

Each loop is a straight loop. Its settings are the small dataclasses of options.py, which
check themselves before any work.

Run `python train.py` to run both loops end to end on a small toy world.
"""

import math
import os
import queue
import random
import re
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import toyworld
from checkpoint import (
    PretrainingRun,
    check_resume_settings,
    finished_run,
    has_mlm_head,
    load_checkpoint,
    open_model,
    prepare_out_folder,
    save_classifier,
    write_json,
)
from common import IGNORE_INDEX, InputError
from model import Classifier, Config, PreTrainingModel, Unpadded, count_parameters, mlm_loss
from options import (
    FinetuneOptions,
    PretrainOptions,
    attention_backends,
    autocast,
    deterministic_algorithms,
    model_config,
    pick_device,
    pick_precision,
)
from parallel import data_parallel, finish, on_rank_0, processes_from_environment, sum_over_processes
from tokenizer import MASK, Tokenizer, train_tokenizer

# where tokenised corpora are cached (data.encode_documents); PTFT_CACHE="" turns it off
TOKEN_CACHE = os.environ.get("PTFT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "ptft"))


# ----------------------------------------------------------------------------------------
# Pre-training: the loop, one step, and the held-out E4
# ----------------------------------------------------------------------------------------


def pretrain(out, options, resume=False, force=False, log=print, progress=True):
    """E2 via E4 (+ B2, weighted by B3): pre-train an encoder on unlabeled text -- from a random
    initialisation or, with options.init (a run folder or a Hugging Face BERT folder), continue
    pre-training an existing one with its vocabulary. Writes OUT/checkpoint.pt (also every
    save_every steps), OUT/vocab.txt, OUT/metrics.json and OUT/snapshot-N.pt at each snapshot step.
    Returns the metrics dict; a --resume of a finished run returns its metrics (already_finished)."""
    options.check()
    options.model_config()  # an impossible shape is refused before any work
    finished = finished_run(out, options.steps) if resume else None
    if finished:
        return finished
    with deterministic_algorithms(options.deterministic):
        run, start_step, encoded, held_out = start_pretraining(out, options, resume, force, log)
        return pretraining_loop(out, run, start_step, encoded, held_out, progress)


def pretraining_loop(out, run, start_step, encoded, held_out, progress=True):
    """The loop of pretrain, from start_step to the last step; returns the metrics."""
    o, model, optimizer, scaler = run.options, run.model, run.optimizer, run.scaler
    checkpoint_path = os.path.join(out, "checkpoint.pt")
    # --compile: torch.compile traces and fuses the forward; the first steps are slow while it
    # compiles. It shares `model`'s weights; `model` is what we evaluate and save (clean names).
    # under torchrun: DistributedDataParallel, the gradients summed across processes (parallel.py)
    training_model = data_parallel(model, run.processes, run.device, unused_weights=not (o.nsp and o.nsp_weight > 0))
    training_model = torch.compile(training_model) if o.compile else training_model
    warmup_steps = o.warmup_steps if o.warmup_steps is not None else max(1, o.steps // 20)
    model.train()
    # the first steps (compilation with --compile, the allocator, kernel choice) are timed apart
    throughput, last = Throughput(timing_warmup_steps=max(1, min(10, (o.steps - start_step) // 10))), {}
    # The checkpoint of step k is written only once the weights after step k are known to be good:
    # when step k+1's losses and gradient norm have come out finite (the last one: when every weight
    # is finite). A diverging run therefore never replaces the last good checkpoint with bad weights.
    save_pending, last_saved = False, start_step if start_step else None
    bar = tqdm(range(start_step, o.steps), initial=start_step, total=o.steps, desc="pre-train",
               disable=not (progress and run.processes.main), dynamic_ncols=True)
    # each step's micro-batches (B2 pairs with B1 masks), and the data RNG's state before they were drawn
    batches = StepBatches(run, encoded, background=run.device.type == "cuda")

    def stop(step, what):
        bar.close()  # the progress bar's line ends before the error's
        batches.close()
        kept = f"{checkpoint_path} (step {last_saved}) is untouched" if last_saved is not None else "no checkpoint was written"
        raise TrainingDiverged(f"step {step}: {what}; {kept} -- try a lower --lr")

    for step in bar:
        step_started = time.time()
        data_state, micro_batches = batches.next()
        # nothing else draws between the end of the previous update and here: these are the RNG states
        # a resume from the previous step's checkpoint needs to draw the same batches, masks and dropout
        rng_at_start = run.rng_states(data_state)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, o.steps, o.lr, warmup_steps)  # C4
        loss_mlm, loss_nsp, tokens = pretraining_step(run, training_model, micro_batches)
        scaler.unscale_(optimizer)  # the true gradients (fp16), for clipping and the norm check
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()  # before clipping
        diverged = divergence(loss_mlm, loss_nsp, grad_norm, fp16_scaling=scaler.is_enabled())
        if diverged:
            stop(step + 1, diverged)
        if save_pending:  # the weights after step `step` made finite losses and gradients: they are good
            run.save(checkpoint_path, step, rng_at_start)
            save_pending, last_saved = False, step
        scaler.step(optimizer)  # = optimizer.step(), except a skipped fp16 step that overflowed
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        throughput.add(tokens, time.time() - step_started)
        last = {"step": step + 1, "train_mlm_loss": loss_mlm, "train_nsp_loss": loss_nsp if o.nsp else None}
        bar.set_postfix(mlm=f"{loss_mlm:.3f}", tok_s=f"{throughput.rate():,.0f}", data_wait=f"{throughput.share(batches.waited):.0%}")
        if held_out and ((step + 1) % o.eval_every == 0 or step + 1 == o.steps):
            evaluation = mlm_evaluation(model, held_out, run.device, run.precision)
            last.update({"held_out_mlm_loss": evaluation["mlm_loss"]})
            if o.nsp:
                last["held_out_nsp_accuracy"] = evaluation["nsp_accuracy"]
            run.history.append(last)
            if run.processes.main:
                bar.write(f"step {step + 1}: train MLM {loss_mlm:.3f}, held-out MLM {evaluation['mlm_loss']:.3f}"
                          + (f", held-out NSP accuracy {evaluation['nsp_accuracy']:.3f}" if o.nsp else ""))
        if o.save_every and (step + 1) % o.save_every == 0 and step + 1 < o.steps:
            save_pending = True  # written during the next step, once its loss vouches for these weights
        if step + 1 in o.snapshot_steps:  # C6's budget sweep (not vouched for: it is not resumed from)
            run.save(os.path.join(out, f"snapshot-{step + 1}.pt"), step + 1, run.rng_states(batches.next_state()))
    bar.close()
    # no next step vouches for the last update: look at the weights themselves
    not_finite = [name for name, value in model.named_parameters() if not torch.isfinite(value).all()]
    if not_finite:
        stop(o.steps, f"weight {not_finite[0]} is not finite after the last update")
    run.save(checkpoint_path, o.steps, run.rng_states(batches.next_state()))
    batches.close()
    metrics = {**last, "final_train_mlm_loss": last.get("train_mlm_loss"), "held_out_mlm_loss": last.get("held_out_mlm_loss"),
               "ln_vocab": math.log(len(run.tokenizer)), **throughput.metrics(), "data_wait_fraction": throughput.share(batches.waited),
               "processes": run.processes.world_size, "corpus": run.corpus_name, "history": run.history}
    if run.processes.main:
        write_json(os.path.join(out, "metrics.json"), metrics)
    finish(run.processes)
    return metrics


def divergence(loss_mlm, loss_nsp, grad_norm, fp16_scaling):
    """What says a pre-training step diverged ("" if nothing): a loss that is not finite, or a
    gradient norm that is not -- finite losses can still overflow in the backward pass; under fp16
    that is the scaler's business (an occasional skipped step), otherwise it is divergence."""
    not_finite = [f"{name} loss is {value}" for name, value in (("MLM", loss_mlm), ("NSP", loss_nsp))
                  if not math.isfinite(value)]
    if not not_finite and not math.isfinite(grad_norm) and not fp16_scaling:
        not_finite = [f"the gradient norm is {grad_norm} (MLM loss {loss_mlm:.3f})"]
    return ", ".join(not_finite)


def pretraining_step(run, training_model, micro_batches):
    """One optimizer step's forward and backward passes (no update yet) over its micro-batches
    (B2 pairs with B1 masks, StepBatches): E4 (+ B3's weighted NSP loss), accumulated.
    Returns (MLM loss, NSP loss, real tokens seen)."""
    o = run.options
    # gradient accumulation: every micro-batch's MLM loss is divided by the masked-token count of
    # ALL micro-batches, so the summed gradient is the one big batch would give (E4's normaliser)
    # under torchrun the same rule across processes: the count is summed over all of them, and so
    # are the gradients (parallel.sum_gradients); NSP's per-process means are divided like micro-batches'
    num_masked_total = int(sum_over_processes([sum(int((b["mlm_labels"] != IGNORE_INDEX).sum()) for b in micro_batches)],
                                              run.processes, run.device)[0])
    shares = o.accumulation * run.processes.world_size
    # on a GPU: a fixed number of predictions per sequence, so the step never waits for the GPU to
    # say how many tokens are masked (model.gather_fixed_predictions; the same loss)
    max_predictions = o.masking_rule().max_predictions(o.max_length) if run.device.type == "cuda" else None
    if max_predictions and max(int((b["mlm_labels"] != IGNORE_INDEX).sum(axis=1).max()) for b in micro_batches) > max_predictions:
        raise RuntimeError("a sequence has more masked tokens than MaskingRule.max_predictions allows")  # a bug, not input
    loss_mlm_total, loss_nsp_total, tokens = 0.0, 0.0, 0
    for number, micro_batch in enumerate(micro_batches, start=1):
        real = np.asarray(micro_batch["attention_mask"]).astype(bool)  # (B, T), on the CPU
        # padding: the position-wise layers compute on the real tokens only (model.Unpadded; the same
        # loss). No padding: on a GPU, no mask at all (SDPA may then pick FlashAttention)
        unpadded = Unpadded(real, run.device) if not real.all() else None
        micro_batch = to_tensors(micro_batch, run.device)  # pinned by StepBatches on a GPU: the copy does not block
        if unpadded is None and run.device.type == "cuda":
            micro_batch["attention_mask"] = None
        # under torchrun, the gradients are summed across processes once, after the last micro-batch
        later = training_model.no_sync if number < len(micro_batches) and hasattr(training_model, "no_sync") else nullcontext
        with later():
            with autocast(run.device, run.precision), attention_backends(o.deterministic, run.device):
                loss, loss_mlm, loss_nsp = training_model(
                    micro_batch["input_ids"], micro_batch["segment_ids"], micro_batch["attention_mask"],
                    micro_batch["mlm_labels"], micro_batch["nsp_labels"] if o.nsp else None,
                    nsp_weight=o.nsp_weight / shares, num_masked_total=num_masked_total, max_predictions=max_predictions,
                    unpadded=unpadded)
            run.scaler.scale(loss).backward()  # = loss.backward() unless fp16
        loss_mlm_total += loss_mlm.item()
        loss_nsp_total += 0.0 if loss_nsp is None else loss_nsp.item() / shares
        tokens += int(real.sum())
    # the whole step's losses (each process's MLM share is already over the total count) and tokens
    loss_mlm_total, loss_nsp_total, tokens = sum_over_processes([loss_mlm_total, loss_nsp_total, tokens], run.processes,
                                                                run.device)
    return loss_mlm_total, loss_nsp_total, int(tokens)


@torch.no_grad()
def mlm_evaluation(model, batches, device, precision="fp32"):
    """Held-out MLM loss (mean over all masked tokens, E4) and NSP accuracy."""
    was_training = model.training
    model.eval()
    total_loss, total_masked, nsp_correct, nsp_total = 0.0, 0, 0, 0
    for batch in batches:
        batch = to_tensors(batch, device)
        with autocast(device, precision):
            sequence_output, pooled = model.encoder(batch["input_ids"], batch["segment_ids"], batch["attention_mask"])
            scores = model.mlm_scores(sequence_output, batch["mlm_labels"])
            nsp_predictions = model.nsp_head(pooled).argmax(-1)
        targets = batch["mlm_labels"][batch["mlm_labels"] != IGNORE_INDEX]
        total_loss += mlm_loss(scores, targets, num_masked_total=1).item()  # E4's sum over M
        total_masked += targets.numel()
        nsp_correct += (nsp_predictions == batch["nsp_labels"]).sum().item()
        nsp_total += len(batch["nsp_labels"])
    model.train(was_training)
    return {"mlm_loss": total_loss / max(total_masked, 1), "nsp_accuracy": nsp_correct / max(nsp_total, 1)}


# ----------------------------------------------------------------------------------------
# Pre-training: everything before the first step
# ----------------------------------------------------------------------------------------


def start_pretraining(out, o, resume, force, log):
    """Everything before the first step: the corpus, the tokenizer, the model (new, from --init,
    or resumed) and its optimizer. Returns (run, first step, encoded corpus, held-out batches)."""
    device = pick_device(o.device)
    processes = processes_from_environment(device)  # under torchrun: this process among N (parallel.py)
    device, log = processes.device(device), processes.log(log)
    precision = pick_precision(o.precision, device)
    on_rank_0(processes, lambda: prepare_out_folder(out, resume, force))
    checkpoint_path = os.path.join(out, "checkpoint.pt")
    resume_from = load_checkpoint(checkpoint_path) if resume and os.path.exists(checkpoint_path) else None
    if resume_from is not None and resume_from.get("kind") != "pretraining":
        raise InputError(f"{checkpoint_path}: not a pre-training checkpoint, cannot --resume it")
    corpus_name, documents = data.load_corpus(o.corpus)
    tokenised = isinstance(documents, data.TokenFile)  # --corpus PREFIX.tokens: read through a memory map
    training_documents, held_out_documents = data.split_held_out(documents)
    config, tokenizer, weights = model_and_tokenizer(o, out, resume_from, corpus_name, training_documents, log,
                                                     processes.world_size)
    if o.max_length > config.max_positions:
        raise InputError(f"--max-length {o.max_length} exceeds the position table ({config.max_positions})")
    if tokenised and tokenizer.vocab != documents.tokenizer().vocab:
        raise InputError(f"{corpus_name}: tokenised with another vocabulary than the model's (ptft.py tokenize --init RUN)")
    if processes.main:
        tokenizer.save(os.path.join(out, "vocab.txt"))
    encoded = training_documents if tokenised else data.encode_documents(tokenizer, training_documents, TOKEN_CACHE)
    if o.nsp and not data.nsp_possible(encoded):
        raise InputError(f"{corpus_name}: next-sentence prediction needs at least 2 documents (separated by a blank line), "
                         "one of them with 2 or more lines; or pass --no-nsp")
    held_out = data.held_out_batches(held_out_documents if tokenised else data.encode_documents(tokenizer, held_out_documents),
                                     tokenizer, o.max_length, o.nsp)

    data_rng = seed_everything(o.seed)
    model = PreTrainingModel(config).to(device)  # the same initialisation in every process
    if weights is not None:
        model.load_state_dict(weights)
    if processes.rank > 0:  # its own data stream and dropout masks; rank 0's are a plain run's
        data_rng = np.random.default_rng([o.seed, processes.rank])
        torch.manual_seed(o.seed + processes.rank)
    # fp16 keeps 5 exponent bits: small gradients would underflow to 0. The GradScaler multiplies
    # the loss by S before backward, divides the gradients by S before the update, and skips a step
    # whose scaled gradients overflowed (then halves S). bf16 has fp32's range: no scaler (disabled).
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    run = PretrainingRun(options=o, corpus_name=corpus_name, model=model, tokenizer=tokenizer,
                         optimizer=make_optimizer(model, o.lr), scaler=scaler, data_rng=data_rng, device=device,
                         precision=precision, history=[], processes=processes)
    start_step = 0
    if resume_from is not None:
        run.restore(resume_from)
        start_step = resume_from["step"]
        log(f"resuming {out} at step {start_step}")
    log(f"pre-training {f'from {o.init}' if o.init else f'a {o.config} encoder'} ({count_parameters(model.encoder):,} "
        f"parameters, vocab {len(tokenizer)}) on {corpus_name}: {len(encoded)} documents, "
        f"{encoded.num_tokens() if tokenised else sum(len(s) for d in encoded for s in d):,} tokens; "
        f"{held_out_documents and len(held_out_documents) or 'no'} "
        f"held out; {device}, {precision}"
        + (f"; {processes.world_size} processes, {o.batch_size * processes.world_size * o.accumulation} sequences a step"
           if processes.world_size > 1 else ""))
    return run, start_step, encoded, held_out


def model_and_tokenizer(o, out, resume_from, corpus_name, documents, log, world_size=1):
    """(Config, tokenizer, weights or None) of the model to pre-train: a resumed run's, an
    --init's, or a new WordPiece vocabulary and (weights None) a random initialisation."""
    requested = o.model_config()
    if resume_from is not None:
        check_resume_settings(resume_from, o, corpus_name, os.path.join(out, "checkpoint.pt"), world_size)
        return Config(**resume_from["config"]), Tokenizer.from_checkpoint(resume_from), resume_from["model"]
    if o.init:
        initial = load_checkpoint(o.init, log)
        if initial.get("kind") != "pretraining":
            raise InputError(f"{o.init}: a classifier checkpoint; continued pre-training needs a pre-training run or a BERT folder")
        config = replace(Config(**initial["config"]), attention=o.attention, dropout=o.dropout, attention_dropout=o.dropout)
        return config, Tokenizer.from_checkpoint(initial), initial["model"]
    if isinstance(documents, data.TokenFile):  # a token file brings its vocabulary
        tokenizer = documents.tokenizer()
        return replace(requested, vocab_size=len(tokenizer)), tokenizer, None
    log(f"building a {requested.vocab_size}-token WordPiece vocabulary from {corpus_name} ...")
    tokenizer = train_tokenizer((s for d in documents for s in d), requested.vocab_size, o.lowercase)
    return replace(requested, vocab_size=len(tokenizer)), tokenizer, None  # a small corpus may give fewer tokens


class TrainingDiverged(Exception):
    """A loss or the gradient norm became NaN or infinite. ptft.py reports it and exits with status 3."""


# ----------------------------------------------------------------------------------------
# Fine-tuning: the loop (E3), freezing (B4, C3), the C5 remedies
# ----------------------------------------------------------------------------------------


def fit_classifier(rows, labels, num_labels, config, options, start=None, pad_id=0, progress=False):
    """E3: minimise the mean cross-entropy of the classifier over the labeled set D (rows of ids,
    integer labels), from `start` (see StartingPoint). options: FinetuneOptions -- freeze, epochs,
    lr, batch size, C4's warmup and schedule, C5's remedies, seed, device. Returns (model, info);
    with start.held_out, info holds forgetting: the held-out MLM loss of the encoder under the
    pre-trained MLM head, before and after fine-tuning."""
    o, start = options, start or StartingPoint()
    device = pick_device(o.device)
    processes = processes_from_environment(device)  # under torchrun: this process among N (parallel.py)
    if processes.world_size > 1 and (o.remedies.aux_mlm or start.teacher is not None):
        raise InputError("under torchrun, fine-tuning runs without --aux-mlm and without distillation (one process runs both)")
    device = processes.device(device)
    model, frozen = classifier_to_fine_tune(config, num_labels, o, start, device)
    # the pre-trained MLM head is needed only to measure forgetting (held_out) or for --aux-mlm
    needs_mlm = start.pretrained_state is not None and (start.held_out or o.remedies.aux_mlm)
    mlm_model = mlm_model_sharing_encoder(model, start.pretrained_state, device) if needs_mlm else None
    mlm_loss_before = mlm_evaluation(mlm_model, start.held_out, device)["mlm_loss"] if mlm_model and start.held_out else None
    remedies, lr = o.remedies, o.peak_lr()
    theta_0 = {name: p.detach().clone() for name, p in model.encoder.named_parameters()
               if p.requires_grad and not name.startswith("pooler.")} if remedies.l2_sp else None  # the pooler is head
    lr_scales = layer_lr_scales(model, remedies.layer_lr_decay) if remedies.layer_lr_decay != 1.0 else None
    optimizer = make_optimizer(model, lr, o.weight_decay, lr_scales=lr_scales)  # C5a: weight decay
    training_model = data_parallel(model, processes, device)  # frozen weights are not handed to it: no gradient to share
    rng = np.random.default_rng(o.seed)
    total_steps = o.epochs * math.ceil(len(rows) / o.batch_size)
    warmup_steps = max(1, int(o.warmup_fraction * total_steps)) if o.warmup_fraction > 0 else 0
    step, started = 0, time.time()
    bar = tqdm(total=total_steps, desc=f"fine-tune ({o.freeze})", disable=not (progress and processes.main), dynamic_ncols=True)
    with deterministic_algorithms(o.deterministic), attention_backends(o.deterministic, device):
        for _ in range(o.epochs):
            model.train()
            for module in frozen:
                module.eval()  # frozen layers: no dropout (see freeze_below)
            order = rng.permutation(len(rows))
            for first in range(0, len(order), o.batch_size):
                index = order[first:first + o.batch_size]
                # under torchrun each process takes every N-th row of the batch (one process: all of them);
                # a process left without a row computes one with weight 0 (every process takes part)
                share = index[processes.rank::processes.world_size]
                counted, share = (1.0, share) if len(share) else (0.0, index[:1])
                input_ids, mask = data.pad([rows[i] for i in share], pad_id)
                target = torch.tensor([labels[i] for i in share], device=device)
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(step, total_steps, lr, warmup_steps, o.schedule) * group["lr_scale"]
                logits = training_model(torch.from_numpy(input_ids).to(device), None, torch.from_numpy(mask).to(device))
                if start.teacher is None:
                    # E3: l(f_phi(x), y) = cross-entropy, averaged over the batch (a sum over this process's
                    # rows / the batch size: the processes' gradients add up to the batch's)
                    loss = counted * F.cross_entropy(logits.float(), target, reduction="sum") / len(index)
                else:  # C7: the teacher's softened predictions as targets too
                    teacher = start.teacher
                    loss = distillation_loss(logits.float(), teacher.logits[torch.from_numpy(index)].to(device), target,
                                             teacher.temperature, teacher.alpha)
                # E3 with the C5 remedies added:
                #   L(phi) = E3's loss + l2_sp / 2 * sum_j ||phi_j - theta_0,j||^2 + aux_mlm * L_MLM(phi)   (E4)
                if remedies.l2_sp:  # every process adds it; their gradients are summed
                    loss = loss + l2_sp_penalty(model, theta_0, remedies.l2_sp) / processes.world_size
                if remedies.aux_mlm:
                    batch = to_tensors(next(start.aux_batches), device)
                    loss = loss + remedies.aux_mlm * mlm_model(batch["input_ids"], batch["segment_ids"],
                                                               batch["attention_mask"], batch["mlm_labels"])[1]
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()  # before clipping
                if not math.isfinite(loss.item()) or not math.isfinite(grad_norm):
                    bar.close()
                    raise TrainingDiverged(f"fine-tuning step {step + 1}: loss is {loss.item()}, gradient "
                                           f"norm {grad_norm}; nothing was written -- try a lower --lr")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    trainable = count_parameters(model, trainable_only=True)
    # the last step's loss (the C5 terms included); each process holds its rows' share
    last_batch_loss = sum_over_processes([loss.item()], processes, device)[0]
    # task_bytes, C7: what a task adds to the shared pre-trained encoder, in float32 bytes (all of it when everything trains)
    info = {"steps": step, "seconds": time.time() - started, "last_batch_loss": last_batch_loss,
            "trainable_parameters": trainable, "total_parameters": count_parameters(model), "task_bytes": 4 * trainable}
    model.merge_low_rank_updates()  # an ordinary classifier again: W' = W + B A
    if mlm_loss_before is not None:
        # C5: forgetting = how much worse the fine-tuned encoder does the pre-training task
        mlm_loss_after = mlm_evaluation(mlm_model, start.held_out, device)["mlm_loss"]
        info.update(mlm_loss_before=mlm_loss_before, mlm_loss_after=mlm_loss_after, forgetting=mlm_loss_after - mlm_loss_before)
    return model, info


def classifier_to_fine_tune(config, num_labels, o, start, device):
    """fit_classifier's model, on `device`, before its first step: seeded, its encoder (and head)
    from `start`, frozen below the trainable layers (B4) or with low-rank updates (--lora), pruned
    weights held at zero. Returns (model, the frozen modules)."""
    seed_everything(o.seed)
    model = Classifier(config, num_labels, o.pool)
    if start.encoder_state is not None:
        model.encoder.load_state_dict(start.encoder_state)  # strict: every encoder weight must be there
    if start.head_state is not None:
        model.classifier.load_state_dict(start.head_state)
    trainable_layers = parse_freeze(o.freeze, config.num_layers)
    if o.remedies.aux_mlm and (trainable_layers == 0 or start.pretrained_state is None):
        raise InputError("--aux-mlm: needs a trainable encoder (not --freeze head) and an init with an MLM head")
    frozen = freeze_below(model, trainable_layers)
    if o.lora:  # C7: the encoder's own weights stay theta_0; low-rank updates of query and value train, and the head
        model.encoder.embeddings.requires_grad_(False)
        model.encoder.layers.requires_grad_(False)
        model.add_low_rank_updates(o.lora)
    model.to(device)
    if start.pruned:  # C7: a weight pruned to zero gets no gradient, so AdamW never moves it (and decay keeps 0 at 0)
        for weight in (p for p in model.encoder.layers.parameters() if p.ndim == 2):
            weight.register_hook(lambda grad, kept=weight != 0: grad * kept)
    return model, frozen


def distillation_loss(student_logits, teacher_logits, labels, temperature, alpha):
    """C7, knowledge distillation (Hinton et al. 2015; DistilBERT, Sanh et al. 2019):

        L = alpha * CE(z_s, y) + (1 - alpha) * T^2 * KL( softmax(z_t / T) || softmax(z_s / T) )

    z_s, z_t: student and teacher logits (B, C); y: labels, IGNORE_INDEX on a transfer-set row
    that has none. A temperature T > 1 softens the teacher's distribution, so that how likely it
    finds each WRONG class (which mistakes are nearly right) carries weight; T^2 keeps the soft
    term's gradient at the hard term's scale as T changes. The cross-entropy averages over the
    rows with a label (0 without any), the KL over every row. The teacher's logits are
    constants: no gradient reaches the teacher."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)       # (B, C)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    # KL(p_t || p_s) = sum_c p_t,c * (log p_t,c - log p_s,c), per row; then the mean over rows
    soft = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1).mean()
    labeled = labels != IGNORE_INDEX
    hard = F.cross_entropy(student_logits, labels, ignore_index=IGNORE_INDEX, reduction="sum") / labeled.sum().clamp(min=1)
    return alpha * hard + (1 - alpha) * temperature ** 2 * soft


def mlm_model_sharing_encoder(model, pretrained_state, device):
    """The pre-trained model with the classifier's encoder in place of its own (the same modules,
    not a copy): its MLM loss is the loss of the encoder being fine-tuned (--aux-mlm, forgetting).
    Its heads stay at their pre-trained values."""
    mlm_model = PreTrainingModel(model.config)
    mlm_model.load_state_dict(pretrained_state)
    mlm_model.encoder = model.encoder
    mlm_model.mlm_head.requires_grad_(False)
    mlm_model.nsp_head.requires_grad_(False)
    return mlm_model.to(device)


@dataclass
class StartingPoint:
    """What fine-tuning starts from: E3's theta_0 (encoder_state; None = a random initialisation,
    C1's baseline) and, when the pre-trained model has an MLM head (pretrained_state: encoder +
    heads), unlabeled batches for --aux-mlm (aux_batches) and for measuring forgetting (held_out).
    C7's commands (compress.py) start from a fine-tuned classifier: head_state is its linear
    layer; teacher makes the loss distillation_loss; pruned keeps weights that start at zero at zero."""
    encoder_state: dict = None
    pretrained_state: dict = None
    held_out: list = None
    aux_batches: object = None
    head_state: dict = None
    teacher: "Teacher" = None
    pruned: bool = False


@dataclass
class Teacher:
    """C7, distillation: the teacher's logits for every training row (rows without a label
    included: the transfer set), and the loss's temperature T and mixing weight alpha."""
    logits: torch.Tensor
    temperature: float = 2.0
    alpha: float = 0.5


def parse_freeze(freeze, num_layers):
    """--freeze head | top-K | none -> the number of encoder layers that train (from the top).

    head:  the encoder (embeddings + all layers) is frozen; the head (pooler + classifier) trains
    top-K: the top K layers and the head train; embeddings and lower layers are frozen
    none:  everything trains (full fine-tuning)"""
    if freeze == "head":
        return 0
    if freeze == "none":
        return None
    match = re.fullmatch(r"top-(\d+)", freeze or "")
    if not match:
        raise InputError(f"--freeze: expected head, top-K (e.g. top-2) or none, got {freeze!r}")
    k = int(match.group(1))
    if k > num_layers:
        raise InputError(f"--freeze top-{k}: the model has only {num_layers} layers")
    return k


def freeze_below(model, trainable_layers):
    """C3 / B4: keep the pre-trained values of everything below the top `trainable_layers`
    layers. Frozen parameters get requires_grad=False (so they are never in the optimizer and
    get no gradient). Returns the frozen modules: the training loop runs them in eval mode
    (no dropout) -- they are fixed feature extractors, and dropout in them would only add noise
    to the features the head learns from."""
    if trainable_layers is None:
        return []
    layers = model.encoder.layers
    frozen = [model.encoder.embeddings, *layers[: len(layers) - trainable_layers]]
    for module in frozen:
        module.requires_grad_(False)
    return frozen


def l2_sp_penalty(model, theta_0, strength):
    """C5a, L2-SP: an L2 penalty toward the pre-trained weights theta_0, not toward zero.

        Omega(phi) = strength / 2 * sum_j || phi_j - theta_0,j ||^2      (j: trainable encoder weights)

    theta_0 maps encoder parameter names to their pre-trained values (the head is new and
    has no theta_0). Its gradient is strength * (phi_j - theta_0,j): a spring back to theta_0."""
    terms = [((p - theta_0[name]) ** 2).sum() for name, p in model.encoder.named_parameters() if name in theta_0]
    return strength / 2 * torch.stack(terms).sum() if terms else torch.zeros(())


@torch.no_grad()
def classifier_logits(model, rows, device, batch_size=128, pad_id=0):
    """The classifier's logits f_phi(x) for rows of ids, in eval mode: (len(rows), C) float32, on the CPU."""
    model.eval()
    logits = []
    for first in range(0, len(rows), batch_size):
        input_ids, mask = data.pad(rows[first:first + batch_size], pad_id)
        logits.append(model(torch.from_numpy(input_ids).to(device), None, torch.from_numpy(mask).to(device)).float().cpu())
    return torch.cat(logits) if logits else torch.zeros(0, model.classifier.out_features)


def classify(model, rows, labels, device, batch_size=128, pad_id=0):
    """Accuracy, macro-F1, mean cross-entropy and n over (rows of ids, integer labels)."""
    logits = classifier_logits(model, rows, device, batch_size, pad_id)
    total_loss = F.cross_entropy(logits, torch.tensor(labels), reduction="sum").item()
    predictions, labels = logits.argmax(-1).numpy(), np.array(labels)
    f1s = []
    for label in np.unique(np.concatenate([labels, predictions])):
        true_positive = np.sum((predictions == label) & (labels == label))
        precision = true_positive / max(1, np.sum(predictions == label))
        recall = true_positive / max(1, np.sum(labels == label))
        f1s.append(0.0 if true_positive == 0 else 2 * precision * recall / (precision + recall))
    return {"accuracy": float(np.mean(predictions == labels)), "macro_f1": float(np.mean(f1s)),
            "loss": total_loss / len(labels), "n": int(len(labels))}


# ----------------------------------------------------------------------------------------
# Fine-tuning from files: the finetune command
# ----------------------------------------------------------------------------------------


def finetune(out, options, force=False, log=print, progress=True):
    """Fine-tune a classifier on options.train (TSV) from options.init (a pre-training run, a
    Hugging Face BERT folder) or 'scratch'. Writes OUT/checkpoint.pt, OUT/vocab.txt and
    OUT/metrics.json: metrics on options.valid (or on the training set without it) and, when the
    init has an MLM head, forgetting (C5)."""
    o = options
    o.check()
    device = pick_device(o.device)
    processes = processes_from_environment(device)  # under torchrun: rank 0 writes the run folder
    log = processes.log(log)
    if processes.world_size > 1 and o.adapt_steps:
        raise InputError("--adapt-steps under torchrun: run the task-adaptive step as one process")
    train_texts, train_label_names = data.read_tsv(o.train)
    label_names = sorted(set(train_label_names))
    if len(label_names) < 2:
        raise InputError(f"{o.train}: only one class ({label_names[0]!r}); a classifier needs at least two")
    valid_texts, valid_labels = data.read_tsv(o.valid) if o.valid else ([], [])
    valid_ids = data.encode_labels(valid_labels, label_names, o.valid) if o.valid else []
    if o.init == "scratch":
        tokenizer = train_tokenizer(train_texts, o.vocab_size)
        config = model_config(o, vocab_size=len(tokenizer), max_positions=o.max_length)
    else:
        model, tokenizer, checkpoint = open_model(o.init)
        config = model.config
    parse_freeze(o.freeze, config.num_layers)  # refuse a bad value before any work
    start = StartingPoint() if o.init == "scratch" else starting_point(o.init, checkpoint, model, tokenizer, o, log)
    if o.adapt_steps and not has_mlm_head(checkpoint):
        raise InputError(f"--adapt-steps continues MLM, which needs a pre-trained MLM head; {o.init} has none")
    on_rank_0(processes, lambda: prepare_out_folder(out, resume=False, force=force))
    if o.adapt_steps:  # theta_0 becomes the adapted encoder; forgetting is still measured on the init's text
        fitting = replace(o, mlm_max_length=min(o.mlm_max_length, config.max_positions))
        adapted, _, _ = open_model(adapt_to_task(os.path.join(out, "adapted"), o.init, train_texts, fitting, log), log)
        start.encoder_state = adapted.encoder.state_dict()
        start.pretrained_state = adapted.state_dict() if start.pretrained_state is not None else None
    train_rows = data.classification_inputs(tokenizer, train_texts, config.max_positions, log, path=o.train)
    valid_rows = data.classification_inputs(tokenizer, valid_texts, config.max_positions, log, path=o.valid)
    train_ids = data.encode_labels(train_label_names, label_names, o.train)
    log(f"fine-tuning from {o.init} with --freeze {o.freeze}: {len(train_rows)} examples, "
        f"{len(label_names)} classes, {o.epochs} epochs, lr {o.peak_lr():g}, device {device}")
    model, info = fit_classifier(train_rows, train_ids, len(label_names), config, o, start=start, pad_id=tokenizer.pad_id,
                                 progress=progress)
    metrics = {**info, "init": o.init, "freeze": o.freeze, "lr": o.peak_lr(), "epochs": o.epochs, "labels": label_names,
               "schedule": o.schedule, "warmup_fraction": o.warmup_fraction, **vars(o.remedies), "lora": o.lora,
               "adapt_steps": o.adapt_steps,
               "scored_on": o.valid or f"{o.train} (training set: no --valid given)"}
    scored = (valid_rows, valid_ids) if o.valid else (train_rows, train_ids)
    metrics.update(classify(model, *scored, device, pad_id=tokenizer.pad_id))
    if not processes.main:
        finish(processes)
        return metrics
    save_classifier(out, model, tokenizer, label_names, metrics,
                    run={"init": str(o.init), "freeze": o.freeze, "lr": o.peak_lr(), "epochs": o.epochs, "seed": o.seed})
    finish(processes)
    return metrics


def adapt_to_task(folder, init, texts, o, log=print):
    """Task-adaptive pre-training (Gururangan et al. 2020, "Don't Stop Pretraining"): continue
    E4's masked language modelling from `init` on the task's own texts, without their labels,
    for o.adapt_steps steps, before fine-tuning. Each text is a one-sentence document, so MLM
    only (no NSP). Writes a pre-training run in `folder` (its texts in folder/texts.txt) and
    returns the folder."""
    prepare_out_folder(folder, force=True)
    corpus = os.path.join(folder, "texts.txt")
    data.write_corpus(corpus, [[text] for text in texts])
    log(f"adapting {init} to the task: {o.adapt_steps} steps of MLM on its {len(texts)} training texts")
    pretrain(os.path.join(folder, "run"), PretrainOptions(
        corpus=[corpus], init=str(init), steps=o.adapt_steps, nsp=False, batch_size=32, max_length=o.mlm_max_length,
        save_every=0, eval_every=o.adapt_steps, seed=o.seed, device=o.device, deterministic=o.deterministic),
        force=True, log=lambda *args: None, progress=False)
    return os.path.join(folder, "run")


def starting_point(init, checkpoint, model, tokenizer, o, log):
    """finetune's StartingPoint from a loaded init: theta_0 and, when the init has a pre-trained
    MLM head and its unlabeled text is known (o.unlabeled, or the corpus it was pre-trained on),
    held-out batches for forgetting (C5) and a stream of batches for --aux-mlm."""
    mlm_head = has_mlm_head(checkpoint)
    if o.remedies.aux_mlm and not mlm_head:
        raise InputError(f"--aux-mlm: {init} has no pre-trained MLM head (a classifier checkpoint or a headless BERT)")
    start = StartingPoint(encoder_state=model.encoder.state_dict())
    text = data.pretraining_text(checkpoint.get("run", {}).get("corpus"), o.unlabeled) if mlm_head else None
    if o.remedies.aux_mlm and not (text and text[0]):
        raise InputError(f"--aux-mlm: no unlabeled text for {init}; name it with --unlabeled FILE (or stdlib)")
    if text:
        length = min(o.mlm_max_length, model.config.max_positions)
        start.pretrained_state = model.state_dict()
        start.held_out = data.held_out_batches(data.encode_documents(tokenizer, text[1]), tokenizer, length, use_nsp=False)
        if o.remedies.aux_mlm:
            start.aux_batches = data.mlm_batch_stream(data.encode_documents(tokenizer, text[0]), tokenizer,
                                                      o.batch_size, length, o.seed)
    elif mlm_head:
        log(f"{init}: its pre-training text is unknown; pass --unlabeled to measure forgetting")
    return start


# ----------------------------------------------------------------------------------------
# C4: the schedule; the optimizer (C5c: layer-wise rates)
# ----------------------------------------------------------------------------------------


def learning_rate(step, total_steps, peak, warmup_steps, schedule="cosine", cycles=3, cycle_decay=0.5):
    """C4: linear warmup from 0 to `peak` over warmup_steps, then cosine annealing to 0
    (or constant). `step` counts from 0; the rate is the one used for that step's update.

    C5c, "cyclical": the document's remedy against forgetting, a cyclical schedule that lowers the
    rate late in training (循环学习率调度,在训练后期降低学习率). Cosine annealing with warm restarts
    (SGDR, Loshchilov & Hutter 2017) whose peaks decay: after warmup the steps split into `cycles`
    equal cycles; cycle c starts at peak * cycle_decay**c and anneals along a cosine to 0. Restarts
    make it cyclical; the decaying peaks make every late step slower than the early ones (the last
    cycle never exceeds peak * cycle_decay**(cycles - 1)). A triangular cycle would do the same
    job; the cosine keeps one curve shape for all three schedules."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cyclical":
        cycle = min(cycles - 1, int(progress * cycles))
        within = progress * cycles - cycle       # 0 .. 1 inside the current cycle
        return peak * cycle_decay ** cycle * 0.5 * (1.0 + math.cos(math.pi * min(1.0, within)))
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model, lr, weight_decay=0.01, lr_scales=None):
    """AdamW over the TRAINABLE parameters only (frozen ones are never handed to it).
    As in BERT, biases and LayerNorm weights (the 1-D parameters) get no weight decay.
    lr_scales (parameter name -> factor, see layer_lr_scales) gives each group the rate
    lr * group["lr_scale"]; the training loops multiply their schedule by it."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    lr_scales = lr_scales or {}
    groups = {}
    for name, p in trainable:
        decay = weight_decay if p.ndim >= 2 else 0.0
        scale = lr_scales.get(name, 1.0)
        groups.setdefault((decay, scale), {"params": [], "weight_decay": decay, "lr_scale": scale, "lr": lr * scale})
        groups[(decay, scale)]["params"].append(p)
    # fused: one kernel for the whole update instead of a dozen passes over every tensor (same formula)
    fused = all(p.device.type in ("cpu", "cuda") for _, p in trainable)
    return torch.optim.AdamW(list(groups.values()), lr=lr, betas=(0.9, 0.999), eps=1e-6, fused=fused)


def layer_lr_scales(model, decay):
    """C5c, layer-wise learning-rate decay: the layer `depth` steps below the top gets
    lr * decay**depth. The head (pooler + classifier) has depth 0, the top encoder layer 1,
    ..., the bottom layer L, the embeddings L + 1 -- the most general features, lowest rate."""
    num_layers = len(model.encoder.layers)
    scales = {}
    for name, _ in model.named_parameters():
        match = re.match(r"encoder\.layers\.(\d+)\.", name)
        if match:
            depth = num_layers - int(match.group(1))
        elif name.startswith("encoder.embeddings."):
            depth = num_layers + 1
        else:
            depth = 0
        scales[name] = decay ** depth
    return scales


# ----------------------------------------------------------------------------------------
# Evaluation and prediction
# ----------------------------------------------------------------------------------------


def evaluate(init, data_path, device="auto", log=print):
    """A classifier checkpoint on a TSV -> accuracy, macro-F1, loss, n.
    A pre-training checkpoint on a text corpus -> held-out MLM loss (E4) and NSP accuracy."""
    device = pick_device(device)
    model, tokenizer, checkpoint = open_model(init, log)
    model.to(device)
    if checkpoint.get("kind") == "classifier":
        texts, labels = data.read_tsv(data_path)
        label_ids = data.encode_labels(labels, checkpoint["labels"], data_path)
        rows = data.classification_inputs(tokenizer, texts, model.config.max_positions, log, path=data_path)
        return classify(model, rows, label_ids, device, pad_id=tokenizer.pad_id)
    encoded = data.encode_documents(tokenizer, data.load_corpus([data_path])[1])
    max_length = min(model.config.max_positions, checkpoint.get("run", {}).get("max_length", 128))
    # NSP accuracy only where the run trained its NSP head and the corpus allows B2's pairs
    use_nsp = checkpoint.get("run", {}).get("nsp", True) and data.nsp_possible(encoded)
    batches = data.held_out_batches(encoded, tokenizer, max_length, use_nsp=use_nsp)
    result = mlm_evaluation(model, batches, device)
    if not use_nsp:
        del result["nsp_accuracy"]
    result["n"] = int(sum((b["mlm_labels"] != IGNORE_INDEX).sum() for b in batches))
    return result


@torch.no_grad()
def fill_mask(init, text, top_k=5, device="auto", log=print):
    """The MLM head's prediction at every [MASK] of TEXT: a list with, per [MASK], the top_k
    (token, probability) pairs, best first. The probability is E4's softmax over the vocabulary
    -- the distribution whose log the MLM loss sums over the masked set M."""
    device = pick_device(device)
    notes = []  # open_model's notes, said only if fill-mask goes on (a refusal is one line)
    model, tokenizer, checkpoint = open_model(init, notes.append)
    if checkpoint.get("kind") != "pretraining":
        raise InputError(f"{init}: a classifier checkpoint has no MLM head; fill-mask needs a pre-trained one")
    if "mlm_head" in checkpoint.get("fresh", []):
        raise InputError(f"{init}: the file has no MLM head weights (a sentence-embedding model?); fill-mask needs them")
    if top_k < 1:
        raise InputError(f"--top-k must be positive, got {top_k}")
    input_ids = [tokenizer.cls_id, *tokenizer.encode(text), tokenizer.sep_id]
    if tokenizer.mask_id not in input_ids:
        raise InputError(f"no {MASK} in the text; write {MASK} where a token should be predicted")
    if len(input_ids) > model.config.max_positions:
        raise InputError(f"the text is {len(input_ids)} tokens long; the model takes at most {model.config.max_positions}")
    for note in notes:
        log(note)
    model.to(device).eval()
    input_ids = torch.tensor([input_ids], device=device)
    sequence_output, _ = model.encoder(input_ids)
    # mlm_scores reads the masked set M off the labels: any value but IGNORE_INDEX marks a position
    masked = torch.where(input_ids == tokenizer.mask_id, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    scores = model.mlm_scores(sequence_output, masked).float()  # s_theta(x' | x~): (number of [MASK]s, V)
    # E4: P(x' | x~) = exp(s_theta(x' | x~)) / sum_{x'' in V} exp(s_theta(x'' | x~))
    probabilities = scores.softmax(dim=-1)
    best = probabilities.topk(min(top_k, len(tokenizer)), dim=-1)
    return [[(tokenizer.vocab[i], p) for i, p in zip(ids.tolist(), ps.tolist())]
            for ids, ps in zip(best.indices, best.values)]


# ----------------------------------------------------------------------------------------
# Seeds, tensors
# ----------------------------------------------------------------------------------------


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def to_tensors(batch, device):
    """numpy arrays (or tensors) -> tensors on `device`; a pinned tensor is copied without blocking."""
    return {key: (torch.from_numpy(value) if isinstance(value, np.ndarray) else value).to(device, non_blocking=True)
            for key, value in batch.items()}


class Throughput:
    """Tokens per second of a run: overall (everything included), and "steady": the training steps
    after the first `timing_warmup_steps` (not the learning rate's warmup), their time alone --
    compilation (--compile), the allocator and the choice of kernels happen in the first steps, and
    held-out evaluations and checkpoint writes between steps are not training. The steady rate is
    what `bench` measures. Each step ends with its losses read back (.item()), so on a GPU the
    clock sees the work done, not queued."""

    def __init__(self, timing_warmup_steps):
        self.timing_warmup_steps, self.started = timing_warmup_steps, time.time()
        self.steps = self.tokens = self.seconds = self.timing_warmup_tokens = self.timing_warmup_seconds = 0

    def add(self, tokens, seconds):
        """One training step: its real tokens, and the seconds it took (data wait included)."""
        self.steps += 1
        self.tokens, self.seconds = self.tokens + tokens, self.seconds + seconds
        if self.steps <= self.timing_warmup_steps:
            self.timing_warmup_tokens += tokens
            self.timing_warmup_seconds += seconds

    def elapsed(self):
        return max(time.time() - self.started, 1e-9)

    def rate(self):
        return self.tokens / self.elapsed()

    def share(self, seconds):
        return seconds / self.elapsed()

    def metrics(self):
        metrics = {"seconds": self.elapsed(), "tokens_per_second": self.rate()}
        if self.steps > self.timing_warmup_steps:
            steady_seconds = max(self.seconds - self.timing_warmup_seconds, 1e-9)
            metrics.update(timing_warmup_steps=self.timing_warmup_steps, timing_warmup_seconds=self.timing_warmup_seconds,
                           steady_tokens_per_second=(self.tokens - self.timing_warmup_tokens) / steady_seconds)
        return metrics


# ----------------------------------------------------------------------------------------
# A speed device, set apart: the data of the next steps built while the GPU computes
# ----------------------------------------------------------------------------------------


class StepBatches:
    """Each pre-training step's micro-batches, in order, with the state the data generator had
    before drawing them (what a checkpoint stores, for a bit-identical resume).

    background=False (the CPU: the cores are busy with the step itself): built when asked.
    background=True (a GPU): a thread builds the next steps' batches, in pinned memory, while the
    GPU computes -- the same batches in the same order, since only that thread draws from the data
    generator. `waited` adds up the seconds the loop spent waiting for data (pretrain reports its
    share of the time as data_wait_fraction)."""

    def __init__(self, run, encoded, background, ahead=2):
        self.run, self.encoded, self.waited, self.pending = run, encoded, 0.0, None
        self.queue, self.closed, self.worker = (queue.Queue(maxsize=ahead) if background else None), False, None
        if background:
            self.worker = threading.Thread(target=self.fill, daemon=True)
            self.worker.start()

    def build(self):
        o, state = self.run.options, self.run.data_rng.bit_generator.state
        batches = [data.pretraining_batch(self.encoded, self.run.tokenizer, self.run.data_rng, o.batch_size, o.max_length,
                                          use_nsp=o.nsp, masking=o.masking_rule()) for _ in range(o.accumulation)]
        if self.queue is not None and self.run.device.type == "cuda":
            batches = [{key: torch.from_numpy(value).pin_memory() for key, value in b.items()} for b in batches]
        return state, batches

    def fill(self):
        while not self.closed:
            try:
                item = self.build()
            except Exception as error:  # handed to the loop, which raises it
                item = error
            while not self.closed:
                try:
                    self.queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def next(self):
        """(data state, micro-batches) of the next step."""
        started = time.perf_counter()
        item, self.pending = self.pending or (self.queue.get() if self.queue is not None else self.build()), None
        self.waited += time.perf_counter() - started
        if isinstance(item, Exception):
            raise item
        return item

    def next_state(self):
        """The data generator's state before the next step's draw, without consuming it."""
        if self.queue is None:
            return self.run.data_rng.bit_generator.state
        self.pending = self.pending or self.queue.get()
        return self.pending[0] if not isinstance(self.pending, Exception) else None

    def close(self):
        """Stop the thread and wait for it (it may be building a batch), so that none outlives the run."""
        self.closed = True
        if self.worker is not None:
            self.worker.join(timeout=10)


if __name__ == "__main__":
    # `python train.py`: both loops end to end on a small toy world, a minute or two on a CPU --
    # pre-training (E4 falls from ln|V|), then fine-tuning everything on its labels (E3).
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        files = data.write_world(folder, toyworld.toy_world(seed=0, num_documents=3000))
        pre = pretrain(os.path.join(folder, "pre"), PretrainOptions(corpus=[files["unlabeled.txt"]], steps=500, vocab_size=1024),
                       progress=False)
        print(f"pre-training: held-out MLM loss {pre['held_out_mlm_loss']:.3f} (ln|V| = {pre['ln_vocab']:.3f})")
        tuned = finetune(os.path.join(folder, "full"), FinetuneOptions(init=os.path.join(folder, "pre"), train=files["train.tsv"],
                                                                       valid=files["test.tsv"], epochs=10), progress=False)
        print(f"fine-tuning everything: test accuracy {tuned['accuracy']:.3f} (chance {1 / len(toyworld.TOPICS):.3f})")
