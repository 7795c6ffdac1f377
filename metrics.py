"""Ranking metrics with one relevant item per user (leave-one-out), as in P5/POD/RDRec/HDRec.

rank is the 0-based position of the relevant item among all ranked items (ranking.rank_targets), or None / -1 when
it is not ranked (past a model's top-k list). HR@k = 1 if rank < k.  NDCG@k = 1 / log2(rank + 2) if rank < k (the
ideal DCG is 1 with a single relevant item). Recall@k equals HR@k here (RecBole and HLLM call it Recall@k).
Averages are over all evaluated users, misses included.
"""
import math
import re

import numpy as np


def hit(rank, k):
    return float(rank is not None and 0 <= rank < k)


def ndcg(rank, k):
    return 1.0 / math.log2(rank + 2) if rank is not None and 0 <= rank < k else 0.0


HR_KS, NDCG_KS = (1, 5, 10, 20), (5, 10, 20)


def ranking_metrics(ranks, list_length=None):
    """The one metrics-from-ranks function: mean HR@k and NDCG@k over users (ranks from ranking.rank_targets; None
    or -1: not ranked). list_length: the model only gave top-L lists, so figures past L are not measured (left out)."""
    ranks = list(ranks)
    if not ranks:
        raise ValueError("no users to evaluate")
    fits = lambda k: list_length is None or k <= list_length     # noqa: E731
    out = {f"HR@{k}": float(np.mean([hit(r, k) for r in ranks])) for k in HR_KS if fits(k)}
    out.update({f"NDCG@{k}": float(np.mean([ndcg(r, k) for r in ranks])) for k in NDCG_KS if fits(k)})
    return out


# ---------------------------------------------------------------------------------------------------- text
# The explainable-recommendation papers (NRT, PETER, POD, RDRec, HDRec) score generated text with corpus-level BLEU
# on whitespace tokens (n-grams up to 1 or 4, brevity penalty, no smoothing) and ROUGE F1, both x100.
# BLEU comes from sacrebleu with tokenize="none" (our whitespace tokens), ROUGE from Google's rouge-score
# (which lowercases and keeps alphanumeric tokens); tests pin both to hand-computed cases.

def bleu(references, hypotheses, max_order=4):
    from sacrebleu.metrics import BLEU
    scorer = BLEU(tokenize="none", smooth_method="none", max_ngram_order=max_order, effective_order=False)
    return scorer.corpus_score([" ".join(h.split()) for h in hypotheses],
                               [[" ".join(r.split()) for r in references]]).score


def rouge_per_text(references, hypotheses):
    """{ROUGE-1/2/L: [F1 x100 of each (reference, hypothesis) pair]}: the per-text figures that rouge() averages and
    that paired tests between two generators compare."""
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    scores = [scorer.score(r, h) for r, h in zip(references, hypotheses)]
    return {name: [100 * s[key].fmeasure for s in scores]
            for name, key in (("ROUGE-1", "rouge1"), ("ROUGE-2", "rouge2"), ("ROUGE-L", "rougeL"))}


def rouge(references, hypotheses):
    return {k: sum(v) / max(1, len(references)) for k, v in rouge_per_text(references, hypotheses).items()}


def text_scores(references, hypotheses):
    """(BLEU-1/4 and ROUGE-1/2/L of the corpus, {ROUGE-1/2/L: each text's figure}): the ROUGE of each text is computed
    once and averaged."""
    if len(references) != len(hypotheses) or not references:
        raise ValueError("need one hypothesis per reference, and at least one")
    per_text = rouge_per_text(references, hypotheses)
    return ({"BLEU-1": bleu(references, hypotheses, 1), "BLEU-4": bleu(references, hypotheses, 4),
             **{k: sum(v) / len(v) for k, v in per_text.items()}}, per_text)


def text_metrics(references, hypotheses):
    return text_scores(references, hypotheses)[0]


def features_in(text, feature_vocab, max_words=3):
    """The features (lowercased word n-grams from feature_vocab) that occur in a text."""
    words = re.findall(r"[a-z0-9]+(?:['-][a-z0-9]+)*", text.lower())   # punctuation does not hide a feature
    return {" ".join(words[i:i + n]) for n in range(1, max_words + 1) for i in range(len(words) - n + 1)} & feature_vocab


def feature_metrics(features, hypotheses, feature_vocab):
    """Feature-level explainability measures (Li et al., PETER): FMR = share of explanations that mention the
    record's own feature; FCR = distinct vocabulary features mentioned / vocabulary size; DIV = mean size of the
    feature overlap over all pairs of explanations (lower = more diverse), computed from per-feature counts."""
    vocab = {f.lower() for f in feature_vocab}
    max_words = max((len(f.split()) for f in vocab), default=1)
    mentioned = [features_in(h, vocab, max_words) for h in hypotheses]
    n = len(hypotheses)
    fmr = sum(f.lower() in m for f, m in zip(features, mentioned)) / n
    counts = {}
    for m in mentioned:
        for f in m:
            counts[f] = counts.get(f, 0) + 1
    fcr = len(counts) / max(1, len(vocab))
    pairs = n * (n - 1) / 2
    div = sum(c * (c - 1) / 2 for c in counts.values()) / pairs if pairs else 0.0
    return {"FMR": fmr, "FCR": fcr, "DIV": div}
