"""The synthetic passkey retrieval task, in several templates.

A 5-digit key is hidden at a chosen depth of a haystack of text; the question at the end asks for it. The
template the embedded model was trained on ("line"):

    <haystack ...>
    The pass key is 12345. Remember it. 12345 is the pass key.
    <... haystack>
    What is the pass key? The pass key is| 12345

and its variants, so that an evaluation does not measure one wording alone: the needle inline in the text
("inline"), an instruction line before the haystack, as the passkey papers have it ("instructed"), and
three other wordings of the question ("reworded", "quizzed", "secret"). "paraphrased" asks in one of 999 other
wordings, for training a model that is then asked in wordings it never saw (the three held-out ones are none of
them).

A sample is `length` tokens in all (prompt + answer). It is retrieved when every answer token is the
model's greedy choice: with teacher forcing, the argmax at each answer position equals the answer token,
which is exactly greedy generation reproducing the key.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from runtime.tokenizer import Tokenizer

NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INSTRUCTION = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
               "memorize it. I will quiz you about the important information there.")
# Training wordings: an optional lead-in sentence, then every request form with every way of naming the key (999 in
# all: the line template's question is not one of them), so that a model trained on them answers a question, not a
# string, whatever comes before it. None uses a held-out wording's own words (HELD_OUT_WORDS).
LEAD_INS = ("", "Question: ", "Now a question. ", "One more thing. ", "Your turn to answer. ", "Last task: ",
            "Let us check. ", "Here is a test. ", "Think back. ", "Answer briefly. ")
REQUESTS = ("What is {}?", "Tell me {}.", "Recall {}.", "Repeat {}.", "Give {}.", "Do you know {}?",
            "Which number is {}?", "Write down {}.", "Please state {}.", "Can you remember {}?")
KEY_NAMES = ("the pass key", "the pass key given in the text", "the pass key that was mentioned earlier",
             "the pass key from the document", "the pass key you were told to remember",
             "the pass key written somewhere in this passage", "the pass key that appeared before",
             "the number that is the pass key", "the pass key stated among all these lines",
             "the pass key from the beginning or the middle")
PARAPHRASES = tuple(f"{lead_in}{request.format(name)} The pass key is" for lead_in in LEAD_INS for request in REQUESTS
                    for name in KEY_NAMES if f"{lead_in}{request.format(name)}" != "What is the pass key?")
HELD_OUT_WORDS = ("hidden", "above", "quiz", "five-digit", "keep", "mind", "before you", "secret", "code", "digits",
                  "read")
INLINE_SEARCH = 64  # tokens past the chosen depth searched for a word boundary to put an inline needle at


@dataclass(frozen=True)
class Template:
    """How a sample is worded around its haystack."""

    name: str
    questions: tuple[str, ...] = (QUESTION,)  # a sample asks one of these
    inline: bool = False  # the needle inside a line of the text, at a word boundary, instead of on its own line
    instruction: str | None = None  # a line before the haystack saying what to look for

    def needle(self, key: str) -> str:
        text = NEEDLE.format(key=key)
        return f" {text}" if self.inline else f"\n{text}\n"

    def prefix(self) -> str:
        return "" if self.instruction is None else self.instruction + "\n"

    def question(self, rng: random.Random) -> str:
        return self.questions[0] if len(self.questions) == 1 else rng.choice(self.questions)


TEMPLATES = {t.name: t for t in (
    Template("line"),
    Template("inline", inline=True),
    Template("instructed", instruction=INSTRUCTION),
    Template("reworded", questions=("Recall the pass key that was hidden in the text above. The pass key is",)),
    Template("quizzed", questions=("Quiz time: which five-digit number did you have to keep in mind? The pass key "
                                   "is",)),
    Template("secret", questions=("Before you stop reading, say which digits made up the secret code in what you just "
                                  "read. The pass key is",)),
    Template("paraphrased", questions=PARAPHRASES),
)}
LINE = TEMPLATES["line"]


def parse_templates(text: str) -> list[Template]:
    """"line,inline" -> those templates; "all" -> every template."""
    names = list(TEMPLATES) if text == "all" else [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in TEMPLATES]
    if unknown:
        raise ValueError(f"unknown passkey template {', '.join(map(repr, unknown))} (known: {', '.join(TEMPLATES)}, "
                         f"all)")
    return [TEMPLATES[name] for name in dict.fromkeys(names)]


@dataclass(frozen=True)
class PasskeySample:
    tokens: list[int]  # prompt then answer: `length` tokens in all
    answer_start: int  # index in `tokens` of the first answer token
    key: str
    depth: float  # where the needle sits in the haystack, 0 = start, 1 = end


def filler_haystack(tokenizer: Tokenizer) -> Callable[[int, random.Random], list[int]]:
    """The built-in haystack: one repeated paragraph, as in the passkey papers."""
    unit = tokenizer.encode(FILLER)

    def haystack(length: int, rng: random.Random) -> list[int]:
        return (unit * (length // len(unit) + 1))[:length]

    return haystack


def minimum_length(tokenizer: Tokenizer, template: Template = LINE) -> int:
    """Tokens a sample needs besides its haystack (prefix, needle, question and a 5-digit answer)."""
    question = max(len(tokenizer.encode("\n" + q)) for q in template.questions)
    return question + sum(len(tokenizer.encode(part)) for part in (template.prefix(), template.needle("00000"),
                                                                   " 00000"))


def _word_boundary(tokenizer: Tokenizer, hay: list[int], at: int) -> int:
    """The first position from `at` whose token starts a word (begins with white space), so that an inline
    needle does not split a word; `at` itself if none is near."""
    for position in range(at, min(len(hay), at + INLINE_SEARCH)):
        if tokenizer.decode([hay[position]])[:1].isspace():
            return position
    return at


def make_sample(tokenizer: Tokenizer, length: int, depth: float, rng: random.Random,
                haystack: Callable[[int, random.Random], list[int]], template: Template = LINE) -> PasskeySample:
    """A sample of exactly `length` tokens with a random key at `depth` of the haystack."""
    key = str(rng.randrange(10000, 100000))
    prefix = tokenizer.encode(template.prefix()) if template.instruction else []
    needle = tokenizer.encode(template.needle(key))
    question = tokenizer.encode("\n" + template.question(rng))
    answer = tokenizer.encode(" " + key)
    room = length - len(prefix) - len(needle) - len(question) - len(answer)
    if room < 0:
        raise ValueError(f"a passkey sample needs at least {length - room} tokens, not {length}")
    hay = haystack(room, rng)
    at = round(depth * room)
    if template.inline:
        at = _word_boundary(tokenizer, hay, at)
    tokens = prefix + hay[:at] + needle + hay[at:] + question + answer
    return PasskeySample(tokens, len(tokens) - len(answer), key, depth)


@dataclass
class PasskeyBatch:
    tokens: torch.Tensor  # (b, L) int64, the whole samples
    answer_mask: torch.Tensor  # (b, L) bool: True where the token is part of the answer
    depths: list[float]

    @classmethod
    def of(cls, samples: list[PasskeySample]) -> PasskeyBatch:
        tokens = torch.tensor([s.tokens for s in samples], dtype=torch.long)
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        for row, s in enumerate(samples):
            mask[row, s.answer_start:] = True
        return cls(tokens, mask, [s.depth for s in samples])

    def to(self, device) -> PasskeyBatch:
        return PasskeyBatch(self.tokens.to(device), self.answer_mask.to(device), self.depths)

    def rows(self, index: list[int]) -> PasskeyBatch:
        return PasskeyBatch(self.tokens[index], self.answer_mask[index], [self.depths[i] for i in index])


def make_batch(tokenizer: Tokenizer, length: int, count: int, rng: random.Random,
               haystack: Callable[[int, random.Random], list[int]], depths: list[float] | None = None,
               templates: list[Template] | None = None) -> PasskeyBatch:
    """`count` samples at `depths` (default: evenly spread over 0-100%, or random when count is 1), each in a
    template drawn from `templates` (default: the trained one)."""
    if depths is None:
        depths = [i / (count - 1) for i in range(count)] if count > 1 else [rng.random()]
    templates = templates or [LINE]
    return PasskeyBatch.of([make_sample(tokenizer, length, d, rng, haystack,
                                        templates[0] if len(templates) == 1 else rng.choice(templates))
                            for d in depths])
