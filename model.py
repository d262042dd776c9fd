"""A tiny BERT, written so that it can be read in one sitting.

The architecture is BERT's exactly (Devlin et al. 2018; the same computation as
`transformers`' BertModel): embeddings -> post-LN Transformer encoder layers -> pooler,
with three heads on top:

    MLM head         (B1, E4)  predicts the tokens hidden behind [MASK]
    NSP head         (B2)      predicts whether segment B follows segment A
    classifier head  (B4, E3)  the task head that fine-tuning puts in place of the above

Equation numbers (E1-E4, B1-B4) refer to docs/equations.md. `python model.py` checks itself.

Tensor shape legend used in comments:
    B batch size, T sequence length, H hidden size, h heads, d = H / h per-head size,
    V vocabulary size, I intermediate (feed-forward) size, N number of masked tokens.

The speed devices live in fast.py, each tested equal to the lines here, behind two switches:
SelfAttention's `if self.use_sdpa or ...:` (the fused kernel, or real tokens only) and
PreTrainingModel.forward's `speed` (None: the lines below). fast.Dropout is nn.Dropout's law.
"""

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import fast
from common import IGNORE_INDEX, IS_NEXT, NOT_NEXT  # BERT's label conventions


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
    # "explicit" = the formula written out; "sdpa" = torch's fused kernel
    attention: str = "explicit"
    # C8: no position attends to a later one (GPT-style, `pretrain --objective causal`)
    causal: bool = False
    head_size: int = None  # C7: d (None: H / h); prune --unit heads keeps d, so h * d < H

    def __post_init__(self):
        if self.head_size is None and self.hidden_size % self.num_heads != 0:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads "
                             f"{self.num_heads}")
        if self.attention not in ("explicit", "sdpa"):
            raise ValueError(f"attention must be 'explicit' or 'sdpa', not {self.attention!r}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_positions", "type_vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        heads_size = self.num_heads * (self.head_size or 1)
        if self.head_size is not None and not 0 < heads_size <= self.hidden_size:
            raise ValueError(f"head_size {self.head_size} x num_heads {self.num_heads} must be "
                             f"in [1, hidden_size {self.hidden_size}]")

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
        self.dropout = fast.Dropout(config.dropout)

    def forward(self, input_ids, segment_ids=None, positions=None):
        # input_ids, segment_ids: (B, T) -> (B, T, H); no segment ids: every token in segment "A";
        # positions 0..T-1 unless given (B, T): a packed row restarts them (fast.pack_pairs)
        if segment_ids is None:
            segment_ids = torch.zeros_like(input_ids)
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.token(input_ids) + self.position(positions) + self.segment(segment_ids)
        return self.dropout(self.layer_norm(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention: softmax(Q K^T / sqrt(d) + mask) V, per head, then W_o."""

    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_size = config.head_size or config.hidden_size // config.num_heads
        self.use_sdpa = config.attention == "sdpa"
        heads_size = self.num_heads * self.head_size  # h * d: H, unless heads were removed
        self.query = nn.Linear(config.hidden_size, heads_size)
        self.key = nn.Linear(config.hidden_size, heads_size)
        self.value = nn.Linear(config.hidden_size, heads_size)
        self.output = nn.Linear(heads_size, config.hidden_size)
        self.attention_dropout = fast.Dropout(config.attention_dropout)

    def split_heads(self, x):
        # (B, T, H) -> (B, h, T, d): each head attends with its own d = H / h dimensions
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_size).transpose(1, 2)

    def attend(self, q, k, v, additive_mask):
        # scores[b, head, i, j] = q_i . k_j / sqrt(d) + mask_j                        (B, h, T, T)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_size)
        if additive_mask is not None:
            scores = scores + additive_mask
        # each query's weights over the keys sum to one                              (B, h, T, T)
        probabilities = self.attention_dropout(scores.softmax(dim=-1))
        # weighted sum of the values                                                 (B, h, T, d)
        return probabilities @ v

    def forward(self, x, additive_mask):
        # x: (B, T, H); additive_mask: (B, 1, 1, T), 0 where a key is a real token and a very
        # negative number where it is padding, so that padding gets probability ~0 (exp(-big));
        # None where no sequence has padding. The same numbers, faster: fast.py
        if self.use_sdpa or isinstance(additive_mask, fast.Unpadded):
            return fast.attention(self, x, additive_mask)
        q = self.split_heads(self.query(x))                                          # (B, h, T, d)
        k = self.split_heads(self.key(x))                                            # (B, h, T, d)
        v = self.split_heads(self.value(x))                                          # (B, h, T, d)
        context = self.attend(q, k, v, additive_mask)                                # (B, h, T, d)
        # concatenate the heads, then mix them with W_o                              (B, T, H)
        return self.output(context.transpose(1, 2).flatten(2))


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
        self.dropout = fast.Dropout(config.dropout)

    def forward(self, x, additive_mask):
        x = self.attention_norm(x + self.dropout(self.attention(x, additive_mask)))
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

    def forward(self, input_ids, segment_ids=None, attention_mask=None):
        """input_ids (B, T) -> (sequence output (B, T, H), pooled [CLS] output (B, H)).
        attention_mask (B, T) is True/1 at real tokens and False/0 at padding."""
        x = self.embeddings(input_ids, segment_ids)
        # the causal mask is needed even without padding
        if self.config.causal and attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        additive_mask = self.additive_mask(attention_mask, x.dtype)
        for layer in self.layers:
            x = layer(x, additive_mask)
        return x, self.pool(x)

    def additive_mask(self, attention_mask, dtype):
        # (B, T) -> (B, 1, 1, T): broadcast over heads and queries; None: no padding, nothing to
        # mask. The most negative finite number of the dtype (not -inf) keeps an all-padding row
        # from producing NaN.
        if attention_mask is None:
            return None
        additive_mask = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
        additive_mask = additive_mask.masked_fill(~attention_mask.bool(), torch.finfo(dtype).min)
        if self.config.causal:
            return causal_additive_mask(additive_mask)
        return additive_mask[:, None, None, :]

    def pool(self, x, cls_positions=None):
        # [CLS] is position 0 -- or, packed (fast.pack_pairs), each pair's [CLS] in the flat rows
        cls = x[:, 0] if cls_positions is None else x.flatten(0, 1)[cls_positions]
        return torch.tanh(self.pooler(cls))                                         # (B, H)


def causal_additive_mask(padding_mask):
    """C8: the padding mask (B, T) combined with the causal one -> (B, 1, T, T): query i may attend
    to key j only if j <= i AND j is a real token. mask[b, 0, i, j] = min where j > i, so that
    P(x_i | x_<i) is read off position i - 1, which has not seen x_i. masked_fill (not +) keeps a
    key that is both padding and future at min, never -inf."""
    length = padding_mask.shape[-1]
    future = torch.ones(length, length, dtype=torch.bool, device=padding_mask.device)
    future = future.triu(diagonal=1)                                     # (T, T): j > i
    combined = padding_mask[:, None, None, :].expand(-1, 1, length, -1)  # (B, 1, T, T)
    return combined.masked_fill(future, torch.finfo(padding_mask.dtype).min)


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

        L_MLM(theta) = E_{x ~ U} [ sum_{t in M}
                           log( exp(s(x_t | x~)) / sum_{x' in V} exp(s(x' | x~)) ) ]

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
# C8: the causal (GPT-style) loss, term by term -- E2 computed exactly, by the chain rule
# ----------------------------------------------------------------------------------------


def causal_lm_loss(scores, input_ids, attention_mask=None):
    """The next-token loss, written out beside E4. The chain rule factors E2's likelihood exactly:

        log P(x) = sum_{t=1}^{T-1} log P(x_t | x_<t)          (x_0 = [CLS] is given, not predicted)
        L_causal(theta) = - sum_t log( exp(s(x_t | x_<t)) / sum_{x' in V} exp(s(x' | x_<t)) )

    where s(. | x_<t) is the score row at position t - 1, which under the causal mask has seen
    x_0 .. x_{t-1} only. E4 predicts ~15% of tokens from both sides; this predicts EVERY token from
    its left. scores: (B, T, V) at every position; input_ids, attention_mask: (B, T). Returns the
    mean of -log P(x_t | x_<t) over the real predicted tokens (a target that is padding adds
    nothing): exp of it is the perplexity.
    """
    scores = scores[:, :-1].float()         # the row at t - 1 predicts x_t       (B, T-1, V)
    targets = input_ids[:, 1:]                                                     # (B, T-1)
    log_normaliser = torch.logsumexp(scores, dim=-1)                               # (B, T-1)
    true_scores = scores.gather(-1, targets[..., None]).squeeze(-1)                # (B, T-1)
    log_probabilities = true_scores - log_normaliser     # log P(x_t | x_<t)         (B, T-1)
    if attention_mask is None:
        real = torch.ones_like(targets, dtype=torch.bool)
    else:
        real = attention_mask[:, 1:].bool()
    return -torch.where(real, log_probabilities, 0.0).sum() / real.sum().clamp(min=1)


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
        # hidden (N, H) at the masked positions -> s_theta (N, V). The decoder's weight IS the
        # input embedding (BERT's weight tying): s(x') = transformed hidden . embedding of x'
        return self.transform(hidden) @ token_embedding.t() + self.bias

    def transform(self, hidden):
        return self.layer_norm(F.gelu(self.dense(hidden)))                        # (N, H)


class PreTrainingModel(nn.Module):
    """Encoder + MLM head + NSP head: the scores of E4 and B2, whose weighted sum is B3's loss
    L = L_MLM + nsp_weight * L_NSP (train.pretraining_step)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.mlm_head = MLMHead(config)
        self.nsp_head = nn.Linear(config.hidden_size, 2)
        init_weights(self, config.initializer_range)

    def mlm_scores(self, sequence_output, mlm_labels):
        """s_theta at the masked positions: (N, V) for the N positions with a label. Gather first,
        then project to V: the (B, T, V) tensor is never built. Only ~15% of positions have a
        label, so this skips ~85% of the largest matmul of the model."""
        masked_positions = mlm_labels != IGNORE_INDEX  # (B, T) bool: the set M of each sequence
        token_embedding = self.encoder.embeddings.token.weight
        return self.mlm_head(sequence_output[masked_positions], token_embedding)

    def forward(self, input_ids, segment_ids, attention_mask, mlm_labels, *, with_nsp=True,
                speed=None):
        """The scores the pre-training losses are made of (train.pretraining_step writes E4 and
        B3 out): s_theta at the masked positions (N, V), their original tokens x_t (N,), and B2's
        IsNext/NotNext scores of the pooled [CLS] vector (B, 2), or None without NSP.
        speed: None (the lines below), or a fast.Speed: the same scores, faster (fast.py)."""
        if speed is None:
            # (B, T, H), (B, H)
            sequence_output, pooled = self.encoder(input_ids, segment_ids, attention_mask)
            scores = self.mlm_scores(sequence_output, mlm_labels)                # (N, V)
            targets = mlm_labels[mlm_labels != IGNORE_INDEX]                     # (N,)
        else:
            scores, targets, pooled = fast.pretraining_scores(
                self, input_ids, segment_ids, attention_mask, mlm_labels, speed)
        return scores, targets, self.nsp_head(pooled) if with_nsp else None     # ..., (B, 2)


class Classifier(nn.Module):
    """B4 / section 3.2: the pre-trained encoder with its output layer replaced by a classifier.

    The sentence vector the new linear layer reads (`pool`):
      "cls"   BERT's: the pooler (dense + tanh) on [CLS]. The "head" that fine-tuning trains is
              then the pooler plus the linear layer: after NSP the pooler was shaped for another
              task, and BERT's fine-tuning retrains it.
      "mean"  the mean of the last layer over the real tokens (Sentence-BERT's pooling): a frozen
              encoder's sentence features without the NSP-trained pooler in between.
    """

    def __init__(self, config, num_labels, pool="cls"):
        super().__init__()
        if pool not in POOLINGS:
            raise ValueError(f"pool must be one of {', '.join(POOLINGS)}, not {pool!r}")
        # C8: under a causal mask [CLS] at position 0 sees only itself (the same vector for every
        # input), so a causal encoder classifies from the mean over its real tokens
        pool = "mean" if config.causal else pool
        self.config, self.pool = config, pool
        self.encoder = Encoder(config)
        self.dropout = fast.Dropout(config.dropout)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        init_weights(self, config.initializer_range)
        if pool == "mean":
            # not on the path: it keeps its values, and trains nothing
            self.encoder.pooler.requires_grad_(False)

    def forward(self, input_ids, segment_ids=None, attention_mask=None):
        # with padding, the encoder computes on the real tokens only (fast.Unpadded): the pooled
        # vector reads no padding position, so the scores are the lines' of Encoder.forward
        if attention_mask is not None and not bool(attention_mask.all()):
            sequence_output, pooled = fast.encode_unpadded(
                self.encoder, input_ids, segment_ids, attention_mask, fast.Unpadded(attention_mask))
        else:
            # (B, T, H), (B, H)
            sequence_output, pooled = self.encoder(input_ids, segment_ids, attention_mask)
        if self.pool == "mean":
            # sum over the real tokens / their number: padding never enters the sentence vector
            real = (torch.ones_like(input_ids) if attention_mask is None else attention_mask)
            real = real[:, :, None].to(sequence_output.dtype)                       # (B, T, 1)
            pooled = (sequence_output * real).sum(dim=1) / real.sum(dim=1).clamp(min=1)  # (B, H)
        return self.classifier(self.dropout(pooled))  # (B, num_labels): f_phi(x) of E3


POOLINGS = ("cls", "mean")


def count_parameters(module, trainable_only=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


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
    print(f"config: {config}")
    print(f"parameters: {count_parameters(model):,} (encoder {count_parameters(model.encoder):,})")
    with torch.no_grad():
        scores, targets, nsp_scores = model(input_ids, segment_ids, attention_mask, mlm_labels)
    print(f"input {tuple(input_ids.shape)} -> MLM scores at the {len(targets)} masked positions "
          f"{tuple(scores.shape)}, NSP scores {tuple(nsp_scores.shape)}")
    loss_mlm, loss_nsp = mlm_loss(scores, targets), F.cross_entropy(nsp_scores, nsp_labels)
    print(f"MLM loss at init {loss_mlm.item():.3f}  "
          f"vs  ln|V| = {math.log(config.vocab_size):.3f}  (uniform guess)")
    print(f"NSP loss at init {loss_nsp.item():.3f}  vs  ln 2   = {math.log(2):.3f}")
    assert abs(loss_mlm.item() - math.log(config.vocab_size)) < 0.5, (
        "MLM loss at init should be ~ln|V|")
    assert torch.allclose(loss_mlm, F.cross_entropy(scores, targets), atol=1e-6)
    print("E4 written out == F.cross_entropy: ok (the fast paths check themselves: python fast.py)")
    print("self-check passed")
