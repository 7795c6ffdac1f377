"""The five distillation stages as data, and the parsers that read the LLM's answers.

A stage is one row: the fields it reads, the key of its prompt in data/prompts.yaml, a parser, the fields it
writes, and the field copied into every written field when the answer can't be used (the paper's fallback rule).
data/distill.py runs the rows in order; nothing here knows about files, batches or models.

Parsers take an answer already passed through `clean` (markdown, openers like "Sure! Here is ...:" and curly
quotes removed) and return the written fields, or None when the answer holds nothing usable. `parse_answer`
wraps them with the checks every stage shares (empty answer, refusal, restatement of the prompt).

Each row also states its answer's shape once (`shape`: one `Line` per answer line, e.g. `1. The user prefers <1-17
words>.`). From that one statement come the grammar that constrained generation follows (GBNF, read by xgrammar for
the transformers backend, by vLLM's structured outputs and by llama.cpp's server) and a parser of answers in that
shape. Every answer goes to the stage's lenient parser first (it also tidies labels and repeated stems); one in the
shape that it cannot read is read by the shape's parser, so a constrained answer never falls back for its format.
The word bounds come from the stage's `max_words`, so a constrained answer is never over the limit the quality
report checks.
"""
import functools
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dataset import DataError, read_yaml

PROMPTS_FILE = Path(__file__).with_name("prompts.yaml")

# ----------------------------------------------------------------------------- text helpers

MARKDOWN = re.compile(r"\*\*|__|`+|^#+\s*", re.M)
OPENER = re.compile(r"^\s*(?:sure(?: thing)?|certainly|of course|okay|ok|absolutely|alright)\s*[!.,:]\s*", re.I)
HERE_IS = re.compile(r"^\s*here(?:'s| is| are)\b[^\n:]*(?::|\n|$)\s*", re.I)
REFUSAL = re.compile(r"^(?:i'?m sorry|sorry|i am sorry|i apologi[sz]e|i (?:cannot|can't|can not|won't|am unable|'m unable)"
                     r"|i'm not able|as an ai\b|unfortunately, i)", re.I)
PLACEHOLDER = re.compile(r"\bx{3,}\b|\[[^\]]*\]|<[^>]*>", re.I)  # the template's xxx, [adjective], <text>
ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "vs", "etc", "e.g", "i.e", "approx", "no"}
QUOTES = "\"'"


def clean(answer):
    """Normalise what chat models wrap around an answer; keeps line breaks (numbered lists need them)."""
    text = answer.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    text = MARKDOWN.sub("", text).strip()
    text = OPENER.sub("", text)
    text = HERE_IS.sub("", text).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":") and len(lines[0].split()) > 2:  # "The two sentences are:"
        lines = lines[1:]
    return "\n".join(lines)


def first_sentence(text):
    """Text up to the first sentence end (., ! or ? before a space or the end), skipping 'e.g.', 'Mr.' and the like."""
    text = " ".join(text.split())
    for end in re.finditer(r"[.!?](?=\s|$)", text):
        word = re.search(r"([\w.]+)$", text[:end.start()])
        if word and word.group(1).lower() in ABBREVIATIONS:
            continue
        return text[:end.end()]
    return text


def sentences(text):
    text = " ".join(text.split())
    out = []
    while text:
        first = first_sentence(text)
        out.append(first)
        text = text[len(first):].strip()
    return out


def unquote(text):
    text = text.strip().strip(QUOTES).strip()
    return text.replace('"', "").strip() if text.count('"') == 1 else text  # a lone quote left by a cut


def words(text):
    return re.findall(r"[a-z0-9']+", text.lower())


def has_content(text, stem=""):
    """At least one real word besides the stem ('The user is ...'), and no template placeholder left in."""
    rest = re.sub(stem, "", text, count=1, flags=re.I) if stem else text
    return bool(re.search(r"[a-zA-Z]{2,}", rest)) and not PLACEHOLDER.search(text)


def lower_first(text):
    first = text.split(" ", 1)[0]
    return text if first.isupper() and len(first) > 1 else text[:1].lower() + text[1:]


def strip_end(text):
    """Drop closing punctuation and quotes: the caller adds its own full stop where it wants one."""
    return unquote(text.rstrip(" .!;:,\"'")).rstrip(" .!;:,")


