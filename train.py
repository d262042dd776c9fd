"""Training: the pre-training loop (E2 through E4, + B2/B3) and the fine-tuning loop (E3, B4 and
section 3.2 of the document). docs/equations.md writes every formula out.

    pretrain(out, PretrainOptions(...))   MLM (+ NSP) on unlabeled text -> a run folder
    fit_classifier(rows, labels, ...)     the fine-tuning loop itself, on data in memory

Each loop is a straight loop; C4's schedule and optimizer are schedule.py's. Its settings are the
small dataclasses of options.py, which check themselves before any work. The finetune command
(files in, a run folder out) is finetuning.py's; held-out scoring is evaluation.py's.

Run `python train.py` to run both loops end to end on a small toy world.
"""

import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import fast
from checkpoint import (
    PretrainingRun,
    check_resume_settings,
    finished_run,
    load_checkpoint,
    prepare_out_folder,
    write_json,
)
from common import IGNORE_INDEX, InputError
from compress import add_low_rank_updates, merge_low_rank_updates
from evaluation import mlm_evaluation, to_tensors
from model import Classifier, Config, PreTrainingModel, count_parameters, mlm_loss
from options import (
    attention_backends,
    autocast,
    deterministic_algorithms,
    pick_device,
    pick_precision,
    trainable_layers,
)
from parallel import (
    data_parallel,
    finish,
    on_rank_0,
    processes_from_environment,
    rows_of_this_process,
    share_of_batch_mean,
    sum_over_processes,
)
from schedule import layer_lr_scales, learning_rate, make_optimizer
from tokenizer import Tokenizer, train_tokenizer

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
    Returns the metrics dict; a --resume of a finished run returns its metrics."""
    o = options
    o.check()  # every setting, the model's shape too, before any work
    finished = finished_run(out, o.steps) if resume else None
    if finished:
        return finished
    with deterministic_algorithms(o.deterministic):
        run, start_step, encoded, held_out = start_pretraining(out, o, resume, force, log)
        model, optimizer, scaler = run.model, run.optimizer, run.scaler
        training_model = model_to_train(run)
        warmup_steps = o.warmup_steps if o.warmup_steps is not None else max(1, o.steps // 20)
        throughput, last, largest_norm = fast.Throughput(  # the first steps timed apart
            timing_warmup_steps=max(1, min(10, (o.steps - start_step) // 10))), {}, 0.0
        bar = tqdm(range(start_step, o.steps), initial=start_step, total=o.steps, desc="pre-train",
                   disable=not (progress and run.processes.main), dynamic_ncols=True)
        batches = step_batches(run, encoded)  # per step: micro-batches (B2 pairs, B1 masks)
        saving = Saving(os.path.join(out, "checkpoint.pt"), start_step)
        update = fast.Update(optimizer, scaler, o.compile)  # scaler.step, compiled or not
        model.train()
        with bar, batches:  # both closed before an error's message is printed
            for step in bar:
                step_started = time.time()
                data_state, micro_batches = batches.next()
                # no draws since the last update: a resume from its checkpoint restarts from here
                rng_at_start = run.rng_states(data_state)
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(step, o.steps, o.lr, warmup_steps)  # C4
                loss_mlm, loss_nsp, tokens = pretraining_step(run, training_model, micro_batches)
                scaler.unscale_(optimizer)  # the true gradients (fp16), for clipping and the check
                grad_norm = torch.nn.utils.clip_grad_norm_(  # the norm before clipping
                    model.parameters(), o.clip_norm or math.inf).item()
                saving.vouch(step, divergence(loss_mlm, loss_nsp, grad_norm, scaler.is_enabled()),
                             run, rng_at_start)
                update()  # = optimizer.step(), except a skipped fp16 step (overflow)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                throughput.add(tokens, time.time() - step_started)
                last = {"step": step + 1, "train_mlm_loss": loss_mlm,
                        "train_nsp_loss": loss_nsp if o.nsp else None}
                largest_norm = max(largest_norm, grad_norm)  # C4: what a large rate does
                bar.set_postfix(mlm=f"{loss_mlm:.3f}", tok_s=f"{throughput.rate():,.0f}",
                                data_wait=f"{throughput.share(batches.waited):.0%}")
                if held_out and ((step + 1) % o.eval_every == 0 or step + 1 == o.steps):
                    record_held_out(run, held_out, last, bar.write)
                saving.pending = bool(o.save_every) and (step + 1) % o.save_every == 0  # Saving
                if step + 1 in o.snapshot_steps:  # C6's budget sweep (not resumed from)
                    run.save(os.path.join(out, f"snapshot-{step + 1}.pt"), step + 1,
                             run.rng_states(batches.next_state()))
            saving.last(o.steps, run, run.rng_states(batches.next_state()))
        return finish_pretraining(out, run, last, throughput, batches.waited, largest_norm)


class Saving:
    """When pretrain writes OUT/checkpoint.pt: step k's weights only once step k+1's losses and
    gradient norm are finite, so a divergence never replaces the last good checkpoint -- and the
    last weights once every one of them is finite."""

    def __init__(self, path, start_step):
        self.path, self.pending = path, False
        self.last_saved = start_step if start_step else None

    def vouch(self, step, diverged, run, rng_at_start):
        """After step `step`'s backward pass: `diverged` (divergence's text, "" if fine) stops the
        run; else the weights before this step are good, and saved if a save is pending.
        rng_at_start: the generators before this step's draws (a resume restarts from them)."""
        if diverged:
            self.stop(step + 1, diverged)
        if self.pending:
            run.save(self.path, step, rng_at_start)
            self.pending, self.last_saved = False, step

    def last(self, steps, run, rng_states):
        """No next step vouches for the last update: look at the weights themselves."""
        not_finite = [name for name, value in run.model.named_parameters()
                      if not value.isfinite().all()]
        if not_finite:
            self.stop(steps, f"weight {not_finite[0]} is not finite after the last update")
        run.save(self.path, steps, rng_states)

    def stop(self, step, what):
        kept = (f"{self.path} (step {self.last_saved}) is untouched" if self.last_saved is not None
                else "no checkpoint was written")
        raise TrainingDiverged(f"step {step}: {what}; {kept} -- try a lower --lr")


