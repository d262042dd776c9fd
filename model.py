"""A tiny BERT, written so that it can be read in one sitting.

The architecture is BERT's exactly (Devlin et al. 2018; the same computation as
`transformers`' BertModel): embeddings -> post-LN Transformer encoder layers -> pooler,
with three heads on top:

    MLM head         (B1, E4)  predicts the tokens hidden behind [MASK]
    NSP head         (B2)      predicts whether segment B follows segment A
    classifier head  (B4, E3)  the task head that fine-tuning puts in place of the above

Equation numbers (E1-E4, B1-B4) refer to docs/equations.md, which writes each one out.

Tensor shape legend used in comments:
    B batch size, T sequence length, H hidden size, h heads, d = H / h per-head size,
    V vocabulary size, I intermediate (feed-forward) size, N number of masked tokens.

The reading path comes first; the speed devices are set apart at the end of the file, each
tested equal to it:
    Dropout                          a faster dropout mask on the CPU
    fused_attention                  torch's fused attention kernel (and Q, K, V in one matmul)
    Unpadded                         the position-wise layers on the real tokens only
    gather_fixed_predictions         a fixed number of MLM predictions (no wait for the GPU)
    scores_over_padded_vocabulary    the vocabulary padded for the GPU's matmul

Run `python model.py` for a self-check.
"""

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import IGNORE_INDEX, IS_NEXT, NOT_NEXT  # the label conventions: BERT's