# ----------------------------------------------------------------------------- stage 1: preference + attributes

NUMBERED = re.compile(r"^\s*(?:\(?[1-9][.):]\)?|[-*\u2022])\s*(.*\S)")
SECOND_INLINE = re.compile(r"\s(?:\(2\)|2[.)])\s+")                       # "... 2. The item's ..." on one line
PREFERENCE = re.compile(r"\bthe user(?:'s)? prefer|\buser(?:'s)? preference", re.I)
ATTRIBUTES = re.compile(r"\b(?:the )?item(?:'s|s)? (?:attribut|feature)|\bthe item (?:is|has)\b", re.I)
JOINED_ATTRIBUTES = re.compile(r"(?:[,;]\s*(?:and\s+)?|\s+and\s+)(?=(?:the )?item(?:'s|s)? (?:attribut|feature)"
                               r"|the item (?:is|has)\b)", re.I)  # "..., and the item's attributes are ..."
PREFERENCE_LABEL = re.compile(r"^(?:the )?(?:user(?:'s)? )?preferences?\s*[:\-\u2013]\s*", re.I)
ATTRIBUTES_LABEL = re.compile(r"^(?:the )?(?:item(?:'s)? )?(?:attributes?|attributions?|features?)\s*[:\-\u2013]\s*", re.I)
REPEATED_STEM = re.compile(r"^(the user prefers|the item's attributes (?:are|include))[:\s]+\1\b", re.I)
STEM_1 = r"^(?:the user prefers|the item's attributes (?:are|include))"


def tidy_part(part):
    part = re.sub(r"^\s*\(?[1-9][.):]\)?\s*", "", unquote(part))  # numbering left on an inline part
    part = part[:-1] if part.endswith(")") and "(" not in part else part  # "(2. The item's ... .)"
    for label, stem in ((PREFERENCE_LABEL, "The user prefers"), (ATTRIBUTES_LABEL, "The item's attributes are")):
        if label.match(part):  # "User preference: soft fabrics" -> "The user prefers soft fabrics"
            part = unquote(label.sub("", part))
            if not part.lower().startswith(("the user", "the item")):
                part = f"{stem} {lower_first(part)}"
    part = REPEATED_STEM.sub(r"\1", part)
    part = first_sentence(unquote(part))
    part = strip_end(re.sub(r"[\s,;]+(?:and|while|whereas)?$", "", part))
    return part[:1].upper() + part[1:] + "." if part else ""  # each part a sentence of its own


def labelled_pair(units):
    preference = next((u for u in units if PREFERENCE.match(u)), None)
    attributes = next((u for u in units if ATTRIBUTES.match(u)), None)
    return (preference, attributes) if preference and attributes else None


def parse_preference_attributes(text):
    lines = text.splitlines()
    items = [m.group(1) for m in map(NUMBERED.match, lines) if m]
    if len(items) >= 2:
        first, second = items[0], items[1]
    else:
        flat = " ".join(lines)
        parts = SECOND_INLINE.split(flat, maxsplit=1)
        labelled = labelled_pair(lines) or labelled_pair(sentences(flat))
        joined = JOINED_ATTRIBUTES.search(flat)
        if len(parts) == 2:
            first, second = parts
        elif labelled:  # unnumbered lines or sentences, one about the user and one about the item, in either order
            first, second = labelled
        elif joined and PREFERENCE.search(flat[:joined.start()]):  # "The user prefers X, and the item's ... Y"
            first, second = flat[:joined.start()], flat[joined.end():]
        else:
            return None
    first, second = tidy_part(first), tidy_part(second)
    if ATTRIBUTES.match(first) and PREFERENCE.match(second):  # answered in the other order
        first, second = second, first
    if not (has_content(first, STEM_1) and has_content(second, STEM_1)):
        return None
    return {"user_preference": first, "item_attribution": second}


# ----------------------------------------------------------------------------- stages 2 and 3: one labelled sentence

def parse_labelled(text, sentence, label, stem, field, max_unlabelled_words):
    """Find 'The user is X' (or 'Personality: X', or a bare 'X' of a few words) and write f'{stem} X.'."""
    flat = " ".join(text.split())
    match = sentence.search(flat) or label.match(flat)
    if match:
        body = first_sentence(match.group(1))
    else:  # the label left out: accept a bare short answer such as "Curious and practical."
        body = first_sentence(flat)
        if len(body.split()) > max_unlabelled_words or re.search(r"[!?]", body):
            return None
    body = strip_end(body)
    if not has_content(body):
        return None
    return {field: f"{stem} {lower_first(body)}."}


