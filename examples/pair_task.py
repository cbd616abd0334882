"""A sentence-pair task from the built-in data, written as user files, to try sti on pairs:
a movie snippet (the premise) and a claim about it (the hypothesis), "a good film" or "a bad
film" and their paraphrases; the label says whether the claim holds (yes / no). Neither text
alone answers it: the model must read both.

    .venv/bin/python examples/pair_task.py /tmp/pairs     # train.tsv, dev.jsonl, test.csv

Each split takes its snippets from the same built-in split, so the test pairs hold only test
snippets; claims are drawn at random, half of each kind. The three files use the three
formats sti reads.
"""

import csv
import json
import random
import sys
from pathlib import Path

from sti.data import load_split

CLAIMS = {0: ("a bad film", "the movie is poor", "not worth watching", "a disappointing picture"),
          1: ("a good film", "the movie is great", "well worth watching", "an impressive picture")}


def pairs(split: str, seed: int) -> list[tuple[str, str, str]]:
    rng = random.Random(seed)
    out = []
    for e in load_split(split):
        claimed = rng.randrange(2)
        out.append((e.text, rng.choice(CLAIMS[claimed]), "yes" if claimed == e.label else "no"))
    return out


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    train, dev, test = (pairs(split, seed) for seed, split in enumerate(("train", "dev", "test")))
    with open(out / "train.tsv", "w", encoding="utf-8") as f:
        f.write("sentence1\tsentence2\tlabel\n")
        for a, b, label in train:
            f.write(f"{a}\t{b}\t{label}\n")
    with open(out / "dev.jsonl", "w", encoding="utf-8") as f:
        for a, b, label in dev:
            f.write(json.dumps({"premise": a, "hypothesis": b, "label": label}) + "\n")
    with open(out / "test.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "text_pair", "label"])
        w.writerows(test)
    print(f"wrote {out}/train.tsv ({len(train)}), dev.jsonl ({len(dev)}), test.csv ({len(test)})")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/pairs"))