@dataclass
class Config:
    vocab_size: int = 8192
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 512
    max_positions: int = 128  # size of the learned position table: the longest input
    type_vocab_size: int = 2  # segment ids: 0 for "A" (and single sentences), 1 for "B"
    dropout: float = 0.1  # on embeddings, attention output, feed-forward output, classifier input
    attention_dropout: float = 0.1  # on the attention probabilities
    layer_norm_eps: float = 1e-12  # BERT's value
    initializer_range: float = 0.02  # std of the normal initialisation (BERT's value)
    attention: str = "explicit"  # "explicit" = the formula written out; "sdpa" = torch's fused kernel

    def __post_init__(self):
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.attention not in ("explicit", "sdpa"):
            raise ValueError(f"attention must be 'explicit' or 'sdpa', not {self.attention!r}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_positions", "type_vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def to_dict(self):
        return asdict(self)


# Named sizes. "base" is BERT-base; "tiny" and "small" are the sizes that train on a CPU.
PRESETS = {
    "tiny": dict(num_layers=2, hidden_size=128, num_heads=2, intermediate_size=512),
    "small": dict(num_layers=4, hidden_size=256, num_heads=4, intermediate_size=1024),
    "base": dict(num_layers=12, hidden_size=768, num_heads=12, intermediate_size=3072),
}


def make_config(preset, **overrides):
    if preset not in PRESETS:
        raise ValueError(f"unknown config {preset!r}; expected one of {', '.join(PRESETS)}")
    return replace(Config(**PRESETS[preset]), **overrides)


# ----------------------------------------------------------------------------------------
# The encoder
# ----------------------------------------------------------------------------------------


class Embeddings(nn.Module):
    """token + learned position + segment embeddings -> LayerNorm -> dropout."""

    def __init__(self, config):
        super().__init__()
        self.token = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position = nn.Embedding(config.max_positions, config.hidden_size)
        self.segment = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.dropout)

    def forward(self, input_ids, segment_ids):
        # input_ids, segment_ids: (B, T) -> (B, T, H)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.token(input_ids) + self.position(positions) + self.segment(segment_ids)
        return self.dropout(self.layer_norm(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention: softmax(Q K^T / sqrt(d) + mask) V, per head, then W_o."""

    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_size = config.hidden_size // config.num_heads
        self.use_sdpa = config.attention == "sdpa"
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.output = nn.Linear(config.hidden_size, config.hidden_size)
        self.attention_dropout = Dropout(config.attention_dropout)

    def to_heads(self, q, k, v, unpadded=None):
        # 3 x (B, T, H) -> 3 x (B, h, T, d). With `unpadded` (3 x (N, H), the real tokens only),
        # attention needs the (B, T) layout back first: zeros at padding
        if unpadded is not None:
            q, k, v = unpadded.pad(q), unpadded.pad(k), unpadded.pad(v)
        batch, length, _ = q.shape
        return [x.view(batch, length, self.num_heads, self.head_size).transpose(1, 2) for x in (q, k, v)]

    def from_heads(self, context, unpadded=None):
        # (B, h, T, d) -> (B, T, H): the heads side by side; with `unpadded`, (N, H) again
        context = context.transpose(1, 2).flatten(2)
        return context if unpadded is None else unpadded.unpad(context)

    def forward(self, x, additive_mask, unpadded=None):
        # x: (B, T, H); additive_mask: (B, 1, 1, T), 0 where a key is a real token and a very
        # negative number where it is padding, so that padding gets probability ~0 (exp(-big));
        # None where no sequence has padding. (With the speed device `unpadded`, x is (N, H):
        # the N real tokens only, see Unpadded.)
        if self.use_sdpa and fused_attention_applies(self, x):
            return fused_attention(self, x, additive_mask, unpadded)  # the same numbers (a speed device)
        q, k, v = self.to_heads(self.query(x), self.key(x), self.value(x), unpadded)         # 3 x (B, h, T, d)
        # scores[b, head, i, j] = q_i . k_j / sqrt(d) + mask_j                              (B, h, T, T)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_size)
        if additive_mask is not None:
            scores = scores + additive_mask
        # each query's weights over the keys sum to one                                    (B, h, T, T)
        probabilities = self.attention_dropout(scores.softmax(dim=-1))
        # weighted sum of the values                                                       (B, h, T, d)
        context = probabilities @ v
        # concatenate the heads, then mix them with W_o                                    (B, T, H)
        return self.output(self.from_heads(context, unpadded))


class Layer(nn.Module):
    """One post-LN Transformer layer, as in BERT (the LayerNorm comes AFTER each residual add).

        x = LayerNorm(x + Dropout(SelfAttention(x)))
        x = LayerNorm(x + Dropout(W_2 GELU(W_1 x)))
    """

    def __init__(self, config):
        super().__init__()
        self.attention = SelfAttention(config)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.feed_forward_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.feed_forward_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.output_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.dropout)

    def forward(self, x, additive_mask, unpadded=None):
        x = self.attention_norm(x + self.dropout(self.attention(x, additive_mask, unpadded)))
        # BERT's GELU is the exact one, x * Phi(x), not the tanh approximation.
        feed_forward = self.feed_forward_out(F.gelu(self.feed_forward_in(x)))
        return self.output_norm(x + self.dropout(feed_forward))


class Encoder(nn.Module):
    """BERT without heads: embeddings, L layers, and the pooler (dense + tanh on [CLS])."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_layers))
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, input_ids, segment_ids=None, attention_mask=None, unpadded=None):
        """input_ids (B, T) -> (sequence output (B, T, H), pooled [CLS] output (B, H)).

        attention_mask (B, T) is True/1 at real tokens and False/0 at padding.
        unpadded: the speed device Unpadded(attention_mask), or None (the reading path).
        """
        if segment_ids is None:
            segment_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, segment_ids)
        additive_mask = None  # attention_mask None: no padding, nothing to mask
        if attention_mask is not None:
            # (B, T) -> (B, 1, 1, T): broadcast over heads and queries. The most negative finite
            # number of the dtype (not -inf) keeps an all-padding row from producing NaN.
            additive_mask = torch.zeros(attention_mask.shape, dtype=x.dtype, device=x.device)
            additive_mask = additive_mask.masked_fill(~attention_mask.bool(), torch.finfo(x.dtype).min)
            additive_mask = additive_mask[:, None, None, :]
        if unpadded is not None:
            x = unpadded.unpad(x)  # (N, H): the layers' position-wise parts then skip the padding
        for layer in self.layers:
            x = layer(x, additive_mask, unpadded)
        if unpadded is not None:
            x = unpadded.pad(x)  # (B, T, H), zeros at padding
        pooled = torch.tanh(self.pooler(x[:, 0]))  # [CLS] is always position 0
        return x, pooled