def model_to_train(run):
    """The model the loop calls: under torchrun DistributedDataParallel, the gradients summed across
    processes (parallel.py); with --compile, torch.compile's fused forward (slow first steps). It
    shares the model's weights; run.model is what we evaluate and save (clean names)."""
    o = run.options
    training_model = data_parallel(run.model, run.processes, run.device,
                                   unused_weights=not (o.nsp and o.nsp_weight > 0))
    return fast.compiled_model(training_model, o.compile)  # --compile: off, model, step, graphs


def finish_pretraining(out, run, last, throughput, data_wait_seconds, largest_norm):
    """The run's metrics, written to OUT/metrics.json on rank 0. largest_norm (C4): the largest
    gradient norm before clipping of the steps this process ran (after a --resume: since)."""
    metrics = {**last, "max_grad_norm": largest_norm,
               "final_train_mlm_loss": last.get("train_mlm_loss"),
               "held_out_mlm_loss": last.get("held_out_mlm_loss"),
               "objective": run.options.objective,
               "ln_vocab": math.log(len(run.tokenizer)), **throughput.metrics(),
               "data_wait_fraction": throughput.share(data_wait_seconds),
               "processes": run.processes.world_size,
               "corpus": run.corpus_name, "history": run.history}
    if run.processes.main:
        write_json(os.path.join(out, "metrics.json"), metrics)
    finish(run.processes)
    return metrics


def record_held_out(run, held_out, last, write):
    """The held-out MLM loss (E4; and NSP accuracy with NSP) of the weights now: into `last`, the
    run's history, and one line on rank 0."""
    evaluation = mlm_evaluation(run.model, held_out, run.device, run.precision)
    last["held_out_mlm_loss"] = evaluation["mlm_loss"]
    # causal: the loss is the mean -log P(x_t | x_<t), and its exp is the perplexity
    if run.options.objective == "causal":
        last["held_out_perplexity"] = math.exp(evaluation["mlm_loss"])
    if run.options.nsp:
        last["held_out_nsp_accuracy"] = evaluation["nsp_accuracy"]
    run.history.append(last)
    if run.processes.main:
        name = "causal" if run.options.objective == "causal" else "MLM"
        write(f"step {last['step']}: train {name} {last['train_mlm_loss']:.3f}, "
              f"held-out {name} {evaluation['mlm_loss']:.3f}"
              + (f", held-out NSP accuracy {evaluation['nsp_accuracy']:.3f}"
                 if run.options.nsp else "")
              + (f", held-out perplexity {last['held_out_perplexity']:.2f}"
                 if "held_out_perplexity" in last else ""))


