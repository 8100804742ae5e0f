"""A rule judge for the demo data (configs/demo.yaml: `eval.judge.function: dpo_ray.demo_judge:score`).

`score(prompt, reply)` is the fraction of four rules the reply meets, each weighing 1/4 (so 0, 0.25, 0.5, 0.75 or 1):
  polite         no rude or refusing phrase (the demo's RUDE and REFUSE replies, a few words of theirs);
  on topic       names the entity the prompt asks about (its noun: "fox" for "the fox", any case), which is the last
                 demo entity the prompt names, so a follow-up like "And what about the fox?" asks about the fox;
  right fact     states that entity's trait from dpo_ray.demo.ENTITIES (its words in order, any case and punctuation);
  not repetitive no word trigram occurs twice ("the fox the fox the fox ...") and no piece of text runs 4+ times in a
                 row over 8+ characters ("arsarsarsars": a model stuck in a loop).
A reply with no words scores 0. A prompt that names no demo entity has no topic or fact to check: the score is then
the fraction of the other two rules met. On the bundled pairs every chosen reply scores 1 and every rejected one at
most 0.75 (a wrong fact), 0.5 (curt, off topic, repeating the name) or 0.25 (rude, refusing).
Pure Python (the demo's tables only): importable in any worker.
"""
from __future__ import annotations

import re

from .demo import ENTITIES

RULES = ("polite", "on_topic", "right_fact", "not_repetitive")
IMPOLITE = ("stupid", "ask someone else", "look it up", "ugh", "figure it out", "stop bothering", "boring",
            "why should i", "cannot help", "can't help", "do not want to", "don't want to", "will not talk", "won't talk",
            "shut up", "whatever")
_WORD = re.compile(r"[a-z0-9']+")
_LOOP = re.compile(r"(.+?)\1{3,}", re.S)  # a piece written 4+ times in a row: "arsarsarsars", "\n\n\n\n\n\n\n\n"
TRAITS = {name.lower(): trait for items in ENTITIES.values() for name, trait in items}
_NOUN = {name: re.compile(r"\b" + re.escape(name.removeprefix("the ")) + r"\b") for name in TRAITS}


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def asked_entity(prompt: str) -> str | None:
    """The demo entity ("the fox", "mars") the prompt asks about: the last one it names; None when it names none."""
    text, best = prompt.lower(), None
    for name, noun in _NOUN.items():
        hits = [m.start() for m in noun.finditer(text)]
        if hits and (best is None or hits[-1] > best[0]):
            best = (hits[-1], name)
    return best and best[1]


def polite(reply: str) -> bool:
    text = " ".join(words(reply))
    return not any(re.search(r"\b" + re.escape(p) + r"\b", text) for p in IMPOLITE)


def on_topic(reply: str, entity: str) -> bool:
    return bool(_NOUN[entity].search(reply.lower()))


def right_fact(reply: str, entity: str) -> bool:
    return f" {' '.join(words(TRAITS[entity]))} " in f" {' '.join(words(reply))} "


def not_repetitive(reply: str, n: int = 3) -> bool:
    w = words(reply)
    grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    return len(grams) == len(set(grams)) and not any(len(m.group(0)) >= 8 for m in _LOOP.finditer(reply))


def rules(prompt: str, reply: str) -> dict[str, bool]:
    """Each rule that applies -> met or not (on_topic and right_fact only when the prompt names a demo entity)."""
    entity = asked_entity(prompt)
    met = {"polite": polite(reply), "not_repetitive": not_repetitive(reply)}
    if entity is not None:
        met |= {"on_topic": on_topic(reply, entity), "right_fact": right_fact(reply, entity)}
    return met


def score(prompt: str, reply: str) -> float:
    """The fraction of the rules that apply which the reply meets, in [0, 1]; 0 for a reply with no words."""
    if not words(reply):
        return 0.0
    met = rules(prompt, reply)
    return sum(met.values()) / len(met)
