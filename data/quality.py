"""How usable a distillation run's answers are: one table per run, written as distill_report.json beside the
rationales and printed by `python data/distill.py --report DATA_DIR`.

Per stage and written field, over every record in the stage file:
  records            records with an answer on file
  fallbacks          records whose answer could not be used, by reason (the field then holds the fallback text)
  copies_review      used answers that repeat the review sentence (the same words, or the whole sentence inside)
  restates_prompt    used answers whose word 3-grams come mostly (>= 60%) from the stage's prompt wording
  template_words     used answers with the template's leftovers (xxx, [adjective], <text>, {field})
  distinct_answers   share of distinct values among the records (what training will see, fallbacks included)
  distinct_1/2       distinct unigrams / bigrams over all their tokens (Li et al. 2016)
  mean/max_words     length of the values
  over_limit         values longer than the stage's word limit (data/stages.py, max_words)
"""
import re
from collections import Counter
from pathlib import Path

from data.stages import PLACEHOLDER, STAGES, words

RESTATED_SHARE = 0.6


def ngrams(tokens, n):
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def prompt_wording(prompt):
    """The words of a stage's prompt without the record's fields: what an answer that restates it repeats."""
    text = " ".join(prompt.get(role) or "" for role in ("system", "user"))
    return words(re.sub(r"\{[a-z_]+\}", " ", text))


def field_report(stage, field, lines, records, prompt):
    """The figures of one written field (see the module doc); lines: {key: stage-file line}."""
    template = set(ngrams(prompt_wording(prompt), 3))
    values, used = [], []
    fallbacks = Counter()
    for key, line in lines.items():
        value = line["outputs"].get(field, "")
        values.append(value)
        if line.get("fallback"):
            fallbacks[line["fallback"]] += 1
        else:
            used.append((key, value))
    copies = restated = leftovers = 0
    for key, value in used:
        review = " ".join(words(records.get(key, {}).get("explanation", "")))
        said = " ".join(words(value))
        if review and (said == review or f" {review} " in f" {said} "):
            copies += 1
        grams = ngrams(words(value), 3)
        if grams and sum(g in template for g in grams) / len(grams) >= RESTATED_SHARE:
            restated += 1
        if PLACEHOLDER.search(value) or "{" in value or "}" in value:
            leftovers += 1
    tokens = [words(v) for v in values]
    unigrams = [t for ts in tokens for t in ts]
    bigrams = [g for ts in tokens for g in ngrams(ts, 2)]
    lengths = [len(v.split()) for v in values]
    n = len(values)
    return {"records": n, "fallbacks": sum(fallbacks.values()), "fallback_reasons": dict(fallbacks.most_common()),
            "copies_review": copies, "restates_prompt": restated, "template_words": leftovers,
            "distinct_answers": len(set(values)) / n if n else 0.0,
            "distinct_1": len(set(unigrams)) / len(unigrams) if unigrams else 0.0,
            "distinct_2": len(set(bigrams)) / len(bigrams) if bigrams else 0.0,
            "mean_words": sum(lengths) / n if n else 0.0, "max_words": max(lengths, default=0),
            "over_limit": sum(length > stage.max_words for length in lengths), "word_limit": stage.max_words}


def quality_report(outputs, records, prompts):
    """{"stage k name": {field: figures}} for every stage with answers on file.
    outputs: {stage number: {key: line}} (distill.read_stage); records: {key: record}; prompts: load_prompts()."""
    report = {}
    for stage in STAGES:
        lines = {key: line for key, line in outputs.get(stage.number, {}).items() if key in records}
        if lines:
            report[f"stage {stage.number} {stage.name}"] = {
                field: field_report(stage, field, lines, records, prompts[stage.name]) for field in stage.writes}
    return report


COLUMNS = [("records", "records", "d"), ("fallbacks", "fallbacks", "d"), ("copies_review", "copies", "d"),
           ("restates_prompt", "restates", "d"), ("template_words", "template", "d"),
           ("distinct_answers", "distinct", ".2f"), ("distinct_1", "dist-1", ".2f"), ("distinct_2", "dist-2", ".2f"),
           ("mean_words", "words", ".1f"), ("max_words", "max", "d"), ("over_limit", "over", "d")]


def format_report(report, title=""):
    """The report as a plain-text table, then each field's fallback reasons."""
    width = max([len(f"{stage} / {field}") for stage, fields in report.items() for field in fields] + [13]) + 1
    head = f"{'stage / field':<{width}}" + "".join(f"{label:>10}" for _, label, _ in COLUMNS)
    out = [title, head] if title else [head]
    reasons = []
    for stage, fields in report.items():
        for field, figures in fields.items():
            out.append(f"{stage + ' / ' + field:<{width}}" + "".join(f"{figures[key]:>10{fmt}}" for key, _, fmt in COLUMNS))
            if figures["fallback_reasons"]:
                reasons.append(f"  {field}: " + ", ".join(f"{r} {n}" for r, n in figures["fallback_reasons"].items()))
    if reasons:
        out += ["fallbacks by reason:"] + reasons
    out.append("(copies: repeat the review; restates: repeat the prompt; template: xxx/[..]/<..> left in; "
               "distinct: share of distinct answers; over: longer than the stage's word limit)")
    return "\n".join(out)


def report_path(data_dir):
    return Path(data_dir) / "distill_report.json"