def step_batches(run, encoded, background=None):
    """fast.StepBatches drawing each step's micro-batches -- B2 pairs with B1 masks, --accum of
    them -- from the run's data generator; built ahead in a thread on a GPU (background=None)."""
    o, on_gpu = run.options, run.device.type == "cuda"

    def build(rng):
        if o.objective == "causal":  # C8: every next token, nothing masked (never packed)
            return [data.causal_batch(encoded, run.tokenizer, rng, o.batch_size, o.max_length)
                    for _ in range(o.accumulation)]
        return [packed(data.pretraining_batch(encoded, run.tokenizer, rng, o.batch_size,
                                              o.max_length, use_nsp=o.nsp,
                                              masking=o.masking_rule()))
                for _ in range(o.accumulation)]

    def packed(batch):  # --packing: the same pairs, several per row where short (fast.pack_pairs)
        pack = o.packing == "on" or (o.packing == "auto" and fast.packing_pays(batch, o.max_length))
        return fast.pack_pairs(batch, o.max_length, run.tokenizer.pad_id) if pack else batch

    background = on_gpu if background is None else background
    return fast.StepBatches(build, run.data_rng, background=background, pin=background and on_gpu)


def divergence(loss_mlm, loss_nsp, grad_norm, fp16_scaling):
    """What says a pre-training step diverged ("" if nothing): a loss that is not finite, or a
    gradient norm that is not -- finite losses can still overflow in the backward pass; under fp16
    that is the scaler's business (an occasional skipped step), otherwise it is divergence."""
    not_finite = [f"{name} loss is {value}"
                  for name, value in (("MLM", loss_mlm), ("NSP", loss_nsp))
                  if not math.isfinite(value)]
    if not not_finite and not math.isfinite(grad_norm) and not fp16_scaling:
        not_finite = [f"the gradient norm is {grad_norm} (MLM loss {loss_mlm:.3f})"]
    return ", ".join(not_finite)


def pretraining_step(run, training_model, micro_batches):
    """One optimizer step's forward and backward passes (no update yet) over its micro-batches
    (B2 pairs with B1 masks, step_batches): E4 (+ B3's weighted NSP loss), accumulated.
    Returns (MLM loss, NSP loss, real tokens seen)."""
    o = run.options
    # gradient accumulation: every micro-batch's MLM loss is divided by the masked-token count of
    # ALL micro-batches, so the summed gradient is the one big batch would give (E4's normaliser)
    # under torchrun the same rule across processes: the count is summed over all of them, and so
    # are the gradients (parallel.sum_gradients); NSP's per-process means are divided like
    # micro-batches'
    num_masked = sum(int((b["mlm_labels"] != IGNORE_INDEX).sum()) for b in micro_batches)
    num_masked_total = int(sum_over_processes([num_masked], run.processes, run.device)[0])
    shares = o.accumulation * run.processes.world_size
    max_predictions = o.masking_rule().max_predictions(o.max_length)
    if o.objective == "causal":  # C8: every position but the last predicts (its next token)
        max_predictions = o.max_length
    with_nsp = o.nsp and o.nsp_weight != 0
    loss_mlm_total, loss_nsp_total, tokens = 0.0, 0.0, 0
    for number, micro_batch in enumerate(micro_batches, start=1):
        # the speed devices that apply to this micro-batch (fast.py): the same scores, faster
        speed = fast.speed_for(micro_batch, run.device, max_predictions)
        tokens += int(np.asarray(micro_batch["attention_mask"]).sum())  # real tokens (mask, on CPU)
        batch = to_tensors(micro_batch, run.device)
        # under torchrun, the gradients are summed across processes once, after the last micro-batch
        defer_sync = number < len(micro_batches) and hasattr(training_model, "no_sync")
        later = training_model.no_sync if defer_sync else nullcontext
        with later():
            with (autocast(run.device, run.precision),
                  attention_backends(o.deterministic, run.device, o.deterministic_attention)):
                # s_theta at the masked positions (N, V), their tokens x_t (N,), NSP's (B, 2)
                scores, targets, nsp_scores = training_model(
                    batch["input_ids"], batch["segment_ids"], batch["attention_mask"],
                    batch["mlm_labels"], with_nsp=with_nsp, speed=speed)
                loss = loss_mlm = mlm_loss(scores, targets, num_masked_total)  # E4
                if with_nsp:
                    # B2: IsNext or NotNext, a 2-way classification of the pooled [CLS] vector
                    loss_nsp = F.cross_entropy(nsp_scores.float(), batch["nsp_labels"])
                    # B3: the pre-training loss is a weighted sum of the two
                    loss = loss_mlm + o.nsp_weight / shares * loss_nsp
                    loss_nsp_total += loss_nsp.item() / shares
            run.scaler.scale(loss).backward()  # = loss.backward() unless fp16
        loss_mlm_total += loss_mlm.item()
    # the whole step's losses (each process's MLM share is already over the total count) and tokens
    loss_mlm_total, loss_nsp_total, tokens = sum_over_processes(
        [loss_mlm_total, loss_nsp_total, tokens], run.processes, run.device)
    return loss_mlm_total, loss_nsp_total, int(tokens)


