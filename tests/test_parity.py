"""The encoder is BERT, not BERT-shaped: on the same weights (renamed by model.HF_NAMES) it
computes the same numbers as `transformers`' BertForPreTraining."""

import torch
import transformers

from model import Config, PreTrainingModel, to_hf_name


def hf_copy(ours, config):
    hf_config = transformers.BertConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_positions, type_vocab_size=config.type_vocab_size,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=config.layer_norm_eps)
    hf = transformers.BertForPreTraining(hf_config).eval()
    state = {to_hf_name(name): value for name, value in ours.state_dict().items()}
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]  # tied
    state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in name for name in missing)
    return hf


def test_same_weights_same_outputs_as_transformers():
    shapes = [dict(hidden_size=96, num_heads=6, intermediate_size=200, num_layers=2),  # 6 heads x 16
              dict(hidden_size=40, num_heads=5, intermediate_size=72, num_layers=3),
              dict(hidden_size=64, num_heads=1, intermediate_size=64, num_layers=1)]
    for seed, shape in enumerate(shapes):
        torch.manual_seed(seed)
        config = Config(vocab_size=211, max_positions=64, dropout=0.0, attention_dropout=0.0, **shape)
        ours = PreTrainingModel(config).eval()
        # non-trivial LayerNorms and biases, so that a swapped name cannot pass by accident
        with torch.no_grad():
            for name, parameter in ours.named_parameters():
                if parameter.ndim == 1:
                    parameter.add_(0.1 * torch.randn_like(parameter))
        hf = hf_copy(ours, config)
        input_ids = torch.randint(5, config.vocab_size, (4, 30))
        attention_mask = torch.ones(4, 30, dtype=torch.long)
        attention_mask[1, 17:] = 0
        attention_mask[3, 5:] = 0
        segment_ids = (torch.arange(30) >= 12).long().expand(4, -1) * attention_mask
        mlm_labels = torch.full_like(input_ids, -100)
        mlm_labels[:, 2:5] = input_ids[:, 2:5]
        nsp_labels = torch.tensor([0, 1, 1, 0])
        with torch.no_grad():
            theirs = hf(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=segment_ids,
                        labels=mlm_labels, next_sentence_label=nsp_labels, output_hidden_states=True)
            sequence, pooled = ours.encoder(input_ids, segment_ids, attention_mask.bool())
            total, _, _ = ours(input_ids, segment_ids, attention_mask.bool(), mlm_labels, nsp_labels)
            scores = ours.mlm_scores(sequence, mlm_labels)
        real = attention_mask.bool()
        assert torch.allclose(sequence[real], theirs.hidden_states[-1][real], atol=1e-5)
        assert torch.allclose(scores, theirs.prediction_logits[mlm_labels != -100], atol=1e-5)
        assert torch.allclose(ours.nsp_head(pooled), theirs.seq_relationship_logits, atol=1e-5)
        assert torch.allclose(total, theirs.loss, atol=1e-5)  # BERT's loss = MLM + NSP (B3, lambda = 1)