USER_IS = re.compile(r"\bthe user (?:is|seems to be|appears to be|seems)\b[:\s]*(.*)", re.I)
PERSONALITY_LABEL = re.compile(r"^(?:the )?(?:user(?:'s)? )?personality(?: traits?)?\s*[:\-\u2013]\s*(.*)", re.I)


def parse_personality(text):
    return parse_labelled(text, USER_IS, PERSONALITY_LABEL, "The user is", "user_personality", 5)


AUDIENCE_IS = re.compile(r"\b(?:the (?:item|product)(?:'s|s)? (?:target )?audience|the (?:target )?audience "
                         r"(?:for|of) (?:the|this) (?:item|product)) (?:is|are|includes?|would be|could be)\b[:\s]*(.*)",
                         re.I)
AUDIENCE_LABEL = re.compile(r"^(?:the )?(?:item(?:'s)? |target )?audience\s*[:\-\u2013]\s*(.*)", re.I)


def parse_audience(text):
    return parse_labelled(text, AUDIENCE_IS, AUDIENCE_LABEL, "The item's audience is", "item_audience", 10)


# ----------------------------------------------------------------------------- stages 4 and 5: one free sentence

SUMMARY_LABEL = re.compile(r"\breview summary\s*[:\-\u2013]?\s*(.*)|^summary\s*[:\-\u2013]\s*(.*)", re.I)


def parse_summary(text):
    """'Review summary: X.' -> 'X' (no final stop, like the review sentences); an unlabelled sentence is taken as is."""
    flat = " ".join(text.split())
    match = SUMMARY_LABEL.search(flat)
    body = strip_end(first_sentence(unquote((match.group(1) or match.group(2) or "") if match else flat)))
    if not has_content(body) or len(body.split()) < 3:
        return None
    return {"review_summary": body}


REASON_LABEL = re.compile(r"^(?:reason|explanation|answer|string|output|why)\s*[:\-\u2013]\s*", re.I)
MAX_EXPLANATION_WORDS = 20


def parse_explanation(text):
    """The first line's first sentence, labels and quotes removed, at most 20 words, no final stop."""
    line = REASON_LABEL.sub("", text.splitlines()[0] if text else "")
    body = strip_end(first_sentence(unquote(line)))
    if len(body.split()) > MAX_EXPLANATION_WORDS:  # cut to 20 words, at the last comma when there is one
        body = " ".join(body.split()[:MAX_EXPLANATION_WORDS])
        body = body[:body.rfind(",")] if body.count(" ", 0, max(body.rfind(","), 0)) >= 5 else body
        body = body.rstrip(",;: ")
    if not has_content(body) or len(body.split()) < 3:
        return None
    return {"groundtruth_explanation": body}


# ----------------------------------------------------------------------------- answer shapes

# a word: no space (ASCII or Unicode: SmolLM2 glued words with no-break spaces to write past the word limit) or
# control character, sentence end, quote, template bracket or markdown; a comma, semicolon or colon only at its end
# (else "of,and,and,and" is one word); and it does not start with "xx" (the prompts' template placeholder is "xxx":
# small models copy it into the shape). The same classes are valid GBNF and Python regex syntax, so the grammar and
# the parser agree character for character.
NOT_IN_WORD = r'\x00-\x20\x7f\x85\xa0\u1680\u2000-\u200b\u2028\u2029\u202f\u205f\u3000\ufeff.!?,;:"\[\]<>*_`'
WORD_CHARS = f"[^{NOT_IN_WORD}]"
NOT_X = f"[^{NOT_IN_WORD}xX]"
MAX_WORD_CHARS = 24
WORD_GBNF = (f"({NOT_X} {WORD_CHARS}{{0,{MAX_WORD_CHARS - 1}}} | [xX] ({NOT_X} {WORD_CHARS}{{0,{MAX_WORD_CHARS - 2}}})?)"
             f" [,;:]?")