# ----------------------------------------------------------------------------------------
# Pre-training: everything before the first step
# ----------------------------------------------------------------------------------------


def start_pretraining(out, o, resume, force, log):
    """Everything before the first step: the corpus, the tokenizer, the model (new, from --init,
    or resumed) and its optimizer. Returns (run, first step, encoded corpus, held-out batches)."""
    device = pick_device(o.device)
    processes = processes_from_environment(device, o.collective_timeout)  # one of N, torchrun
    device, log = processes.device(device), processes.log(log)
    precision = pick_precision(o.precision, device)
    on_rank_0(processes, lambda: prepare_out_folder(out, resume, force))
    checkpoint_path = os.path.join(out, "checkpoint.pt")
    resumable = resume and os.path.exists(checkpoint_path)
    resume_from = load_checkpoint(checkpoint_path) if resumable else None
    if resume_from is not None and resume_from.get("kind") != "pretraining":
        raise InputError(f"{checkpoint_path}: not a pre-training checkpoint, cannot --resume it")
    corpus_name, documents = data.load_corpus(o.corpus)
    tokenised = isinstance(documents, data.TokenFile)  # --corpus PREFIX.tokens: memory-mapped
    training_documents, held_out_documents = data.split_held_out(documents)
    config, tokenizer, weights = model_and_tokenizer(o, out, resume_from, corpus_name,
                                                     training_documents, log, processes.world_size)
    if o.max_length > config.max_positions:
        raise InputError(f"--max-length {o.max_length} exceeds the position table "
                         f"({config.max_positions})")
    if tokenised and tokenizer.vocab != documents.tokenizer().vocab:
        raise InputError(f"{corpus_name}: tokenised with another vocabulary than the model's "
                         "(ptft.py tokenize --init RUN)")
    encoded = (training_documents if tokenised
               else data.encode_documents(tokenizer, training_documents, TOKEN_CACHE))
    if o.nsp and not data.nsp_possible(encoded):
        raise InputError(f"{corpus_name}: next-sentence prediction needs at least 2 documents "
                         "(separated by a blank line), one of them with 2 or more lines; "
                         "or pass --no-nsp")
    if processes.main:  # only once the inputs are known good: a refusal leaves nothing behind
        tokenizer.save(os.path.join(out, "vocab.txt"))
    held_out = data.held_out_batches(
        held_out_documents if tokenised else data.encode_documents(tokenizer, held_out_documents),
        tokenizer, o.max_length, o.nsp, causal=o.objective == "causal")
    data_rng = seed_everything(o.seed)
    model = PreTrainingModel(config).to(device)  # the same initialisation in every process
    if weights is not None:
        model.load_state_dict(weights)
    if processes.rank > 0:  # its own data stream and dropout masks; rank 0's are a plain run's
        data_rng = np.random.default_rng([o.seed, processes.rank])
        torch.manual_seed(o.seed + processes.rank)
    # fp16 keeps 5 exponent bits: small gradients would underflow to 0. The GradScaler multiplies
    # the loss by S before backward, divides the gradients by S before the update, and skips a
    # step whose scaled gradients overflowed (then halves S). bf16 has fp32's range: no scaler.
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    run = PretrainingRun(options=o, corpus_name=corpus_name, model=model, tokenizer=tokenizer,
                         optimizer=make_optimizer(model, o.lr), scaler=scaler, data_rng=data_rng,
                         device=device, precision=precision, history=[], processes=processes)
    start_step = 0
    if resume_from is not None:
        run.restore(resume_from)
        start_step = resume_from["step"]
        log(f"resuming {out} at step {start_step}")
    log(starting_line(run, encoded, tokenised, held_out_documents))
    return run, start_step, encoded, held_out


