"""Function judges for tests/test_generate.py (imported by name in the Ray workers, as a user's module would be)."""


def words(prompt: str, reply: str) -> float:
    """More distinct words score higher: a deterministic rule with many distinct values."""
    return float(len(set(reply.split()))) + 0.001 * len(reply)


def fails_on_planets(prompt: str, reply: str) -> float:
    if any(p in prompt for p in ("Mercury", "Venus", "Mars", "Jupiter", "Saturn", "Neptune")):
        raise ValueError("no planets here")
    return words(prompt, reply)


def always_fails(prompt: str, reply: str) -> float:
    return {}[prompt]


def pairwise_words_prefers_a(prompt: str, a: str, b: str) -> float:
    """A pairwise judge with a pull to position A by construction: by words() it picks the better reply with 0.7, and
    adds 0.2 to whichever reply is shown first (identical replies: 0.7 for A)."""
    wa, wb = words(prompt, a), words(prompt, b)
    base = 0.7 if wa > wb else 0.3 if wa < wb else 0.5
    return min(1.0, base + 0.2)


def constant(prompt: str, reply: str) -> float:
    """Every reply the same score: every prompt's replies tie (tests/test_iterate.py)."""
    return 1.0
