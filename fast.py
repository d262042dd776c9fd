"""The speed devices: each computes what the reading path in model.py / train.py computes, faster.

model.py is written as the document's equations; this file holds what makes them run fast, so
that a reader of model.py meets the formula and not the machinery. Each device is tested equal to
the reading path (tests/test_fast.py), in outputs and gradients:

    Dropout                        nn.Dropout's distribution, from a quarter of the random numbers
    attention                      softmax(Q K^T / sqrt(d) + mask) V in torch's fused kernel, with
                                   Q, K and V from one matmul on a GPU
    Unpadded, encode_unpadded      the encoder's position-wise parts on the real tokens only
    GatherRows                     Unpadded's pad and unpad: gathers forward and backward
    pack_pairs, Packed             several pre-training pairs per row, each attending to itself
    gather_fixed_predictions       a fixed number of MLM predictions per sequence (no GPU wait)
    scores_over_padded_vocabulary  the MLM decoder's matmul at a GPU-friendly size
    Speed, pretraining_scores      the devices above, together, for one pre-training micro-batch
    compiled_model, Update         --compile: the model, or the whole step with the update
    profile_step                   one step's time split (data wait, forward+backward, optimizer)
    StepBatches                    the next steps' batches built in a background thread (a GPU)
    Throughput                     tokens per second, steady state apart from the first steps

model.py reaches this file through two switches: SelfAttention's `if self.use_sdpa or ...:` (the
`--attention sdpa` kernel, as nanoGPT's `if self.flash:`, or an Unpadded batch) and the `speed`
argument of PreTrainingModel.forward (None: the reading path). The classifier always computes
on its real tokens only (Classifier.forward): the scores are the reading path's.
"""

import queue
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import IGNORE_INDEX

# ----------------------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------------------