def starting_line(run, encoded, tokenised, held_out_documents):
    """What start_pretraining says it is about to do: model, data, device, processes."""
    o, processes = run.options, run.processes
    num_tokens = encoded.num_tokens() if tokenised else sum(len(s) for d in encoded for s in d)
    return (f"pre-training {f'from {o.init}' if o.init else f'a {o.config} encoder'} "
            f"({count_parameters(run.model.encoder):,} parameters, vocab {len(run.tokenizer)}) on "
            f"{run.corpus_name}: {len(encoded)} documents, {num_tokens:,} tokens; "
            f"{held_out_documents and len(held_out_documents) or 'no'} held out; "
            f"{run.device}, {run.precision}"
            + (f"; {processes.world_size} processes, "
               f"{o.batch_size * processes.world_size * o.accumulation} sequences a step"
               if processes.world_size > 1 else ""))


def model_and_tokenizer(o, out, resume_from, corpus_name, documents, log, world_size=1):
    """(Config, tokenizer, weights or None) of the model to pre-train: a resumed run's, an
    --init's, or a new WordPiece vocabulary and (weights None) a random initialisation."""
    requested = o.model_config()
    if resume_from is not None:
        check_resume_settings(resume_from, o, requested, corpus_name,
                              os.path.join(out, "checkpoint.pt"), world_size)
        return (Config(**resume_from["config"]), Tokenizer.from_checkpoint(resume_from),
                resume_from["model"])
    if o.init:
        initial = load_checkpoint(o.init, log)
        if initial.get("kind") != "pretraining":
            raise InputError(f"{o.init}: a classifier checkpoint; continued pre-training needs a "
                             "pre-training run or a BERT folder")
        config = replace(Config(**initial["config"]), attention=o.attention, dropout=o.dropout,
                         attention_dropout=o.dropout, causal=o.objective == "causal")
        return config, Tokenizer.from_checkpoint(initial), initial["model"]
    if isinstance(documents, data.TokenFile):  # a token file brings its vocabulary
        tokenizer = documents.tokenizer()
        return replace(requested, vocab_size=len(tokenizer)), tokenizer, None
    log(f"building a {requested.vocab_size}-token WordPiece vocabulary from {corpus_name} ...")
    tokenizer = train_tokenizer((s for d in documents for s in d), requested.vocab_size,
                                o.lowercase)
    # a small corpus may give fewer tokens than asked for
    return replace(requested, vocab_size=len(tokenizer)), tokenizer, None


class TrainingDiverged(Exception):
    """A loss or the gradient norm became NaN or infinite. ptft.py reports it and exits with
    status 3."""


# ----------------------------------------------------------------------------------------
# Fine-tuning: the loop (E3), freezing (B4, C3), the C5 remedies
# ----------------------------------------------------------------------------------------


