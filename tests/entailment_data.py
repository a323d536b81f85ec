"""A seeded synthetic entailment set: documents of facts, summaries that are entailed, contradict or invent a fact.

    examples = generate(1000, seed=0)        # [Example(document, summary, kind, entailed), ...]
    ex.document   "the cat is red . the box is big ."
    ex.summary    "the box is big ."  (entailed: a subset of the facts)
                  "the box is small ." (contradiction: one fact's attribute changed)
                  "the hat is old ."  (invention: a fact about an object the document does not mention)
    tokens, mask, labels = encode(examples, VOCAB)   # left-padded [N, L]; <bos> document <sep> summary <eos>
    encode(examples, FACT_VOCAB)                     # one token per fact, the summary's ids apart

A word-level vocabulary of its own, so a tiny model (vocab_size >= len(VOCAB)) reads it. Ground truth for the
entailment reward (Roit et al. 2023) and for the true consistency rate of RL summaries.
"""

from __future__ import annotations

import dataclasses

import numpy as np

OBJECTS = ("cat", "dog", "box", "car", "ball", "hat", "cup", "bird", "tree", "lamp", "bag", "book")
ATTRIBUTES = ("red", "blue", "green", "big", "small", "old", "new", "soft", "hot", "cold")
SPECIALS = ("<pad>", "<bos>", "<eos>", "<sep>")
VOCAB = {w: i for i, w in enumerate(SPECIALS + ("the", "is", ".") + OBJECTS + ATTRIBUTES)}  # word level: 29
# fact level: one token per "the <object> is <attribute> .", with separate ids in the summary ("said:...";
# 4 + 2 x 120 ids): entailment is then "the summary's token has its document twin", which a 2-layer model
# learns in a few hundred steps. With shared ids (or words) a summary token always matches itself under causal
# attention, and a tiny model stayed near chance for 1000+ steps.
_FACTS = tuple(f"{o}_{a}" for o in OBJECTS for a in ATTRIBUTES)
FACT_VOCAB = {w: i for i, w in enumerate(SPECIALS + _FACTS + tuple("said:" + f for f in _FACTS))}
KINDS = ("entailed", "contradiction", "invention")


@dataclasses.dataclass(frozen=True)
class Example:
    document: str
    summary: str
    kind: str  # one of KINDS

    @property
    def entailed(self) -> bool:
        return self.kind == "entailed"


def fact(obj: str, attr: str) -> str:
    return f"the {obj} is {attr} ."


def generate(n: int, *, seed: int, facts: tuple[int, int] = (2, 4), summary_facts: tuple[int, int] = (1, 2),
             entailed_share: float = 0.5, objects: tuple[str, ...] = OBJECTS,
             attributes: tuple[str, ...] = ATTRIBUTES) -> list[Example]:
    """n examples: documents of facts[0]..facts[1] facts about distinct objects; summaries of
    summary_facts[0]..[1] facts, entailed with probability entailed_share, else (even odds) one fact of an
    entailed summary contradicted (its attribute changed) or replaced by an invented one. `objects` and
    `attributes` (subsets of OBJECTS and ATTRIBUTES) size the universe of facts."""
    if (n < 0 or not 1 <= facts[0] <= facts[1] < len(objects) or not 1 <= summary_facts[0] <= summary_facts[1]
            or len(attributes) < 2 or not set(objects) <= set(OBJECTS) or not set(attributes) <= set(ATTRIBUTES)):
        raise ValueError(f"bad generator settings: n={n}, facts={facts}, summary_facts={summary_facts}, "
                         f"objects={objects}, attributes={attributes}")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(facts[0], facts[1] + 1))
        present = list(rng.choice(objects, k, replace=False))
        attrs = {o: str(rng.choice(attributes)) for o in present}
        s = int(rng.integers(summary_facts[0], min(summary_facts[1], k) + 1))
        chosen = [present[i] for i in sorted(rng.choice(k, s, replace=False))]
        summary = [(o, attrs[o]) for o in chosen]
        kind = "entailed" if rng.random() < entailed_share else str(rng.choice(KINDS[1:]))
        j = int(rng.integers(s))
        if kind == "contradiction":
            summary[j] = (chosen[j], str(rng.choice([a for a in attributes if a != attrs[chosen[j]]])))
        elif kind == "invention":
            summary[j] = (str(rng.choice([o for o in objects if o not in present])), str(rng.choice(attributes)))
        out.append(Example(" ".join(fact(o, attrs[o]) for o in present), " ".join(fact(*f) for f in summary), kind))
    return out


def is_entailed(document: str, summary: str) -> bool:
    """The ground truth for any summary text: every fact of it is a fact of the document (a summary without
    facts, or with words outside the fact grammar, is not entailed)."""
    doc, facts = set(_facts(document)), _facts(summary)
    return facts is not None and bool(facts) and all(f in doc for f in facts)


def _facts(text: str):
    words = text.split()
    if len(words) % 5:
        return None
    facts = [tuple(words[i:i + 5]) for i in range(0, len(words), 5)]
    if any(f[0] != "the" or f[2] != "is" or f[4] != "." for f in facts):
        return None
    return [(f[1], f[3]) for f in facts]


def tokenize(text: str, vocab: dict[str, int] = VOCAB, summary: bool = False) -> list[int]:
    """Word ids with VOCAB; with FACT_VOCAB one id per fact, the summary's own ids when `summary` (text
    outside the fact grammar raises)."""
    if vocab is FACT_VOCAB:
        facts = _facts(text)
        if facts is None:
            raise ValueError(f"{text!r} is not a sequence of facts 'the <object> is <attribute> .'")
        words = [("said:" if summary else "") + f"{o}_{a}" for o, a in facts]
    else:
        words = text.split()
    try:
        return [vocab[w] for w in words]
    except KeyError as e:
        raise ValueError(f"word {e.args[0]!r} is not in the entailment vocabulary") from None


def encode(examples: list[Example], vocab: dict[str, int] = VOCAB, length: int | None = None, eos: bool = True):
    """-> tokens int32 [N, L], mask bool [N, L] (left padding), labels float32 [N] (1 entailed, 0 not).
    Without `eos` a row ends at the summary's last token."""
    rows = [[vocab["<bos>"]] + tokenize(e.document, vocab) + [vocab["<sep>"]] + tokenize(e.summary, vocab, True)
            + [vocab["<eos>"]] * eos for e in examples]
    length = length or max(map(len, rows))
    if any(len(r) > length for r in rows):
        raise ValueError(f"an example has {max(map(len, rows))} tokens, more than length={length}")
    tokens = np.full((len(rows), length), vocab["<pad>"], np.int32)
    mask = np.zeros((len(rows), length), bool)
    for i, r in enumerate(rows):
        tokens[i, length - len(r):], mask[i, length - len(r):] = r, True
    return tokens, mask, np.asarray([e.entailed for e in examples], np.float32)