WORD_REGEX = (f"(?:{NOT_X}{WORD_CHARS}{{0,{MAX_WORD_CHARS - 1}}}|[xX](?:{NOT_X}{WORD_CHARS}{{0,{MAX_WORD_CHARS - 2}}})?)"
              f"[,;:]?")


@dataclass(frozen=True)
class Line:
    """One answer line: `prefix + stem + <words> + "."`; the field gets `stem + <words> + end`."""
    field: str
    prefix: str = ""     # answer-only text: numbering ("1. ") or a label ("Review summary: ")
    stem: str = ""       # words the answer line starts with that are kept in the field ("The user is ")
    end: str = "."       # what ends the field (the summaries and explanations keep no final stop)
    min_words: int = 1   # free words, after the stem


def word_budget(line, max_words):
    """(min, max) free words of a line, the stem's words counted in the stage's max_words."""
    return line.min_words, max_words - len(line.stem.split())


def gbnf_literal(text):
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


@functools.lru_cache(maxsize=None)   # asked once per record by the pipeline: built once per stage
def shape_grammar(stage):
    """The stage's answer shape as a GBNF grammar (llama.cpp's format, which xgrammar and vLLM also read)."""
    parts, rules = [], {}
    for i, line in enumerate(stage.shape):
        lo, hi = word_budget(line, stage.max_words)
        name = f"words-{lo}-{hi}"
        rules[name] = f"{name} ::= word (" + '" " word){' + f"{lo - 1},{hi - 1}" + "}"
        opening = ("\n" if i else "") + line.prefix + line.stem
        parts += ([gbnf_literal(opening)] if opening else []) + [name, gbnf_literal(".")]
    return "\n".join([f"root ::= {' '.join(parts)}", *rules.values(), f"word ::= {WORD_GBNF}"])


@functools.lru_cache(maxsize=None)
def shape_regex(stage):
    """The same shape as a Python regex, one named group per written field."""
    parts = []
    for i, line in enumerate(stage.shape):
        lo, hi = word_budget(line, stage.max_words)
        word = WORD_REGEX
        parts.append(("\n" if i else "") + re.escape(line.prefix + line.stem)
                     + f"(?P<{line.field}>{word}(?: {word}){{{lo - 1},{hi - 1}}})\\.")
    return re.compile("".join(parts))


def parse_shaped(stage, answer):
    """The fields of an answer exactly in the stage's shape, or None."""
    match = shape_regex(stage).fullmatch(answer.strip())
    if not match:
        return None
    fields = {}
    for line in stage.shape:
        body = match.group(line.field).rstrip(",;:")
        if line.stem and body.lower().startswith(line.stem.lower()):   # "The user is the user is kind."
            body = body[len(line.stem):]
        if not has_content(body):        # "xxx" and the like fit the shape but say nothing
            return None
        fields[line.field] = f"{line.stem}{body}{line.end}"
    return fields


def generation_budget(stage, tokens_per_word=2):
    """Tokens a constrained answer may need at most in practice (each free word ~2 tokens, the fixed text 1 a word)."""
    fixed = sum(len((line.prefix + line.stem).split()) + 1 for line in stage.shape)
    return fixed + sum(word_budget(line, stage.max_words)[1] * tokens_per_word for line in stage.shape)


# ----------------------------------------------------------------------------- the stages

@dataclass(frozen=True)
class Stage:
    number: int
    name: str            # also the key of its prompt in prompts.yaml
    reads: tuple         # fields the prompt uses: the review sentence and earlier stages' outputs
    parse: Callable
    writes: tuple
    fallback: str        # when the answer is unusable, every written field gets this field's value (the paper's rule)
    max_words: int       # what the prompt asks for, in words per written field (data/quality.py counts answers over it)
    shape: tuple         # the answer's lines (Line): the grammar of constrained generation and the exact parser