def fit_classifier(rows, labels, num_labels, config, options, start=None, pad_id=0, progress=False):
    """E3: minimise the mean cross-entropy of the classifier over the labeled set D (rows of ids,
    integer labels), from `start` (see StartingPoint). options: FinetuneOptions -- freeze, epochs,
    lr, batch size, C4's warmup and schedule, C5's remedies, seed, device. Returns (model, info);
    with start.held_out, info holds forgetting: the held-out MLM loss of the encoder under the
    pre-trained MLM head, before and after fine-tuning."""
    o = options
    run = start_fine_tuning(config, num_labels, o, start or StartingPoint())
    model, start, processes, device = run.model, run.start, run.processes, run.device
    rng = np.random.default_rng(o.seed)
    total_steps = o.epochs * math.ceil(len(rows) / o.batch_size)
    warmup_steps = max(1, int(o.warmup_fraction * total_steps)) if o.warmup_fraction > 0 else 0
    step = 0
    bar = tqdm(total=total_steps, desc=f"fine-tune ({o.freeze})",
               disable=not (progress and processes.main), dynamic_ncols=True)
    with deterministic_algorithms(o.deterministic), attention_backends(o.deterministic, device):
        for _ in range(o.epochs):
            model.train()
            for module in run.frozen:
                module.eval()  # frozen layers: no dropout (see freeze_below)
            order = rng.permutation(len(rows))
            for first in range(0, len(order), o.batch_size):
                index = order[first:first + o.batch_size]
                mine, weight = rows_of_this_process(index, processes)  # torchrun: every N-th row
                padded = data.pad([rows[i] for i in mine], pad_id)
                input_ids, mask = (torch.from_numpy(a).to(device) for a in padded)
                target = torch.tensor([labels[i] for i in mine], device=device)
                for group in run.optimizer.param_groups:
                    group["lr"] = learning_rate(step, total_steps, o.peak_lr(), warmup_steps,
                                                o.schedule) * group["lr_scale"]
                logits = run.training_model(input_ids, None, mask).float()
                if start.teacher is None:
                    # E3: l(f_phi(x), y) = cross-entropy, averaged over the batch
                    loss = F.cross_entropy(logits, target)
                    # under torchrun: this process's share
                    loss = share_of_batch_mean(loss, mine, weight, len(index), processes)
                else:  # C7: the teacher's softened predictions as targets too (compress.Teacher)
                    loss = start.teacher.loss(logits, index, target)
                loss = with_remedies(loss, run)  # C5
                loss.backward()
                # the norm before clipping
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
                if not math.isfinite(loss.item()) or not math.isfinite(grad_norm):
                    bar.close()
                    raise TrainingDiverged(f"fine-tuning step {step + 1}: loss is {loss.item()}, "
                                           f"gradient norm {grad_norm}; nothing was written -- "
                                           "try a lower --lr")
                run.optimizer.step()
                run.optimizer.zero_grad(set_to_none=True)
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model, fine_tuning_info(run, step, loss)


@dataclass
class FineTuningRun:
    """What fit_classifier's loop works with, made by start_fine_tuning before the first step."""
    options: object          # FinetuneOptions
    start: "StartingPoint"
    model: Classifier
    frozen: list             # the frozen modules, run in eval mode
    training_model: object   # the model, or its DistributedDataParallel wrapper under torchrun
    optimizer: torch.optim.Optimizer
    mlm_model: PreTrainingModel = None  # the pre-trained heads on this encoder (forgetting,
                                        # --aux-mlm)
    mlm_loss_before: float = None
    theta_0: dict = None     # C5a, L2-SP: the trainable encoder weights fine-tuning starts from
    processes: object = None
    device: torch.device = None
    started: float = 0.0
    trainable: int = 0


