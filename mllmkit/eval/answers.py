"""Reading answers as each benchmark's own evaluation code reads them.

- :func:`pope_yes_no`: POPE's ``evaluate.py`` — keep the first sentence, drop commas, "no" if the
  words hold ``No``, ``no`` or ``not``, else "yes" (every answer parses).
- :func:`mme_yes_no`: MME's ``eval_tool/calculation.py`` — lowercased; "yes"/"no" as is, else the
  first four characters decide, else "other" (unparseable, wrong).
- :func:`mmbench_option`: VLMEvalKit's ``can_infer`` for MMBench — exactly one option letter among
  the answer's words (after ``.()[],:;!*#{}`` become spaces), else exactly one option's text inside
  the answer; ``Z`` for a refusal; None when neither works (no judge model is used).
- :func:`vqa_normalize` / :func:`vqa_accuracy`: the official ``vqaEval.py`` — punctuation,
  number words, articles and contractions, then ``min(#matching humans / 3, 1)`` averaged over the
  ten leave-one-out subsets of the human answers.
- :func:`exact_match_normalize`: the held-out exact match (trim whitespace and punctuation, lowercase).
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence

__all__ = ["exact_match_normalize", "mme_yes_no", "mmbench_option", "pope_yes_no", "vqa_accuracy",
           "vqa_normalize", "vqa_punctuation"]


def exact_match_normalize(text: str) -> str:
    return text.strip().strip(string.punctuation + " ").lower()


def pope_yes_no(answer: str) -> str:
    if "." in answer:
        answer = answer.split(".")[0]
    words = answer.replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def mme_yes_no(answer: str) -> str | None:
    answer = answer.lower()
    if answer in ("yes", "no"):
        return answer
    head = answer[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return None


_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", "Cannot determine the answer")


def mmbench_option(answer: str, options: Mapping[str, str]) -> str | None:
    """The option letter the answer picks, ``"Z"`` for a refusal, None when it cannot be told."""
    if any(refusal in answer for refusal in _REFUSALS):
        return "Z"
    spaced = answer
    for char in ".()[],:;!*#{}":
        spaced = spaced.replace(char, " ")
    words = [w.strip() for w in spaced.split()]
    letters = [letter for letter in options if letter in words]
    if len(letters) == 1:
        return letters[0]
    if not letters and sum(1 for z in ("Z", "") if z in words) == 1:
        return "Z"
    lowered = answer.lower()
    by_text = [letter for letter, text in options.items() if str(text).lower() in lowered]
    return by_text[0] if len(by_text) == 1 else None


# -- VQA (the official vqaEval.py tables and rules) --
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = ("a", "an", "the")
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the official pattern: any '.' not followed by a digit
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")


def vqa_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if p + " " in text or " " + p in text or _DIGIT_COMMA.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # the official code passes re.UNICODE (32) where sub() takes its count: at most 32 periods go
    return _PERIOD.sub("", out, count=re.UNICODE)


def _digits_articles(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_normalize(answer: str) -> str:
    """A model's answer as the official evaluation compares it."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(vqa_punctuation(answer))


def vqa_accuracy(answer: str, humans: Sequence[str]) -> float:
    """Soft accuracy of ``answer`` against the human answers (ten in VQAv2 and TextVQA)."""
    if not humans:
        return 0.0
    mine = vqa_normalize(answer)
    theirs = [vqa_punctuation(h) for h in humans] if len(set(humans)) > 1 else list(humans)
    credits = []
    for left_out in range(len(theirs)):
        matching = sum(1 for i, h in enumerate(theirs) if i != left_out and h == mine)
        credits.append(min(1.0, matching / 3))
    return sum(credits) / len(credits)
