"""The demo prompt set: short ShareGPT-style conversations generated from a seed.

Written programmatically (no copied dataset): a handful of task families (arithmetic, counting,
comparison, sorting, spelling, simple facts) filled in with seeded random values. The same seed
always yields the same conversations, in the same order.
"""

from __future__ import annotations

import random
from collections.abc import Callable

Turn = tuple[str, str]
"""One (user, assistant) exchange."""

_COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white")
_ANIMALS = ("cat", "dog", "horse", "rabbit", "owl", "fox", "bear", "whale", "mouse", "lion")
_FRUITS = ("apple", "pear", "plum", "mango", "grape", "lemon", "cherry", "peach", "melon")
_WORDS = ("river", "stone", "cloud", "garden", "window", "candle", "forest", "bridge", "planet")
_FACTS = (
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What do bees make?", "Bees make honey."),
    ("What is frozen water called?", "Frozen water is called ice."),
    ("Which planet do we live on?", "We live on the planet Earth."),
    ("How many hours are in a day?", "There are twenty four hours in a day."),
    ("What color is grass?", "Grass is usually green."),
    ("What do plants need to grow?", "Plants need light, water and air to grow."),
    ("How many months are in a year?", "There are twelve months in a year."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
)
_NUMBER_WORDS = (
    *("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"),
    *("eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen"),
    *("eighteen", "nineteen", "twenty"),
)


def _add(rng: random.Random) -> Turn:
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."


def _subtract(rng: random.Random) -> Turn:
    a = rng.randint(10, 90)
    b = rng.randint(0, a)
    return f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}."


def _multiply(rng: random.Random) -> Turn:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return f"Multiply {a} by {b}.", f"{a} times {b} is {a * b}."


def _count(rng: random.Random) -> Turn:
    start = rng.randint(1, 20)
    stop = start + rng.randint(3, 7)
    seq = ", ".join(str(i) for i in range(start, stop + 1))
    return f"Count from {start} to {stop}.", f"{seq}."


def _compare(rng: random.Random) -> Turn:
    a, b = rng.sample(range(1, 100), 2)
    big, small = max(a, b), min(a, b)
    return f"Which is larger, {a} or {b}?", f"{big} is larger than {small}."


def _sort(rng: random.Random) -> Turn:
    values = rng.sample(range(1, 60), rng.randint(3, 6))
    shown = " ".join(str(v) for v in values)
    return (
        f"Sort these numbers from smallest to largest: {shown}",
        "In order: " + " ".join(str(v) for v in sorted(values)) + ".",
    )


def _spell(rng: random.Random) -> Turn:
    word = rng.choice(_WORDS + _ANIMALS)
    return f"Spell the word {word} backwards.", f"{word} backwards is {word[::-1]}."


def _letters(rng: random.Random) -> Turn:
    word = rng.choice(_WORDS + _FRUITS)
    return f"How many letters are in the word {word}?", f"The word {word} has {len(word)} letters."


def _number_word(rng: random.Random) -> Turn:
    n = rng.randint(0, 20)
    return f"Write the number {n} in words.", f"{n} is written as {_NUMBER_WORDS[n]}."


def _list(rng: random.Random) -> Turn:
    kind, pool = rng.choice((("fruits", _FRUITS), ("animals", _ANIMALS), ("colors", _COLORS)))
    k = rng.randint(2, 4)
    picks = rng.sample(pool, k)
    return f"Name {k} {kind}.", "Here are some: " + ", ".join(picks) + "."


def _fact(rng: random.Random) -> Turn:
    return rng.choice(_FACTS)


_FAMILIES: tuple[Callable[[random.Random], Turn], ...] = (
    _add,
    _subtract,
    _multiply,
    _count,
    _compare,
    _sort,
    _spell,
    _letters,
    _number_word,
    _list,
    _fact,
)


def generate_conversations(count: int = 400, seed: int = 0) -> list[list[Turn]]:
    """``count`` conversations of one to three turns, fixed by ``seed``."""
    rng = random.Random(seed)
    conversations = []
    for _ in range(count):
        turns = rng.choice((1, 1, 1, 2, 2, 3))
        conversations.append([rng.choice(_FAMILIES)(rng) for _ in range(turns)])
    return conversations


def to_sharegpt(conversation: list[Turn], index: int) -> dict[str, object]:
    """One conversation as a ShareGPT record: ``{"id", "conversations": [{"from", "value"}]}``."""
    messages: list[dict[str, str]] = []
    for user, assistant in conversation:
        messages.append({"from": "human", "value": user})
        messages.append({"from": "gpt", "value": assistant})
    return {"id": f"demo-{index:04d}", "conversations": messages}
