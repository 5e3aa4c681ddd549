"""Prompt-pair tasks for language models: clean and corrupted prompts of equal length, the
answers, and the metric the patching verbs take.

:func:`ioi` builds the indirect-object identification task (Wang et al. 2022): the clean
prompt "When Mary and John went to the store, John gave a drink to" is completed by the
indirect object (" Mary"), not the subject (" John"); its corrupted twin names a third person
as the subject ("…, Sarah gave a drink to"), which leaves the model no repeated name to
reject. The metric is the logit difference, correct minus wrong, at the last position.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_degen.errors import TLDegenError

__all__ = ["PromptPairs", "ioi"]

NAMES = ["Mary", "John", "Sarah", "Tom", "James", "Anna", "Paul", "Laura", "David", "Lisa",
         "Mark", "Emma", "Peter", "Kate", "Michael", "Alice", "Robert", "Susan", "Daniel",
         "Jessica", "Richard", "Jennifer", "Thomas", "Rachel", "Andrew", "Emily", "Steven",
         "Karen", "Kevin", "Linda"]
PLACES = ["store", "park", "school", "office", "station", "garden", "library", "market",
          "beach", "hospital", "restaurant", "church"]
OBJECTS = ["drink", "book", "gift", "ring", "letter", "bag", "key", "ball", "card", "flower",
           "phone", "ticket"]
TEMPLATE = "When {a} and {b} went to the {place}, {s} gave a {obj} to"


class PromptPairs(NamedTuple):
    """Clean and corrupted prompts (``[n, pos]`` token ids, equal lengths), the correct and
    the wrong answer's token id per prompt (``[n]``), and the clean prompts' text."""

    clean: Int[Tensor, "n pos"]
    corrupted: Int[Tensor, "n pos"]
    correct: Int[Tensor, " n"]
    wrong: Int[Tensor, " n"]
    text: list[str]

    def logit_difference(self, logits: Float[Tensor, "n pos vocab"]) -> Float[Tensor, " n"]:
        """The metric: logit of the correct answer minus the wrong one's, at the last
        position, per prompt (the patching verbs average it)."""
        if logits.shape[0] != self.correct.shape[0]:
            raise TLDegenError(f"logits of {logits.shape[0]} prompts for a task of "
                               f"{self.correct.shape[0]}: pass the task's own prompts")
        last = logits[:, -1]
        rows = torch.arange(last.shape[0], device=last.device)
        return (last[rows, self.correct.to(last.device)]
                - last[rows, self.wrong.to(last.device)])

    def __repr__(self) -> str:
        return (f"PromptPairs({self.clean.shape[0]} pairs × {self.clean.shape[1]} tokens, "
                f"e.g. {self.text[0]!r})")


def _single_token(tokenizer, words: list[str]) -> list[str]:
    """The words that are one token with a leading space (as they appear mid-sentence)."""
    return [w for w in words if len(tokenizer.encode(" " + w, add_special_tokens=False)) == 1]


def ioi(model, n: int = 96, seed: int = 0) -> PromptPairs:
    """``n`` indirect-object prompt pairs for ``model``'s tokenizer (module docstring):
    names, places and objects that are single tokens, in random order from ``seed``; the
    subject repeats the first or the second name, half each. Tokens follow the model's own
    ``to_tokens`` (a BOS token where it prepends one)."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise TLDegenError("the model has no tokenizer; build the task's tokens yourself")
    names = _single_token(tokenizer, NAMES)
    places, objects = _single_token(tokenizer, PLACES), _single_token(tokenizer, OBJECTS)
    if len(names) < 3 or not places or not objects:
        raise TLDegenError("this tokenizer splits the task's names, places or objects into "
                           "several tokens; build the task's tokens yourself")
    g = torch.Generator().manual_seed(seed)
    clean, corrupted, correct, wrong = [], [], [], []
    for i in range(n):
        a, b, c = (names[j] for j in torch.randperm(len(names), generator=g)[:3].tolist())
        place = places[int(torch.randint(len(places), (1,), generator=g))]
        obj = objects[int(torch.randint(len(objects), (1,), generator=g))]
        if i % 2:
            a, b = b, a  # the subject repeats the first name half the time
        clean.append(TEMPLATE.format(a=a, b=b, place=place, s=b, obj=obj))
        corrupted.append(TEMPLATE.format(a=a, b=b, place=place, s=c, obj=obj))
        correct.append(tokenizer.encode(" " + a, add_special_tokens=False)[0])
        wrong.append(tokenizer.encode(" " + b, add_special_tokens=False)[0])
    lengths = {len(tokenizer.encode(t, add_special_tokens=False)) for t in clean + corrupted}
    if len(lengths) != 1:
        raise TLDegenError("the prompts tokenise to different lengths; build the task's tokens "
                           "yourself")
    clean_t, corrupted_t = model.to_tokens(clean), model.to_tokens(corrupted)
    return PromptPairs(clean_t.cpu(), corrupted_t.cpu(), torch.tensor(correct),
                       torch.tensor(wrong), clean)
