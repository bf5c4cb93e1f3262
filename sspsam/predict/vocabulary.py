"""What words a model was trained on, and the warnings (or refusals) for phrases and classes
outside them.

A model trained on a closed world (the bundled demos know six colours, three shapes and a few
positions) still turns any text into a confident-looking mask: "a unicorn" gets the red shapes.
A checkpoint that records its words (``meta["vocabulary"]``) lets every surface say so, and a
referring phrase with no word the model knows is answered "no match" unless the caller opts in.
Models without a recorded vocabulary (zeroshot CLIP, published variants) are open-vocabulary:
nothing is checked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: words that carry no content of their own: a phrase made only of them and unknown words has no
#: word the model could have read ("a unicorn" is all unknown; "the blue unicorn" is not)
STOPWORDS = frozenset(
    "a an the of on at in to and or with is are that which this these those one ones its it thing things".split())
_WORD = re.compile(r"\w+", re.UNICODE)
_SHOW = 40  # known words quoted in a warning, at most


def words(text: str) -> list[str]:
    """Lower-case words of any script ("赤い丸" is one word: the demos know none of it)."""
    return [w.casefold() for w in _WORD.findall(text)]


@dataclass(frozen=True)
class Vocabulary:
    """The words a model knows; ``kind`` is "phrases" (referring) or "classes" (OVSS)."""

    words: frozenset[str]
    kind: str = "phrases"

    @classmethod
    def from_meta(cls, meta: dict | None) -> "Vocabulary | None":
        """The vocabulary a checkpoint's meta records (a list of words), else None (open vocabulary)."""
        vocab = (meta or {}).get("vocabulary")
        if isinstance(vocab, dict):
            kind, items = str(vocab.get("kind", "phrases")), vocab.get("words")
        else:
            kind, items = "phrases", vocab
        if not isinstance(items, (list, tuple)) or not items or not all(isinstance(w, str) for w in items):
            return None
        return cls(frozenset(w.casefold() for w in items), kind)

    def unknown(self, text: str) -> tuple[list[str], bool]:
        """(the content words of ``text`` the model does not know, whether no content word is known)."""
        content = [w for w in words(text) if w not in STOPWORDS]
        unknown = list(dict.fromkeys(w for w in content if w not in self.words))
        return unknown, bool(unknown) and len(unknown) == len(set(content))

    def known_words(self) -> str:
        shown = sorted((w for w in self.words if w not in STOPWORDS), key=lambda w: (len(w) > 7, w))
        return ", ".join(shown[:_SHOW]) + (", …" if len(shown) > _SHOW else "")


#: how each surface spells the opt-in, so a warning names the switch its reader can use
OPT_IN = {"python": "allow_unknown_words=True", "cli": "--allow-unknown", "http": "the field allow_unknown=true"}


def phrase_warning(model: str, vocab: Vocabulary, phrase: str, unknown: list[str], refused: bool, surface: str) -> str:
    """The warning for one referring phrase with unknown words; ``refused``: answered "no match"."""
    opt = OPT_IN.get(surface, OPT_IN["python"])
    listed = ", ".join(f"'{w}'" for w in unknown[:6]) + (", …" if len(unknown) > 6 else "")
    head = f"phrase '{phrase}': {listed} {'is' if len(unknown) == 1 else 'are'} not in the vocabulary of '{model}' (it knows: {vocab.known_words()})"
    if refused:
        return f"{head}; no word of the phrase is known, so the answer is 'no match' ({opt} asks the model anyway)"
    return f"{head}; the model reads only the words it knows, so its answer may be wrong"


def class_warning(model: str, vocab: Vocabulary, name: str) -> str:
    return (f"class '{name}' is not in the vocabulary of '{model}' (it knows: {vocab.known_words()}); "
            "the pixels it gets are a guess")


def check_phrases(model: str, vocab: Vocabulary | None, phrases: list[str], allow_unknown: bool,
                  surface: str = "python") -> tuple[list[bool], list[list[str]]]:
    """Per phrase: (answer "no match" without asking the model, its warnings)."""
    refuse, warns = [], []
    for p in phrases:
        unknown, none_known = vocab.unknown(p) if vocab is not None else ([], False)
        refused = none_known and not allow_unknown
        refuse.append(refused)
        warns.append([phrase_warning(model, vocab, p, unknown, refused, surface)] if unknown else [])
    return refuse, warns


def check_classes(model: str, vocab: Vocabulary | None, classes: list[str]) -> list[str]:
    """Warnings for classes with no known word (an OVSS model still labels pixels with them)."""
    if vocab is None:
        return []
    return [class_warning(model, vocab, c) for c in classes if vocab.unknown(c)[1]]


def classes_vocabulary(classes: list[str]) -> list[str]:
    """An OVSS model trained on a fixed class list knows the words of those classes."""
    return sorted({w for c in classes for w in words(c)})