def init_weights(module, std):
    """BERT's initialisation: N(0, std) for weights, zeros for biases, LayerNorm = identity."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------
# E4: the masked-language-modelling loss, term by term
# ----------------------------------------------------------------------------------------


def mlm_loss(scores, targets, num_masked_total=None):
    """E4, written out.

        L_MLM(theta) = E_{x ~ U} [ sum_{t in M} log( exp(s(x_t | x~)) / sum_{x' in V} exp(s(x' | x~)) ) ]

    scores:  (N, V) s_theta(x' | x~) for every vocabulary entry x', at the N masked positions
             of the batch (only those: the set M of every sequence, concatenated).
    targets: (N,)   the original token x_t at each masked position.
    Returns the NEGATIVE of E4's quantity (a loss to minimise), normalised per masked token.

    Normalisation: we divide the sum over all masked tokens of the batch by their number, i.e.
    the mean of -log P(x_t | x~) over masked tokens (what BERT and `transformers` report). E4's
    expectation over sequences of a per-sequence sum differs from this only by the constant
    factor E|M| (~15% of the length); per-token keeps the loss on the ln|V| scale at any length.
    With gradient accumulation pass `num_masked_total`, the number of masked tokens in ALL
    micro-batches: summing the returned losses then equals the loss of one big batch exactly
    (averaging per-micro-batch means would weight tokens unequally when counts differ).
    """
    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()  # the softmax over V in float32 even under bf16 autocast
    # log sum_{x' in V} exp(s(x' | x~)): the log of the softmax's denominator        (N,)
    log_normaliser = torch.logsumexp(scores, dim=-1)
    # s(x_t | x~): the score of the true token                                       (N,)
    true_scores = scores.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1)
    # log P(x_t | x~) = s(x_t | x~) - log sum_{x'} exp(s(x' | x~))  (log of the softmax) (N,)
    log_probabilities = true_scores - log_normaliser
    # sum over t in M (over every sequence of the batch), then the mean over the corpus. A target
    # IGNORE_INDEX (a padding slot of the fixed-shape path, gather_fixed_predictions) adds nothing.
    in_m = targets != IGNORE_INDEX
    if num_masked_total is None:
        num_masked_total = in_m.sum().clamp(min=1)  # a tensor: computing it never waits for a GPU
    else:
        num_masked_total = max(num_masked_total, 1)
    return -torch.where(in_m, log_probabilities, 0.0).sum() / num_masked_total


# ----------------------------------------------------------------------------------------
# Heads and the two complete models
# ----------------------------------------------------------------------------------------


class MLMHead(nn.Module):
    """hidden -> dense -> GELU -> LayerNorm -> decoder (tied to the token embedding) + bias."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden, token_embedding):
        # hidden: (N, H) at the masked positions only -> scores s_theta: (N, V)
        # The decoder's weight IS the input embedding matrix (weight tying, as in BERT): the
        # score of token x' is the dot product of the transformed hidden state with x''s embedding.
        transformed = self.layer_norm(F.gelu(self.dense(hidden)))
        if transformed.is_cuda:  # the same scores, the matmul at a GPU-friendly size (a speed device)
            return scores_over_padded_vocabulary(transformed, token_embedding, self.bias)
        return transformed @ token_embedding.t() + self.bias


class PreTrainingModel(nn.Module):
    """Encoder + MLM head + NSP head. Its loss is B3: L = L_MLM + nsp_weight * L_NSP."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.mlm_head = MLMHead(config)
        self.nsp_head = nn.Linear(config.hidden_size, 2)
        init_weights(self, config.initializer_range)

    def mlm_scores(self, sequence_output, mlm_labels, sparse=True):
        """s_theta at the masked positions: (N, V) for the N positions with a label."""
        masked_positions = mlm_labels != IGNORE_INDEX  # (B, T) bool: the set M of each sequence
        if sparse:
            # Gather first, then project to V: the (B, T, V) tensor is never built. Only ~15% of
            # positions have a label, so this skips ~85% of the largest matmul of the model.
            return self.mlm_head(sequence_output[masked_positions], self.encoder.embeddings.token.weight)
        all_scores = self.mlm_head(sequence_output, self.encoder.embeddings.token.weight)  # (B, T, V)
        return all_scores[masked_positions]

    def forward(self, input_ids, segment_ids, attention_mask, mlm_labels, nsp_labels=None,
                nsp_weight=1.0, num_masked_total=None, sparse=True, max_predictions=None, unpadded=None):
        """Returns (total loss, MLM loss, NSP loss or None). Losses only: see mlm_scores for logits.
        Two speed devices, the same loss: max_predictions (gather_fixed_predictions) and unpadded
        (Unpadded: both losses read real positions only, so padding need not be computed)."""
        sequence_output, pooled = self.encoder(input_ids, segment_ids, attention_mask, unpadded)
        if max_predictions is None:
            scores = self.mlm_scores(sequence_output, mlm_labels, sparse)
            targets = mlm_labels[mlm_labels != IGNORE_INDEX]
        else:
            hidden, targets = gather_fixed_predictions(sequence_output, mlm_labels, max_predictions)
            scores = self.mlm_head(hidden, self.encoder.embeddings.token.weight)
        loss_mlm = mlm_loss(scores, targets, num_masked_total)
        if nsp_labels is None or nsp_weight == 0:
            return loss_mlm, loss_mlm, None
        # B2: NSP is a 2-way classification of the pooled [CLS] vector (0 = IsNext, 1 = NotNext)
        loss_nsp = F.cross_entropy(self.nsp_head(pooled).float(), nsp_labels)
        # B3: the pre-training loss is a weighted sum of the two
        return loss_mlm + nsp_weight * loss_nsp, loss_mlm, loss_nsp


class Classifier(nn.Module):
    """B4 / section 3.2: the pre-trained encoder with its output layer replaced by a classifier.

    The sentence vector the new linear layer reads (`pool`):
      "cls"   BERT's: the pooler (dense + tanh) on [CLS]. The "head" that fine-tuning trains is
              then the pooler plus the linear layer: after NSP the pooler was shaped for another
              task, and BERT's fine-tuning retrains it.
      "mean"  the mean of the last layer over the real tokens (Sentence-BERT's pooling): a frozen
              encoder's sentence features without the NSP-trained pooler in between.
    The encoder is embeddings + layers.
    """

    def __init__(self, config, num_labels, pool="cls"):
        super().__init__()
        if pool not in POOLINGS:
            raise ValueError(f"pool must be one of {', '.join(POOLINGS)}, not {pool!r}")
        self.config, self.pool = config, pool
        self.encoder = Encoder(config)
        self.dropout = Dropout(config.dropout)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        init_weights(self, config.initializer_range)
        if pool == "mean":
            self.encoder.pooler.requires_grad_(False)  # not on the path: it keeps its values, and trains nothing

    def forward(self, input_ids, segment_ids=None, attention_mask=None):
        # with padding, the encoder computes on the real tokens only: the pooled vector reads no
        # padding position, so the scores are the reading path's (a speed device: Unpadded)
        padded = attention_mask is not None and not bool(attention_mask.all())
        unpadded = Unpadded(attention_mask) if padded else None
        sequence_output, pooled = self.encoder(input_ids, segment_ids, attention_mask, unpadded)  # (B, T, H), (B, H)
        if self.pool == "mean":
            # sum over the real tokens / their number: padding never enters the sentence vector   (B, H)
            real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            real = real[:, :, None].to(sequence_output.dtype)
            pooled = (sequence_output * real).sum(dim=1) / real.sum(dim=1).clamp(min=1)
        return self.classifier(self.dropout(pooled))  # (B, num_labels): f_phi(x) of E3

    def add_low_rank_updates(self, rank):
        """C7 (LoRA's choice): a LowRankUpdate on every layer's query and value projection."""
        for layer in self.encoder.layers:
            layer.attention.query = LowRankUpdate(layer.attention.query, rank)
            layer.attention.value = LowRankUpdate(layer.attention.value, rank)

    def merge_low_rank_updates(self):
        """Every LowRankUpdate replaced by its merged nn.Linear: the state dict's names are BERT's again."""
        for layer in self.encoder.layers:
            for name in ("query", "value"):
                if isinstance(getattr(layer.attention, name), LowRankUpdate):
                    setattr(layer.attention, name, getattr(layer.attention, name).merged())


POOLINGS = ("cls", "mean")


# ----------------------------------------------------------------------------------------
# C7, per-task storage: low-rank updates of a frozen encoder (LoRA, Hu et al. 2021)
# ----------------------------------------------------------------------------------------


class LowRankUpdate(nn.Module):
    """A frozen linear layer plus a trainable low-rank update:

        y = W x + b + B (A x)        W: (out, in) frozen; A: (r, in), B: (out, r) trained

    B starts at zero, so at the start the layer computes exactly what the frozen one did; a task
    then stores r * (in + out) numbers per layer instead of out * in. merged() folds the update
    back: W' = W + B A, one plain nn.Linear, so the fine-tuned model is an ordinary checkpoint."""

    def __init__(self, linear, rank):
        super().__init__()
        self.linear = linear.requires_grad_(False)
        self.A = nn.Parameter(torch.randn(rank, linear.in_features) / math.sqrt(linear.in_features))
        self.B = nn.Parameter(torch.zeros(linear.out_features, rank))

    def forward(self, x):
        return self.linear(x) + (x @ self.A.t()) @ self.B.t()

    def merged(self):
        merged = nn.Linear(self.linear.in_features, self.linear.out_features)
        with torch.no_grad():
            merged.weight.copy_(self.linear.weight + self.B @ self.A)
            merged.bias.copy_(self.linear.bias)
        return merged.to(self.linear.weight.device)


def count_parameters(module, trainable_only=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# ----------------------------------------------------------------------------------------
# Speed devices, set apart: each gives the reading path's result, faster (tested equal)
# ----------------------------------------------------------------------------------------


class Dropout(nn.Module):
    """Dropout: in training, zero each entry with probability p and scale the others by 1/(1-p)
    (so the expected value is unchanged); in eval, the identity -- nn.Dropout's result.

    Speed device: on the CPU, torch's bernoulli_ draws one random number per entry, a large
    share of a small model's training step (docs/performance.md). Here one 64-bit random number
    gives four 16-bit uniforms; p is rounded to a multiple of 1/65536 (0.1 -> 0.100006).
    Elsewhere (CUDA, MPS: fast generators) it is F.dropout itself. tests/test_model.py checks
    the kept fraction, the scaling, the gradient and the independence of neighbouring entries."""

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


def fused_attention(attention, x, additive_mask, unpadded=None):
    """SelfAttention.forward in torch's fused kernel (F.scaled_dot_product_attention: the
    softmax(Q K^T / sqrt(d) + mask) V lines in one kernel that never stores the (B, h, T, T)
    scores), with Q, K and V from one matmul where fused_projections_apply. tests/test_model.py
    checks that it equals the written-out lines, in outputs and gradients."""
    if fused_projections_apply(attention, x):
        q, k, v = fused_projections(attention, x)                                          # 3 x (B, T, H)
    else:
        q, k, v = attention.query(x), attention.key(x), attention.value(x)
    q, k, v = attention.to_heads(q, k, v, unpadded)                                         # 3 x (B, h, T, d)
    dropout_p = attention.attention_dropout.p if attention.training else 0.0
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask, dropout_p=dropout_p)
    return attention.output(attention.from_heads(context, unpadded))


def fused_attention_applies(attention, x):
    """With config.attention == "sdpa", SelfAttention uses torch's fused kernel -- except when
    training on the CPU with attention dropout (SDPA has no fused CPU kernel with dropout: it falls
    back to the written-out lines with torch's slower dropout) or in bf16 (the CPU kernel's
    backward in bf16 is slower than the written-out lines; docs/performance.md measures it)."""
    training_on_cpu = attention.training and x.device.type == "cpu"
    return not (training_on_cpu and (attention.attention_dropout.p > 0 or torch.is_autocast_enabled("cpu")))


def fused_projections(attention, x):
    """Q, K and V from ONE matmul, x W_qkv^T + b_qkv with W_qkv = [W_q; W_k; W_v] (3H, H): one
    large matmul keeps a GPU busier than three small ones. The weights stay three nn.Linear
    (the names BERT's checkpoints use); their concatenation is cheap next to the matmul."""
    weight = torch.cat([attention.query.weight, attention.key.weight, attention.value.weight])   # (3H, H)
    bias = torch.cat([attention.query.bias, attention.key.bias, attention.value.bias])           # (3H,)
    return F.linear(x, weight, bias).chunk(3, dim=-1)                                          # 3 x (B, T, H)


def fused_projections_apply(attention, x):
    """In fused_attention on CUDA, and only while query, key and value are plain nn.Linear
    (finetune --lora wraps two of them). On the CPU the three matmuls are as fast, and the
    numbers stay the reading path's."""
    return (x.is_cuda
            and all(type(m) is nn.Linear for m in (attention.query, attention.key, attention.value)))


def scores_over_padded_vocabulary(transformed, token_embedding, bias, multiple=64):
    """MLMHead's scores, transformed E^T + b (N, V), with E's V rows padded by zero rows up to a
    multiple of 64 for the matmul and the extra columns cut off before the bias: GPU matmul
    kernels are fastest when each dimension is a multiple of 64, and BERT's V = 30522 is not even
    a multiple of 8. The padding exists only inside this call: the embedding, checkpoints and
    exports keep V rows. tests/test_model.py checks the scores and gradients equal the plain ones."""
    vocab_size = token_embedding.shape[0]
    padded = F.pad(token_embedding, (0, 0, 0, -vocab_size % multiple))  # (V', H), V' a multiple of 64
    return (transformed @ padded.t())[..., :vocab_size] + bias          # (N, V)


class Unpadded:
    """Where a padded batch's real tokens are, so that the encoder's position-wise parts -- every
    matmul but attention's two, the LayerNorms, GELU, dropout, the residual adds -- run on the N
    real tokens alone, (N, H), instead of on all B x T positions. Real text's documents are often
    short, and then most of a batch is padding (docs/performance.md measures how much); the
    reading path computes on it and throws the result away. Attention itself still runs in the
    (B, h, T, d) layout with the padding masked, as MosaicBERT's unpadding does without a
    variable-length kernel. The real positions' outputs are the reading path's
    (tests/test_model.py); the padding positions' are zero, so it serves where only real
    positions are read: pre-training (MLM targets and [CLS] are real tokens: data.mask_tokens
    never picks padding) and the classifier ([CLS], or the mean over real tokens).
    Built from a mask on the CPU, where pretrain's data is, nothing waits for a GPU; from a mask
    on a GPU (the classifier's), finding the real tokens waits for it once."""

    def __init__(self, attention_mask, device=None):
        mask = torch.as_tensor(attention_mask).bool()                    # (B, T)
        self.shape = tuple(mask.shape)
        index = mask.flatten().nonzero().squeeze(1)                      # (N,) real positions in B*T
        if index.device.type == "cpu" and device is not None and torch.device(device).type == "cuda":
            index = index.pin_memory()                                   # so the copy does not block
        self.index = index.to(device or index.device, non_blocking=True)

    def unpad(self, x):
        # (B, T, ...) -> (N, ...)
        return x.flatten(0, 1).index_select(0, self.index)

    def pad(self, x):
        # (N, ...) -> (B, T, ...), zeros at padding
        padded = x.new_zeros((self.shape[0] * self.shape[1], *x.shape[1:]))
        return padded.index_copy(0, self.index, x).view(*self.shape, *x.shape[1:])


def gather_fixed_predictions(sequence_output, mlm_labels, max_predictions):
    """The hidden states and targets at the masked positions, in a FIXED shape: max_predictions
    (P) slots per sequence, as BERT's own data does (max_predictions_per_seq), the unused slots
    with target IGNORE_INDEX (mlm_loss skips them). The boolean index of mlm_scores gives a shape
    that depends on the data, so the CPU must wait for the GPU to learn it every step; here
    nothing waits, and every step has the same shapes (what torch.compile and CUDA graphs want).
    P must be at least the largest masked count of a sequence (data.MaskingRule.max_predictions).
    tests/test_model.py checks the loss and gradients equal the reading path's.
    Returns (hidden (B * P, H), targets (B * P,))."""
    in_m = mlm_labels != IGNORE_INDEX                                                   # (B, T)
    max_predictions = min(max_predictions, mlm_labels.shape[1])
    # the masked positions first (key 1), then any others (key 0, their targets IGNORE_INDEX)
    positions = in_m.to(sequence_output.dtype).topk(max_predictions, dim=1).indices   # (B, P)
    hidden = sequence_output.gather(1, positions[:, :, None].expand(-1, -1, sequence_output.shape[-1]))
    return hidden.flatten(0, 1), mlm_labels.gather(1, positions).flatten()


# ----------------------------------------------------------------------------------------
# Self-check: python model.py
# ----------------------------------------------------------------------------------------

if __name__ == "__main__":
    torch.manual_seed(0)
    config = make_config("tiny", vocab_size=1000, max_positions=64)
    model = PreTrainingModel(config).eval()
    batch, length = 4, 32
    input_ids = torch.randint(5, config.vocab_size, (batch, length))
    attention_mask = torch.ones(batch, length, dtype=torch.bool)
    attention_mask[1, 20:] = False  # the second sequence is padded after 20 tokens
    segment_ids = (torch.arange(length) >= length // 2).long().expand(batch, -1)
    mlm_labels = torch.full((batch, length), IGNORE_INDEX)
    mlm_labels[:, 3:8] = input_ids[:, 3:8]
    nsp_labels = torch.tensor([IS_NEXT, NOT_NEXT, IS_NEXT, NOT_NEXT])
    sequence_output, pooled = model.encoder(input_ids, segment_ids, attention_mask)
    print(f"config: {config}")
    print(f"parameters: {count_parameters(model):,} (encoder {count_parameters(model.encoder):,})")
    print(f"input {tuple(input_ids.shape)} -> sequence output {tuple(sequence_output.shape)}, pooled {tuple(pooled.shape)}")
    scores = model.mlm_scores(sequence_output, mlm_labels)
    print(f"MLM scores at the {int((mlm_labels != IGNORE_INDEX).sum())} masked positions: {tuple(scores.shape)}")
    with torch.no_grad():
        total, loss_mlm, loss_nsp = model(input_ids, segment_ids, attention_mask, mlm_labels, nsp_labels)
    print(f"MLM loss at init {loss_mlm.item():.3f}  vs  ln|V| = {math.log(config.vocab_size):.3f}  (uniform guess)")
    print(f"NSP loss at init {loss_nsp.item():.3f}  vs  ln 2   = {math.log(2):.3f}")
    assert abs(loss_mlm.item() - math.log(config.vocab_size)) < 0.5, "MLM loss at init should be ~ln|V|"
    reference = F.cross_entropy(scores, mlm_labels[mlm_labels != IGNORE_INDEX])
    assert torch.allclose(mlm_loss(scores, mlm_labels[mlm_labels != IGNORE_INDEX]), reference, atol=1e-6)
    print("E4 written out == F.cross_entropy: ok")
    sdpa_config = replace(config, attention="sdpa")
    fused = PreTrainingModel(sdpa_config).eval()
    fused.load_state_dict(model.state_dict())
    with torch.no_grad():
        difference = (fused.encoder(input_ids, segment_ids, attention_mask)[0] - sequence_output).abs().max().item()
    print(f"explicit vs fused attention: max difference {difference:.2e}")
    assert difference < 1e-5
    with torch.no_grad():
        unpadded = model.encoder(input_ids, segment_ids, attention_mask, Unpadded(attention_mask))[0]
    difference = (unpadded - sequence_output)[attention_mask].abs().max().item()
    print(f"real tokens only (Unpadded) vs all positions, at the real ones: max difference {difference:.2e}")
    assert difference < 1e-5
    print("self-check passed")
