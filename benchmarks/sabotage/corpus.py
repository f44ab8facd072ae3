"""The reference job's training text, generated from a seeded grammar (nothing is downloaded).

A small probabilistic grammar writes English-like sentences about a made-up lab: subjects,
verbs, objects, numbers and quoted log lines, grouped into paragraphs. The text has enough
structure (agreement, recurring names, punctuation, digits) that a character-level model's
loss keeps falling for a few hundred steps, and it is a pure function of its seed, so every
run of the benchmark trains on the same bytes without shipping a file in the repository.
"""

from __future__ import annotations

import hashlib
import random
from functools import lru_cache

NAMES = "Ada Bruno Chen Dana Emre Farah Goran Hana Ivo Jun Kemal Lena Mira Noor Otto Pia".split()
TEAMS = "ads ranking vision speech search infra eval data".split()
ADJECTIVES = "quiet slow careful strange late early large small stable noisy".split()
NOUNS = (
    "model checkpoint optimizer gradient node job cluster loss batch kernel sampler "
    "scheduler seed ledger report dataset"
).split()
VERBS_SG = "trains saves loads checks restarts watches tunes logs resumes shards".split()
VERBS_PL = "train save load check restart watch tune log resume shard".split()
ADVERBS = "quickly slowly again twice quietly carefully at night before noon".split(" ")
EVENTS = "started finished stalled diverged resumed halted converged".split()


def _noun_phrase(rng: random.Random) -> tuple[str, bool]:
    """A noun phrase and whether it is plural."""
    plural = rng.random() < 0.3
    noun = rng.choice(NOUNS) + ("s" if plural else "")
    if rng.random() < 0.5:
        noun = f"{rng.choice(ADJECTIVES)} {noun}"
    article = "the" if plural or rng.random() < 0.6 else ("an" if noun[0] in "aeiou" else "a")
    return f"{article} {noun}", plural


def _sentence(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.45:
        subject, plural = _noun_phrase(rng)
        if rng.random() < 0.5:
            subject, plural = rng.choice(NAMES), False
        verb = rng.choice(VERBS_PL if plural else VERBS_SG)
        obj, _ = _noun_phrase(rng)
        tail = f" {rng.choice(ADVERBS)}" if rng.random() < 0.5 else ""
        text = f"{subject} {verb} {obj}{tail}."
    elif kind < 0.7:
        who = rng.choice(NAMES)
        team = rng.choice(TEAMS)
        step = rng.randrange(0, 10000, 50)
        text = f"At step {step} the {team} job of {who} {rng.choice(EVENTS)}."
    elif kind < 0.85:
        loss = rng.uniform(0.5, 4.0)
        node = rng.randrange(0, 64)
        rank = rng.randrange(0, 8)
        text = f'The log says "node{node:02d} rank {rank} loss {loss:.3f}".'
    else:
        a, b = rng.sample(NAMES, 2)
        noun, _ = _noun_phrase(rng)
        text = f"{a} asks {b} why {noun} {rng.choice(EVENTS)}, and {b} does not know."
    return text[0].upper() + text[1:]


@lru_cache(maxsize=4)
def generate(n_bytes: int = 300_000, seed: int = 0) -> str:
    """ASCII text of exactly ``n_bytes`` characters, the same for the same arguments."""
    rng = random.Random(seed)
    parts: list[str] = []
    size = 0
    while size < n_bytes:
        paragraph = " ".join(_sentence(rng) for _ in range(rng.randint(3, 7))) + "\n\n"
        parts.append(paragraph)
        size += len(paragraph)
    return "".join(parts)[:n_bytes]


def vocabulary(text: str) -> list[str]:
    """The sorted characters of ``text``: the model's vocabulary."""
    return sorted(set(text))


def digest(text: str) -> str:
    """sha256 of the corpus, recorded with every run so results name the data they used."""
    return hashlib.sha256(text.encode("ascii")).hexdigest()
