"""Perplexity of a causal language model on texts, as a Hugging Face ``evaluate`` metric.

Loaded by path (``evaluate.load(<this file>)``) so it works offline; the Hub's own perplexity
metric loads a model by id and cannot score a model already in memory. Perplexity is taken over
all predicted tokens of all texts together: exp(total negative log-likelihood / tokens), each text
scored on its own (no packing), the first token predicted from nothing only when the tokenizer
adds a BOS token.
"""

import datasets
import evaluate
import torch

_DESCRIPTION = "exp of the mean per-token negative log-likelihood of the texts under the model"
_KWARGS = """
Args:
    predictions: the texts (list of str).
    model: a transformers causal LM (in memory).
    tokenizer: its tokenizer.
    batch_size: texts per forward pass (default 8).
    max_length: longer texts are cut to their first max_length tokens (default 512).
Returns:
    perplexity, mean_nll (nats per token), tokens, per_text_nll (mean nats per token of each text).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
                                   features=datasets.Features({"predictions": datasets.Value("string")}))

    def _compute(self, predictions, model, tokenizer, batch_size=8, max_length=512):
        device = next(model.parameters()).device
        total_nll, total_tokens, per_text = 0.0, 0, []
        was_training = model.training
        model.eval()
        side = tokenizer.padding_side
        tokenizer.padding_side = "right"
        try:
            for start in range(0, len(predictions), batch_size):
                batch = tokenizer(list(predictions[start:start + batch_size]), return_tensors="pt", padding=True,
                                  truncation=True, max_length=max_length).to(device)
                with torch.no_grad():
                    logits = model(**batch).logits[:, :-1].float()
                targets = batch["input_ids"][:, 1:]
                mask = batch["attention_mask"][:, 1:].float()
                nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none") * mask
                for row, row_mask in zip(nll, mask):
                    n = int(row_mask.sum().item())
                    per_text.append(row.sum().item() / max(n, 1))
                total_nll += nll.sum().item()
                total_tokens += int(mask.sum().item())
        finally:
            tokenizer.padding_side = side
            model.train(was_training)
        mean = total_nll / max(total_tokens, 1)
        return {"perplexity": float(torch.tensor(mean).exp()), "mean_nll": mean, "tokens": total_tokens,
                "per_text_nll": per_text}