def start_fine_tuning(config, num_labels, o, start):
    """Everything before fit_classifier's first step: the device (and torchrun's processes), the
    classifier with what it starts from and what is frozen, the optimizer, and C5's references."""
    device, processes = fine_tuning_processes(o, start)
    model, frozen = classifier_to_fine_tune(config, num_labels, o, start, device)
    # C5, forgetting: the pre-trained model with this encoder (for --aux-mlm) and its held-out
    # E4 now
    mlm_model, mlm_loss_before = pretrained_view(model, start, o, device)
    # the pooler is head: no theta_0 for it
    theta_0 = {name: p.detach().clone() for name, p in model.encoder.named_parameters()
               if p.requires_grad and not name.startswith("pooler.")} if o.remedies.l2_sp else None
    decay = o.remedies.layer_lr_decay
    scales = layer_lr_scales(model, decay) if decay != 1.0 else None
    # C5a: weight decay
    optimizer = make_optimizer(model, o.peak_lr(), o.weight_decay, lr_scales=scales)
    # frozen weights are not handed to it: no gradient to share
    training_model = data_parallel(model, processes, device)
    return FineTuningRun(options=o, start=start, model=model, frozen=frozen,
                         training_model=training_model, optimizer=optimizer, mlm_model=mlm_model,
                         mlm_loss_before=mlm_loss_before, theta_0=theta_0,
                         processes=processes, device=device, started=time.time(),
                         trainable=count_parameters(model, trainable_only=True))


def fine_tuning_info(run, steps, last_loss):
    """What fit_classifier reports; LoRA's updates are merged first (W' = W + B A): an ordinary
    classifier again. With held-out text, C5's forgetting: the held-out MLM loss after - before."""
    merge_low_rank_updates(run.model)
    info = {"steps": steps, "seconds": time.time() - run.started,
            # the last step's loss (the C5 terms included); each process holds its rows' share
            "last_batch_loss": sum_over_processes([last_loss.item()], run.processes, run.device)[0],
            "trainable_parameters": run.trainable, "total_parameters": count_parameters(run.model),
            # C7: what a task adds to the shared pre-trained encoder, in float32 bytes
            "task_bytes": 4 * run.trainable}
    if run.mlm_loss_before is not None:
        mlm_loss_after = mlm_evaluation(run.mlm_model, run.start.held_out, run.device)["mlm_loss"]
        info.update(mlm_loss_before=run.mlm_loss_before, mlm_loss_after=mlm_loss_after,
                    forgetting=mlm_loss_after - run.mlm_loss_before)
    return info


def with_remedies(loss, run):
    """E3's loss with the C5 remedies' terms added:

        L(phi) = E3's loss + l2_sp / 2 * sum_j ||phi_j - theta_0,j||^2 + aux_mlm * L_MLM(phi)   (E4)

    Under torchrun every process adds the L2-SP term; their gradients are summed, hence / N."""
    remedies = run.options.remedies
    if remedies.l2_sp:
        loss = loss + (l2_sp_penalty(run.model, run.theta_0, remedies.l2_sp)
                       / run.processes.world_size)
    if remedies.aux_mlm:
        batch = to_tensors(next(run.start.aux_batches), run.device)
        scores, targets, _ = run.mlm_model(batch["input_ids"], batch["segment_ids"],
                                           batch["attention_mask"], batch["mlm_labels"],
                                           with_nsp=False)
        loss = loss + remedies.aux_mlm * mlm_loss(scores, targets)  # E4 on unlabeled text
    return loss


def fine_tuning_processes(o, start):
    """fit_classifier's device and, under torchrun, this process among N (parallel.py)."""
    device = pick_device(o.device)
    processes = processes_from_environment(device, o.collective_timeout)
    if processes.world_size > 1 and (o.remedies.aux_mlm or start.teacher is not None):
        raise InputError("under torchrun, fine-tuning runs without --aux-mlm and without "
                         "distillation (one process runs both)")
    return processes.device(device), processes


def pretrained_view(model, start, o, device):
    """(the pre-trained model sharing `model`'s encoder, its held-out MLM loss now), or Nones: the
    pre-trained MLM head is needed only to measure forgetting (start.held_out) or for --aux-mlm."""
    if start.pretrained_state is None or not (start.held_out or o.remedies.aux_mlm):
        return None, None
    mlm_model = mlm_model_sharing_encoder(model, start.pretrained_state, device)
    return mlm_model, (mlm_evaluation(mlm_model, start.held_out, device)["mlm_loss"]
                       if start.held_out else None)