class Dropout(nn.Module):
    """Dropout: in training, zero each entry with probability p and scale the others by 1/(1-p)
    (so the expected value is unchanged); in eval, the identity -- nn.Dropout's result.

    On the CPU, torch's bernoulli_ draws one random number per entry, a large share of a small
    model's training step (docs/performance.md). Here one 64-bit random number gives four 16-bit
    uniforms; p is rounded to a multiple of 1/65536 (0.1 -> 0.100006). Elsewhere (CUDA, MPS: fast
    generators) it is F.dropout itself. tests/test_fast.py checks the kept fraction, the scaling,
    the gradient and the independence of neighbouring entries."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        count = x.numel()
        random_bits = torch.randint(-2 ** 63, 2 ** 63 - 1, ((count + 3) // 4,), dtype=torch.int64)
        uniform = random_bits.view(torch.int16)[:count].view(x.shape)  # each in [-32768, 32768)
        keep = uniform >= round(self.p * 65536) - 32768                  # P(keep) = 1 - p
        return x * keep / (1 - self.p)


# ----------------------------------------------------------------------------------------
# Attention: the fused kernel, and the real tokens only
# ----------------------------------------------------------------------------------------


def attention(module, x, mask):
    """model.SelfAttention's result: in torch's fused kernel (F.scaled_dot_product_attention, the
    softmax(Q K^T / sqrt(d) + mask) V lines in one kernel that never stores the (B, h, T, T)
    scores) where fused_attention_applies, else the written-out lines (SelfAttention.attend).
    mask: the additive mask (B, 1, 1, T) (or (B, 1, T, T), packed) or None -- or an Unpadded
    (encode_unpadded): x is then (N, H), the real tokens only, and attention runs in the
    (B, h, T, d) layout with the padding masked (mask.additive_mask)."""
    unpadded = mask if isinstance(mask, Unpadded) else None
    additive_mask = unpadded.additive_mask if unpadded is not None else mask
    fused = module.use_sdpa and fused_attention_applies(module, x)
    if fused and fused_projections_apply(module, x):
        q, k, v = fused_projections(module, x)                                     # 3 x (B, T, H)
    else:
        q, k, v = module.query(x), module.key(x), module.value(x)
    if unpadded is not None:  # back to the (B, T) layout for attention: zeros at padding
        q, k, v = unpadded.pad(q), unpadded.pad(k), unpadded.pad(v)
    # 3 x (B, h, T, d)
    q, k, v = module.split_heads(q), module.split_heads(k), module.split_heads(v)
    if fused:
        dropout_p = module.attention_dropout.p if module.training else 0.0
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask,
                                                 dropout_p=dropout_p)
    else:
        context = module.attend(q, k, v, additive_mask)                            # (B, h, T, d)
    context = context.transpose(1, 2).flatten(2)                                   # (B, T, H)
    return module.output(context if unpadded is None else unpadded.unpad(context))


def fused_attention_applies(module, x):
    """With config.attention == "sdpa", SelfAttention uses torch's fused kernel -- except when
    training on the CPU with attention dropout (SDPA has no fused CPU kernel with dropout: it
    falls back to the written-out lines with torch's slower dropout) or in bf16 (the CPU kernel's
    backward in bf16 is slower than the written-out lines; docs/performance.md measures it)."""
    training_on_cpu = module.training and x.device.type == "cpu"
    return not (training_on_cpu
                and (module.attention_dropout.p > 0 or torch.is_autocast_enabled("cpu")))


def fused_projections(module, x):
    """Q, K and V from ONE matmul, x W_qkv^T + b_qkv with W_qkv = [W_q; W_k; W_v] (3H, H): one
    large matmul keeps a GPU busier than three small ones. The weights stay three nn.Linear (the
    names BERT's checkpoints use); their concatenation is cheap next to the matmul."""
    weight = torch.cat([module.query.weight, module.key.weight, module.value.weight])  # (3H, H)
    bias = torch.cat([module.query.bias, module.key.bias, module.value.bias])          # (3H,)
    qkv = F.linear(x, weight, bias)                                                    # (B, T, 3H)
    return qkv.chunk(3, dim=-1)                                                     # 3 x (B, T, H)


def fused_projections_apply(module, x):
    """On CUDA, and only while query, key and value are plain nn.Linear (finetune --lora wraps two
    of them). On the CPU the three matmuls are as fast, and the numbers stay the reading path's."""
    return x.is_cuda and all(type(m) is nn.Linear for m in (module.query, module.key, module.value))


class Unpadded:
    """Where a padded batch's real tokens are, so that the encoder's position-wise parts -- every
    matmul but attention's two, the LayerNorms, GELU, dropout, the residual adds -- run on the N
    real tokens alone, (N, H), instead of on all B x T positions. Real text's documents are often
    short, and then most of a batch is padding (docs/performance.md measures how much); the
    reading path computes on it and throws the result away. Attention itself still runs in the
    (B, h, T, d) layout with the padding masked, as MosaicBERT's unpadding does without a
    variable-length kernel. The real positions' outputs are the reading path's; the padding
    positions' are zero, so it serves where only real positions are read: pre-training (MLM
    targets and [CLS] are real tokens: data.mask_tokens never picks padding) and the classifier
    ([CLS], or the mean over real tokens). Built from a mask on the CPU, where pretrain's data is,
    nothing waits for a GPU; from a mask on a GPU (the classifier's), finding the real tokens
    waits for it once.

    Both directions, forward and backward, are gathers (GatherRows): no scatter, whose CUDA
    kernels add with atomics and, under --deterministic, take a slower sorting path."""

    def __init__(self, attention_mask, device=None):
        mask = torch.as_tensor(attention_mask).bool()                # (B, T)
        self.shape = tuple(mask.shape)
        flat = mask.flatten()
        index = flat.nonzero().squeeze(1)                            # (N,) real positions in B*T
        # (B*T,) each position's row among the N real tokens; padding's: N, a zero row
        row_of = torch.full_like(flat, len(index), dtype=torch.int64)
        row_of[index] = torch.arange(len(index), device=index.device)
        on_gpu = device is not None and torch.device(device).type == "cuda"
        if index.device.type == "cpu" and on_gpu:                   # so the copy does not block
            index, row_of = index.pin_memory(), row_of.pin_memory()
        self.index = index.to(device or index.device, non_blocking=True)
        self.row_of = row_of.to(device or index.device, non_blocking=True)
        self.additive_mask = None  # the batch's attention mask (B, 1, 1, T), set by encode_unpadded

    def unpad(self, x):
        # (B, T, ...) -> (N, ...)
        return GatherRows.apply(x.flatten(0, 1), self.index, self.row_of)

    def pad(self, x):
        # (N, ...) -> (B, T, ...), zeros at padding
        padded = GatherRows.apply(x, self.row_of, self.index)
        return padded.view(*self.shape, *x.shape[1:])


class GatherRows(torch.autograd.Function):
    """y = [x; 0][rows] (a zero row appended to x, so that a row number len(x) reads zeros), whose
    gradient is again a gather, [dy; 0][inverse], where `inverse` says where each row of x went
    in y (len(y): nowhere). Unpadded's rows are each taken once, so this is the exact gradient
    index_select's backward (a scatter-add) would give."""

    @staticmethod
    def forward(ctx, x, rows, inverse):
        ctx.save_for_backward(inverse)
        return with_zero_row(x).index_select(0, rows)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return with_zero_row(grad).index_select(0, inverse), None, None


def with_zero_row(x):
    # (M, ...) -> (M + 1, ...)
    return torch.cat([x, x.new_zeros((1, *x.shape[1:]))])


def encode_unpadded(encoder, input_ids, segment_ids, attention_mask, unpadded, packed=None):
    """model.Encoder.forward on the real tokens only: (sequence output (B, T, H) with zeros at
    padding, pooled [CLS] output (B, H)). The same layers, called as in Encoder.forward; each is
    handed the Unpadded in place of the mask, and its SelfAttention then takes `attention` above
    (the layers' position-wise parts need no change: they compute per token, on (N, H)).
    packed: a Packed (rows of several pairs, below): its position ids, its block-diagonal mask
    and its pairs' [CLS] positions in place of 0..T-1, the padding mask and position 0; the
    pooled output is then one per pair (pairs, H)."""
    positions = None if packed is None else packed.position_ids
    x = encoder.embeddings(input_ids, segment_ids, positions)
    if packed is None:
        unpadded.additive_mask = encoder.additive_mask(attention_mask, x.dtype)   # (B, 1, 1, T)
    else:
        unpadded.additive_mask = packed.additive_mask(x.dtype)                    # (B, 1, T, T)
    x = unpadded.unpad(x)                                                         # (N, H)
    for layer in encoder.layers:
        x = layer(x, unpadded)
    x = unpadded.pad(x)                                                           # (B, T, H)
    return x, encoder.pool(x, None if packed is None else packed.cls_positions)


# ----------------------------------------------------------------------------------------
# Packing: several pre-training pairs in one row
# ----------------------------------------------------------------------------------------


def pack_pairs(batch, max_length, pad_id):
    """data.pretraining_batch's batch (numpy, one pair per row: [CLS] A [SEP] B [SEP], then
    padding) with its pairs packed into as few rows of max_length as first-fit decreasing finds,
    as MLPerf's BERT packs its pre-training data. Real text's pairs are often short (the stdlib
    docstrings fill ~39% of 128 tokens): packed, nearly every position of a row is a real token,
    and a step computes on fewer rows. Nothing is drawn at random: the same pairs, masks and
    labels as the batch's, rearranged -- the data generator's stream is the same packed or not.

    Each packed pair keeps its own computation (Packed, below, tells the model):
      position_ids  (R, T) 0, 1, ... restarting at each pair's [CLS] (E1's positions, per pair)
      pair_in_row   (R, T) 1, 2, ... for the row's first, second, ... pair, 0 at padding: a pair's
                    tokens attend only to its own tokens (a block-diagonal attention mask)
      cls_positions (pairs,) where each pair's [CLS] is in the flattened (R x T) rows, in the
                    batch's order of pairs, so NSP (B2) reads each pair's own [CLS] against its
                    own label (nsp_labels are unchanged)
    segment ids, MLM labels (B1) and the attention mask move with their tokens. A step on the
    packed batch computes the same losses and gradients as on the batch (tests/test_fast.py)."""
    real = np.asarray(batch["attention_mask"]).astype(bool)                      # (pairs, T0)
    # each pair's tokens: a prefix of its row (pretraining_batch pads after)
    lengths = real.sum(axis=1)
    # rows: the pairs of each packed row, in the order they were placed
    rows, room = [], []
    for pair in np.argsort(-lengths, kind="stable"):   # the longest first: first-fit decreasing
        fits = next((r for r, left in enumerate(room) if left >= lengths[pair]), None)
        if fits is None:
            rows.append([]), room.append(max_length)
            fits = len(rows) - 1
        rows[fits].append(int(pair))
        room[fits] -= int(lengths[pair])
    width = max_length - min(room)                                             # T: the fullest row
    shape = (len(rows), width)
    packed = dict(input_ids=np.full(shape, pad_id, dtype=np.int64),
                  segment_ids=np.zeros(shape, dtype=np.int64),
                  attention_mask=np.zeros(shape, dtype=bool),
                  mlm_labels=np.full(shape, IGNORE_INDEX, dtype=np.int64),
                  position_ids=np.zeros(shape, dtype=np.int64),
                  pair_in_row=np.zeros(shape, dtype=np.int64),
                  cls_positions=np.zeros(len(lengths), dtype=np.int64))
    for r, pairs in enumerate(rows):
        start = 0
        for number, pair in enumerate(pairs, start=1):
            end = start + lengths[pair]
            for key in ("input_ids", "segment_ids", "attention_mask", "mlm_labels"):
                packed[key][r, start:end] = batch[key][pair, :lengths[pair]]
            packed["position_ids"][r, start:end] = np.arange(lengths[pair])
            packed["pair_in_row"][r, start:end] = number
            packed["cls_positions"][pair] = r * width + start
            start = end
    if "nsp_labels" in batch:
        packed["nsp_labels"] = batch["nsp_labels"]
    return packed


def packing_pays(batch, max_length):
    """--packing auto: pack where it pays -- where packing needs at most PACKING_PAYS_BELOW of
    the batch's rows (short pairs, real text); where rows are nearly full already (the toy
    world's) packing saves little and costs a (R, 1, T, T) mask. The same rule on a GPU and on
    the CPU, where packed steps were measured faster (docs/performance.md)."""
    real = np.asarray(batch["attention_mask"]).astype(bool)
    lower_bound = -(-int(real.sum()) // max_length)  # rows packing needs at least
    return lower_bound <= PACKING_PAYS_BELOW * real.shape[0]


PACKING_PAYS_BELOW = 0.5


class Packed:
    """The device side of a packed batch (pack_pairs): its position ids (R, T), its pairs' [CLS]
    positions (pairs,) and, built when the dtype is known, the block-diagonal additive mask."""

    def __init__(self, micro_batch, device):
        def as_tensor(key):
            return torch.as_tensor(np.asarray(micro_batch[key])).to(device, non_blocking=True)

        self.position_ids = as_tensor("position_ids")                                     # (R, T)
        self.cls_positions = as_tensor("cls_positions")                                   # (pairs,)
        self.pair_in_row = as_tensor("pair_in_row")                                       # (R, T)

    def additive_mask(self, dtype):
        # (R, T) -> (R, 1, T, T): query i may attend to key j only within its own pair (the same
        # number in the row); padding (0) attends to padding, so no row of the softmax is empty
        same_pair = self.pair_in_row[:, :, None] == self.pair_in_row[:, None, :]         # (R, T, T)
        additive_mask = torch.zeros(same_pair.shape, dtype=dtype, device=same_pair.device)
        return additive_mask.masked_fill(~same_pair, torch.finfo(dtype).min)[:, None]


# ----------------------------------------------------------------------------------------
# The MLM head: a fixed number of predictions, a padded vocabulary
# ----------------------------------------------------------------------------------------


def gather_fixed_predictions(sequence_output, mlm_labels, max_predictions):
    """The hidden states and targets at the masked positions, in a FIXED shape: max_predictions
    (P) slots per sequence, as BERT's own data does (max_predictions_per_seq), the unused slots
    with target IGNORE_INDEX (mlm_loss skips them). The boolean index of mlm_scores gives a shape
    that depends on the data, so the CPU must wait for the GPU to learn it every step; here
    nothing waits, and every step has the same shapes (what torch.compile and CUDA graphs want).
    P must be at least the largest masked count of a sequence (data.MaskingRule.max_predictions).
    Returns (hidden (B * P, H), targets (B * P,))."""
    in_m = mlm_labels != IGNORE_INDEX                                                   # (B, T)
    max_predictions = min(max_predictions, mlm_labels.shape[1])
    # the masked positions first (key 1), then any others (key 0, their targets IGNORE_INDEX)
    positions = in_m.to(sequence_output.dtype).topk(max_predictions, dim=1).indices   # (B, P)
    index = positions[:, :, None].expand(-1, -1, sequence_output.shape[-1])          # (B, P, H)
    hidden = sequence_output.gather(1, index)                                         # (B, P, H)
    return hidden.flatten(0, 1), mlm_labels.gather(1, positions).flatten()


def scores_over_padded_vocabulary(head, hidden, token_embedding, multiple=64):
    """model.MLMHead's scores, transformed E^T + b (N, V), with E's V rows padded by zero rows up
    to a multiple of 64 for the matmul and the extra columns cut off before the bias: GPU matmul
    kernels are fastest when each dimension is a multiple of 64, and BERT's V = 30522 is not even
    a multiple of 8. The padding exists only inside this call: the embedding, checkpoints and
    exports keep V rows."""
    transformed = head.transform(hidden)                                 # (N, H)
    vocab_size = token_embedding.shape[0]
    # (V', H), V' a multiple of 64
    padded = F.pad(token_embedding, (0, 0, 0, -vocab_size % multiple))
    return (transformed @ padded.t())[..., :vocab_size] + head.bias     # (N, V)


# ----------------------------------------------------------------------------------------
# One pre-training micro-batch with every device that applies
# ----------------------------------------------------------------------------------------


@dataclass
class Speed:
    """The devices PreTrainingModel.forward(speed=...) applies to one micro-batch:
    unpadded           an Unpadded of the batch's mask, or None (no padding)
    max_predictions    gather_fixed_predictions' P, or None (the boolean gather of mlm_scores)
    padded_vocabulary  scores_over_padded_vocabulary (on a GPU)
    no_mask            no padding on a GPU: no mask at all (SDPA may then pick FlashAttention)
    packed             a Packed, or None: the batch's rows hold several pairs (pack_pairs)"""
    unpadded: Unpadded = None
    max_predictions: int = None
    padded_vocabulary: bool = False
    no_mask: bool = False
    packed: Packed = None


def speed_for(micro_batch, device, max_predictions):
    """The Speed of a micro-batch (numpy arrays, on the CPU, before they go to `device`): skip its
    padding where it has some; on a GPU a fixed number of predictions (max_predictions, from
    data.MaskingRule) and the padded vocabulary. A packed micro-batch (pack_pairs) always goes
    through Unpadded (its block-diagonal mask rides there), and its rows' P is their largest
    masked count: several short pairs may hold more masked tokens than one long one."""
    real = np.asarray(micro_batch["attention_mask"]).astype(bool)   # (B, T)
    on_gpu = torch.device(device).type == "cuda"
    packed = Packed(micro_batch, device) if "cls_positions" in micro_batch else None
    if on_gpu:
        masked = int((np.asarray(micro_batch["mlm_labels"]) != IGNORE_INDEX).sum(axis=1).max())
        if packed is not None:
            max_predictions = max(1, masked)
        elif masked > max_predictions:  # a bug, not input: MaskingRule.max_predictions is the bound
            raise RuntimeError("a sequence has more masked tokens than "
                               "MaskingRule.max_predictions allows")
    padded = not real.all() or packed is not None
    return Speed(unpadded=Unpadded(real, device) if padded else None,
                 max_predictions=max_predictions if on_gpu else None,
                 padded_vocabulary=on_gpu, no_mask=on_gpu and not padded, packed=packed)


def pretraining_scores(model, input_ids, segment_ids, attention_mask, mlm_labels, speed):
    """PreTrainingModel.forward's MLM scores (N, V), their targets (N,) and the pooled output,
    with `speed`'s devices; the model turns them into B3's losses as on the reading path."""
    if speed.unpadded is not None:
        sequence_output, pooled = encode_unpadded(model.encoder, input_ids, segment_ids,
                                                  attention_mask, speed.unpadded, speed.packed)
    else:
        encoder_mask = None if speed.no_mask else attention_mask
        sequence_output, pooled = model.encoder(input_ids, segment_ids, encoder_mask)
    if speed.max_predictions is None:
        hidden = sequence_output[mlm_labels != IGNORE_INDEX]                        # (N, H)
        targets = mlm_labels[mlm_labels != IGNORE_INDEX]
    else:
        hidden, targets = gather_fixed_predictions(sequence_output, mlm_labels,
                                                   speed.max_predictions)
    embedding = model.encoder.embeddings.token.weight
    if speed.padded_vocabulary:
        scores = scores_over_padded_vocabulary(model.mlm_head, hidden, embedding)
    else:
        scores = model.mlm_head(hidden, embedding)                                  # (N, V)
    return scores, targets, pooled


# ----------------------------------------------------------------------------------------
# The whole step compiled: --compile model | step | graphs
# ----------------------------------------------------------------------------------------

# --compile's choices: what torch.compile covers, and its mode (None: the default)
COMPILE_MODES = {"model": None, "step": None, "graphs": "reduce-overhead"}


def compiled_model(model, how, backend="inductor"):
    """The model the loop calls, under --compile `how`: "off", the model itself; "model" and
    "step", torch.compile's model -- its forward, and through AOTAutograd its backward, fused
    (bias + GELU, dropout + residual + LayerNorm: what nothing here fuses by hand); "graphs", the
    same in mode "reduce-overhead", which on CUDA records the compiled kernels as CUDA graphs and
    replays them, one launch for many kernels (what a small model's launch-bound step wants; a
    new shape records a new graph). backend: "inductor" (the compiler); the tests take
    "aot_eager", the same graphs run by eager kernels, to test the plumbing in seconds."""
    if how == "off":
        return model
    mode = COMPILE_MODES[how] if backend == "inductor" else None
    return torch.compile(model, mode=mode, backend=backend)


class Update:
    """The step's update, scaler.step(optimizer) (= optimizer.step() but under fp16), and with
    --compile step or graphs optimizer.step() itself under torch.compile: then forward, backward
    and AdamW's update all run compiled. C4's schedule changes the learning rate every step, and
    torch.compile would recompile for each new float it meets in the optimizer's groups; so the
    compiled update reads it from one tensor per group, filled each step (PyTorch's recipe for a
    compiled optimizer: a tensor lr), and each group's float is put back after, so that the
    loop, checkpoints and a resume see the float they always saw. Under fp16 the update stays
    eager: the scaler decides on the CPU whether a step is skipped."""

    def __init__(self, optimizer, scaler, how, backend="inductor"):
        self.optimizer, self.scaler = optimizer, scaler
        self.compiled = None
        if how in ("step", "graphs") and not scaler.is_enabled():
            self.learning_rates = [torch.tensor(float(group["lr"]),
                                                device=group["params"][0].device)
                                   for group in optimizer.param_groups]
            mode = COMPILE_MODES[how] if backend == "inductor" else None
            self.compiled = torch.compile(optimizer.step, mode=mode, backend=backend)

    def __call__(self):
        if self.compiled is None:
            self.scaler.step(self.optimizer)
            return
        floats = [group["lr"] for group in self.optimizer.param_groups]
        for group, tensor, value in zip(self.optimizer.param_groups, self.learning_rates, floats):
            tensor.fill_(value)
            group["lr"] = tensor
        try:
            self.compiled()
        finally:
            for group, value in zip(self.optimizer.param_groups, floats):
                group["lr"] = value


def profile_step(parts, device):
    """One step split into its parts by the PyTorch profiler: parts, (name, function) in order --
    e.g. data wait, forward+backward, optimizer -- each run inside record_function(name) and
    ended by a synchronize on a GPU, so that its span holds the device's work, not just its
    launch. Returns ({name: seconds}, the whole step's seconds, the profiler: its key_averages()
    name the operators inside each part)."""
    from torch.profiler import ProfilerActivity, profile, record_function
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities) as profiler:
        started = time.perf_counter()
        for name, function in parts:
            with record_function(name):
                function()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
        step_seconds = time.perf_counter() - started
    names = [name for name, _ in parts]
    spans = {event.key: event.cpu_time_total / 1e6 for event in profiler.key_averages()
             if event.key in names}
    return {name: spans.get(name, 0.0) for name in names}, step_seconds, profiler


# ----------------------------------------------------------------------------------------
# Around the step: batches built ahead, and the throughput meter
# ----------------------------------------------------------------------------------------


class StepBatches:
    """Each pre-training step's micro-batches, in order, with the state the data generator had
    before drawing them (what a checkpoint stores, for a bit-identical resume). `build(rng)`
    draws one step's micro-batches from the generator `rng`.

    background=False (the CPU: the cores are busy with the step itself): built when asked.
    background=True (a GPU): a thread builds the next steps' batches, in pinned memory, while the
    GPU computes -- the same batches in the same order, since only that thread draws from the data
    generator. `waited` adds up the seconds the loop spent waiting for data (pretrain reports its
    share of the time as data_wait_fraction)."""

    def __init__(self, build, rng, background, pin=False, ahead=2):
        self.build_batches, self.rng, self.pin = build, rng, pin
        self.waited, self.pending, self.closed, self.worker = 0.0, None, False, None
        self.queue = queue.Queue(maxsize=ahead) if background else None
        if background:
            self.worker = threading.Thread(target=self.fill, daemon=True)
            self.worker.start()

    def build(self):
        state = self.rng.bit_generator.state
        batches = self.build_batches(self.rng)
        if self.pin:
            batches = [{key: torch.from_numpy(value).pin_memory() for key, value in b.items()}
                       for b in batches]
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
        item = self.pending or (self.queue.get() if self.queue is not None else self.build())
        self.pending = None
        self.waited += time.perf_counter() - started
        if isinstance(item, Exception):
            raise item
        return item

    def next_state(self):
        """The data generator's state before the next step's draw, without consuming it."""
        if self.queue is None:
            return self.rng.bit_generator.state
        self.pending = self.pending or self.queue.get()
        return self.pending[0] if not isinstance(self.pending, Exception) else None

    def __enter__(self):
        return self

    def __exit__(self, *error):
        self.close()

    def close(self):
        """Stop the thread and wait for it (it may be building a batch), so that none outlives
        the run."""
        self.closed = True
        if self.worker is not None:
            self.worker.join(timeout=10)


class Throughput:
    """Tokens per second of a run: overall (everything included), and "steady": the training steps
    after the first `timing_warmup_steps` (not the learning rate's warmup), their time alone --
    compilation (--compile), the allocator and the choice of kernels happen in the first steps, and
    held-out evaluations and checkpoint writes between steps are not training. The steady rate is
    what `bench` measures. Each step ends with its losses read back (.item()), so on a GPU the
    clock sees the work done, not queued."""

    def __init__(self, timing_warmup_steps):
        self.timing_warmup_steps, self.started = timing_warmup_steps, time.time()
        self.steps = self.tokens = self.seconds = 0
        self.timing_warmup_tokens = self.timing_warmup_seconds = 0

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
        metrics = {"seconds": self.elapsed(), "tokens_per_second": self.rate(),
                   "tokens_per_step": self.tokens / max(self.steps, 1)}  # C1's compute curve
        if self.steps > self.timing_warmup_steps:
            steady_seconds = max(self.seconds - self.timing_warmup_seconds, 1e-9)
            steady_tokens = self.tokens - self.timing_warmup_tokens
            metrics.update(timing_warmup_steps=self.timing_warmup_steps,
                           timing_warmup_seconds=self.timing_warmup_seconds,
                           steady_tokens_per_second=steady_tokens / steady_seconds)
        return metrics


if __name__ == "__main__":
    # `python fast.py`: each device against the reading path (model.py) on a random padded batch
    # the module model.py uses (this file runs as __main__, a second copy of its classes)
    import fast
    from model import PreTrainingModel, make_config, mlm_loss

    torch.manual_seed(0)
    config = make_config("tiny", vocab_size=300, max_positions=32, dropout=0.0,
                         attention_dropout=0.0, attention="sdpa")
    network = PreTrainingModel(config)
    input_ids = torch.randint(5, 300, (4, 32))
    mask = torch.arange(32)[None, :] < torch.tensor([[32], [20], [9], [3]])
    labels = torch.where((torch.rand(4, 32) < 0.3) & mask, input_ids,
                         torch.full_like(input_ids, IGNORE_INDEX))
    labels[:, 1] = input_ids[:, 1]
    reading = mlm_loss(*network(input_ids, None, mask, labels, with_nsp=False)[:2])  # E4
    for name, speed in (
            ("real tokens only", fast.Speed(unpadded=fast.Unpadded(mask))),
            ("+ fixed predictions", fast.Speed(unpadded=fast.Unpadded(mask), max_predictions=12)),
            ("+ padded vocabulary", fast.Speed(unpadded=fast.Unpadded(mask), max_predictions=12,
                                               padded_vocabulary=True))):
        scores, targets, _ = network(input_ids, None, mask, labels, with_nsp=False, speed=speed)
        difference = (mlm_loss(scores, targets) - reading).abs().item()
        print(f"{name}: loss differs from the reading path's by {difference:.1e}")
        assert difference < 1e-5
    print("self-check passed")