STAGES = (
    Stage(1, "preference_attributes", ("explanation",),
          parse_preference_attributes, ("user_preference", "item_attribution"), "explanation", 20,
          (Line("user_preference", "1. ", "The user prefers "), Line("item_attribution", "2. ", "The item's attributes are "))),
    Stage(2, "personality", ("explanation", "user_preference", "item_attribution"),
          parse_personality, ("user_personality",), "user_preference", 12,
          (Line("user_personality", stem="The user is "),)),
    Stage(3, "audience", ("explanation", "user_preference", "item_attribution", "user_personality"),
          parse_audience, ("item_audience",), "item_attribution", 20,
          (Line("item_audience", stem="The item's audience is "),)),
    Stage(4, "review_summary", ("explanation", "user_preference", "item_attribution", "user_personality", "item_audience"),
          parse_summary, ("review_summary",), "explanation", 40,
          (Line("review_summary", prefix="Review summary: ", end="", min_words=3),)),
    Stage(5, "groundtruth_explanation", ("explanation",),
          parse_explanation, ("groundtruth_explanation",), "explanation", MAX_EXPLANATION_WORDS,
          (Line("groundtruth_explanation", end="", min_words=3),)),
)
PRODUCER = {field: stage for stage in STAGES for field in stage.writes}  # which stage writes a field

# why an answer was not used; "backend failure" is added by the pipeline when the LLM call itself raised
EMPTY, REFUSAL_REASON, RESTATEMENT, UNPARSEABLE = "empty answer", "refusal", "restatement of the prompt", "unparseable answer"
NO_CONTENT = "no content (in shape)"   # the shape is there, a field holds no word: "18", "a", "x"


def load_prompts(path=PROMPTS_FILE):
    """{stage name: {"system": str, "user": str}}, checked against what each stage may read."""
    path = Path(path)
    prompts = read_yaml(path)
    for stage in STAGES:
        prompt = prompts.get(stage.name)
        if not isinstance(prompt, dict) or not isinstance(prompt.get("user"), str):
            raise DataError(f"{path}: no prompt for stage {stage.number} '{stage.name}' (needs a 'user' text, "
                            f"optionally a 'system' text)")
        for role in ("system", "user"):
            used = {name for _, name, _, _ in string.Formatter().parse(prompt.get(role) or "") if name is not None}
            unknown = used - set(stage.reads)
            if unknown:
                raise DataError(f"{path}: prompt '{stage.name}' ({role}) uses {sorted(unknown)}, but stage "
                                f"{stage.number} reads only {list(stage.reads)}")
    return prompts


TEMPLATE_SLOT = re.compile(r"\bxxx\b\.?")


def constrained_wording(prompts):
    """The prompts as constrained runs ask them: the template's placeholder `xxx` becomes `...`. Under a shape the
    grammar writes each line's stem itself, and a small model copies a placeholder it is shown: with the paper's
    `'1. The user prefers xxx.'` greedy SmolLM2-135M wrote `1. The user prefers x.` for 47 of 48 Gift_Cards records
    (words starting with "xx" are outside the shape), with `'1. The user prefers ...'` for none."""
    return {name: {role: TEMPLATE_SLOT.sub("...", text) if isinstance(text, str) else text
                   for role, text in prompt.items()} if isinstance(prompt, dict) else prompt
            for name, prompt in prompts.items()}


def render_dialog(prompt, fields):
    """A chat dialog (list of {role, content}) for one record."""
    dialog = []
    if prompt.get("system"):
        dialog.append({"role": "system", "content": prompt["system"].format_map(fields).strip()})
    dialog.append({"role": "user", "content": prompt["user"].format_map(fields).strip()})
    return dialog


def is_restatement(answer, dialog):
    """The answer only repeats the prompt: it is a piece of it, or it echoes the start of the user message."""
    said = " ".join(words(answer))
    prompt = " ".join(" ".join(words(message["content"])) for message in dialog)
    opening = " ".join(words(dialog[-1]["content"])[:8])
    return (len(said.split()) >= 3 and said in prompt) or (len(opening.split()) >= 6 and opening in said)


def parse_answer(stage, answer, dialog):
    """(fields written, None) for a usable answer, else (None, reason)."""
    text = clean(answer or "")
    if not text:
        return None, EMPTY
    if REFUSAL.match(text):
        return None, REFUSAL_REASON
    if is_restatement(text, dialog):
        return None, RESTATEMENT
    fields = stage.parse(text) or parse_shaped(stage, answer)   # tidied by the stage's parser; in the shape, always read
    if fields:
        return fields, None
    return None, NO_CONTENT if shape_regex(stage).fullmatch(answer.strip()) else UNPARSEABLE


def fallback_fields(stage, inputs):
    return {field: inputs[stage.fallback] for field in stage.writes}