def classifier_to_fine_tune(config, num_labels, o, start, device):
    """fit_classifier's model, on `device`, before its first step: seeded, its encoder (and head)
    from `start`, frozen below the trainable layers (B4) or with low-rank updates (--lora), pruned
    weights held at zero. Returns (model, the frozen modules)."""
    seed_everything(o.seed)
    model = Classifier(config, num_labels, o.pool)
    if start.encoder_state is not None:
        model.encoder.load_state_dict(start.encoder_state)  # strict: every encoder weight
    if start.head_state is not None:
        model.classifier.load_state_dict(start.head_state)
    trainable = trainable_layers(o.freeze, config.num_layers)
    if o.remedies.aux_mlm and (trainable == 0 or start.pretrained_state is None):
        raise InputError("--aux-mlm: needs a trainable encoder (not --freeze head) and an init "
                         "with an MLM head")
    frozen = freeze_below(model, trainable)
    # C7: the encoder's own weights stay theta_0; low-rank updates of query and value (or
    # --lora-targets) train, and the head -- and with all+embedding-table the embedding layer
    if o.lora:
        model.encoder.embeddings.requires_grad_(o.lora_targets == "all+embedding-table")
        model.encoder.layers.requires_grad_(False)
        add_low_rank_updates(model, o.lora, o.lora_alpha, o.lora_targets)
    model.to(device)
    # C7: a weight pruned to zero gets no gradient, so AdamW never moves it (and decay keeps 0
    # at 0)
    if start.pruned:
        for weight in (p for p in model.encoder.layers.parameters() if p.ndim == 2):
            weight.register_hook(lambda grad, kept=weight != 0: grad * kept)
    return model, frozen


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
    C7's commands (deploy.py) start from a fine-tuned classifier: head_state is its linear
    layer; teacher makes the loss distillation_loss; pruned keeps weights that start at zero at
    zero."""
    encoder_state: dict = None
    pretrained_state: dict = None
    held_out: list = None
    aux_batches: object = None
    head_state: dict = None
    teacher: object = None  # a compress.Teacher
    pruned: bool = False


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

        Omega(phi) = strength / 2 * sum_j || phi_j - theta_0,j ||^2
                                                  (j: the trainable encoder weights)

    theta_0 maps encoder parameter names to their pre-trained values (the head is new and
    has no theta_0). Its gradient is strength * (phi_j - theta_0,j): a spring back to theta_0."""
    terms = [((p - theta_0[name]) ** 2).sum() for name, p in model.encoder.named_parameters()
             if name in theta_0]
    return strength / 2 * torch.stack(terms).sum() if terms else torch.zeros(())


# ----------------------------------------------------------------------------------------
# Seeds
# ----------------------------------------------------------------------------------------


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


if __name__ == "__main__":
    # `python train.py`: the pre-training loop on a small toy world (E4 falls from ln|V|), then
    # fit_classifier on its labeled sentences, the encoder frozen (B4) -- a minute on a CPU.
    import tempfile

    import toyworld
    from checkpoint import open_model
    from options import FinetuneOptions, PretrainOptions

    with tempfile.TemporaryDirectory() as folder:
        files = data.write_world(folder, toyworld.toy_world(seed=0, num_documents=3000))
        pre_options = PretrainOptions(corpus=[files["unlabeled.txt"]], steps=300, vocab_size=1024)
        pre = pretrain(os.path.join(folder, "pre"), pre_options, progress=False)
        print(f"pre-training: held-out MLM loss {pre['held_out_mlm_loss']:.3f} "
              f"(ln|V| = {pre['ln_vocab']:.3f})")
        texts, names = data.read_tsv(files["train.tsv"])
        model, tokenizer, _ = open_model(os.path.join(folder, "pre"))
        rows = data.classification_inputs(tokenizer, texts, model.config.max_positions, print)
        label_ids = data.encode_labels(names, sorted(set(names)), files["train.tsv"])
        start = StartingPoint(encoder_state=model.encoder.state_dict())
        tuned, info = fit_classifier(rows, label_ids, len(set(names)), model.config,
                                     FinetuneOptions(freeze="head", epochs=5), start=start,
                                     pad_id=tokenizer.pad_id)
        print(f"fine-tuning the head: {info['steps']} steps, "
              f"last batch loss {info['last_batch_loss']:.3f}")
