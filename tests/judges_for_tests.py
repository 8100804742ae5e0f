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
