"""Make a standard Hugging Face `BertForSequenceClassification` to try sti on "your own model".

It starts from the cached MiniLM base (`sti data` or `make demo` fetches it), keeps the
encoder and BERT's pooler as they are, and fits only the classifier, a linear probe on the
pooler's output (dense + tanh on [CLS]), on 3000 training snippets: about a minute on two
cores. The result is saved with `save_pretrained`, as any transformers user's model would
be, and scored by transformers on the dev split so that sti's answers can be compared.

    python examples/hf_classifier.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers

from sti import ensure_model, load_split


def pooled(model, tok, texts, batch=64):
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tok(texts[i:i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
            out.append(model.bert(**enc).pooler_output)
    return torch.cat(out)


def main(out: Path) -> None:
    torch.manual_seed(0)
    base = ensure_model()
    labels = {0: "negative", 1: "positive"}
    model = transformers.BertForSequenceClassification.from_pretrained(
        base, num_labels=2, id2label=labels, label2id={v: k for k, v in labels.items()}).eval()
    tok = transformers.AutoTokenizer.from_pretrained(base)
    train = load_split("train")[:3000]
    x, y = pooled(model, tok, [e.text for e in train]), torch.tensor([e.label for e in train])
    head = model.classifier
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(300):  # full-batch logistic regression on the frozen pooler outputs
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(x), y).backward()
        opt.step()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    dev = load_split("dev")
    pred = head(pooled(model, tok, [e.text for e in dev])).argmax(-1)
    acc = (pred == torch.tensor([e.label for e in dev])).float().mean().item()
    print(f"wrote {out}: BertForSequenceClassification, transformers' dev accuracy {acc:.4f} ({len(dev)} snippets)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
