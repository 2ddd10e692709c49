"""Sentence captions as training text: the captioner's boilerplate out, a word limit, the trigger
word placed, and which words and phrases a dataset's captions repeat. Torch-free: the bot reads
frequencies with it too.

A **phrase** here is a maximal run of words with no stop word and no punctuation inside it, lower-cased:
"a woman with long blonde hair, smiling at the camera" gives "woman", "long blonde hair",
"smiling" and "camera". Runs longer than ``MAX_PHRASE_WORDS`` count as their separate words (such a
run is a list of adjectives or an odd sentence, not a thing a member removes). No stemming: "cat"
and "cats" are two phrases. Comma-separated tag lists (``1girl, long hair, smile``) keep their tags
whole: a caption whose every comma-separated part is short and has no sentence punctuation is a
tag list.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from ..spec import TagCount

MAX_PHRASE_WORDS = 4
TAG_WORDS = 4  # a comma-separated part of at most this many words (and no sentence end) is a tag

# English function words, and the verbs a captioner uses to link things ("a woman wearing a hat"):
# they separate phrases and are never counted.
STOP_WORDS = frozenset(
    ["a", "an", "the", "this", "that", "these", "those", "there", "here", "it", "its", "it's", "he", "she",
     "they", "them", "his", "her", "hers", "their", "theirs", "we", "us", "our", "you", "your", "i", "me",
     "my", "one", "ones", "some", "any", "each", "every", "both", "all", "several", "many", "much", "more",
     "most", "other", "another", "such", "no", "not", "nor", "only", "own", "same", "so", "than", "too",
     "very", "just", "also", "as", "well", "and", "or", "but", "if", "then", "else", "when", "while",
     "where", "which", "who", "whom", "whose", "what", "why", "how", "of", "in", "on", "at", "by", "for",
     "with", "without", "within", "into", "onto", "from", "to", "up", "down", "over", "under", "above",
     "below", "behind", "between", "among", "through", "across", "along", "around", "near", "beside",
     "besides", "beneath", "against", "toward", "towards", "upon", "about", "after", "before", "during",
     "off", "out", "inside", "outside", "next", "front", "back", "top", "bottom", "left", "right", "side",
     "is", "are", "was", "were", "be", "been", "being", "am", "has", "have", "had", "having", "do", "does",
     "did", "can", "could", "may", "might", "will", "would", "shall", "should", "must", "appear", "appears",
     "appeared", "appearing", "seem", "seems", "seemed", "look", "looks", "looking", "show", "shows",
     "showing", "shown", "depict", "depicts", "depicting", "feature", "features", "featuring", "see", "seen",
     "visible", "wear", "wears", "wearing", "hold", "holds", "holding", "sit", "sits", "sitting", "stand",
     "stands", "standing", "image", "picture", "photo", "photograph", "scene", "overall", "also", "likely",
     "possibly", "slightly"]
)  # fmt: skip

# What Florence-2 (and most captioners) put before the description itself: "The image shows …",
# "In this image, we can see …", "This is a close-up of …". Matched at the caption's start only,
# case-insensitively, and again after a match: "In this image," then "we can see".
_MEDIUM = (
    r"(?:image|picture|photo(?:graph)?|illustration|drawing|painting|artwork|render(?:ing)?|scene|frame|shot)"
)
_BOILERPLATE = [
    re.compile(p, re.IGNORECASE)
    for p in (
        rf"^(?:in|on) (?:the|this) {_MEDIUM}\s*,?\s+",
        rf"^(?:the|this) {_MEDIUM} (?:shows|depicts|features|captures|displays|presents|showcases|"
        rf"portrays|contains|illustrates|is of|is)\s+",
        rf"^(?:this|it) is (?:an? )?{_MEDIUM} (?:of|showing|that shows|depicting|featuring)\s+",
        r"^(?:we|you) can see\s+",
        r"^there (?:is|are)\s+",
        r"^(?:this|it) is\s+(?=(?:a|an|the)\b)",
    )
]


def _words(text: str) -> list[str]:
    return text.split()


def strip_boilerplate(text: str) -> str:
    """``text`` without the captioner's opening ("The image shows", "In this image,", "This is"),
    its first letter lower-cased when that opening was removed and the word is a common one."""
    text = " ".join(text.split())
    stripped = False
    changed = True
    while changed:
        changed = False
        for pattern in _BOILERPLATE:
            rest = pattern.sub("", text, count=1)
            if rest != text and rest:
                text, stripped, changed = rest, True, True
    return lower_first(text) if stripped else text


def lower_first(text: str) -> str:
    """The first letter in lower case when the first word is a plain word (a determiner, pronoun or
    number: "A woman" → "a woman"), never a name or an acronym ("Tokyo", "NASA", "I" stay)."""
    match = re.match(r"([A-Z][a-z]*)\b", text)
    if match and match.group(1).lower() in _LOWERABLE:
        return text[0].lower() + text[1:]
    return text


_NUMBERS = "two three four five six seven eight nine ten twelve several multiple group pair couple"
_LOWERABLE = (STOP_WORDS - {"i"}) | frozenset(_NUMBERS.split()) | frozenset(["close"])


# Words a cut caption must not end on: they promise a word that was cut off.
_DANGLING = frozenset(
    ["a", "an", "the", "and", "or", "but", "nor", "with", "without", "of", "in", "on", "at", "to", "for",
     "by", "from", "into", "onto", "as", "than", "while", "which", "who", "whose", "that", "this", "these",
     "those", "its", "their", "his", "her", "our", "your", "my", "is", "are", "was", "were", "be", "has",
     "have", "near", "behind", "between", "under", "over", "above", "below", "beside", "against", "through",
     "across", "along", "around"]
)  # fmt: skip


def trim_words(text: str, max_words: int | None) -> str:
    """At most ``max_words`` words: whole sentences while they fit, else the first sentence cut at its
    last comma within the limit (or at the limit), without a dangling "and"/"with"/"a" at the end."""
    if not max_words or len(_words(text)) <= max_words:
        return text
    sentences = re.split(r"(?<=[.!?])\s+", text)
    kept: list[str] = []
    count = 0
    for sentence in sentences:
        n = len(_words(sentence))
        if count + n > max_words:
            break
        kept.append(sentence)
        count += n
    if kept:
        return " ".join(kept)
    head = _words(sentences[0])[:max_words]
    commas = [i for i, w in enumerate(head) if w.endswith((",", ";", ":"))]
    if commas and commas[-1] + 1 >= max_words // 2:
        head = head[: commas[-1] + 1]
    while head and head[-1].strip(",;:").lower() in _DANGLING:
        head.pop()
    return " ".join(head).rstrip(",;:")


def clean_caption(raw: str, max_words: int | None = None) -> str:
    """A captioner's output as a caption body: one line, no boilerplate, at most ``max_words`` words."""
    text = "".join(c if c.isprintable() else " " for c in raw)
    return trim_words(strip_boilerplate(text), max_words)


# ---- the caption file ----


def trigger_head(trigger: str | None, style: str, prefix: str | None) -> list[str]:
    """What goes before the caption: ``zzk`` (style "subject") or ``a photo of zzk`` (style
    "photo_of"), then the prefix."""
    parts = []
    if trigger and trigger.strip():
        parts.append(trigger.strip() if style == "subject" else f"a photo of {trigger.strip()}")
    if prefix and prefix.strip(" ,"):
        parts.append(prefix.strip(" ,"))
    return parts


def _without_head(existing: str, trigger: str | None) -> str:
    """An existing caption without a leading trigger (``zzk, …`` or ``a photo of zzk, …``), so a
    caption captioned twice does not carry the trigger twice."""
    text = " ".join(existing.split())
    if not trigger or not trigger.strip():
        return text
    t = re.escape(trigger.strip())
    return re.sub(rf"^(?:a photo of\s+)?{t}\s*(?:,\s*|$)", "", text, flags=re.IGNORECASE)


def _join(first: str, second: str) -> str:
    if not first or not second:
        return first or second
    return f"{first} {second}" if first.endswith((".", "!", "?")) else f"{first}, {second}"


def compose_caption(
    body: str,
    existing: str | None,
    *,
    mode: str,
    trigger: str | None = None,
    style: str = "subject",
    prefix: str | None = None,
) -> str:
    """The caption file's text: trigger and prefix first, then the new caption ``body`` instead of
    the existing one (``replace``), after it (``append``) or before it (``prepend``)."""
    old = _without_head(existing or "", trigger)
    if prefix and prefix.strip(" ,"):
        old = re.sub(rf"^{re.escape(prefix.strip(' ,'))}\s*(?:,\s*|$)", "", old, flags=re.IGNORECASE)
    if mode == "append":
        text = _join(old, body)
    elif mode == "prepend":
        text = _join(body, old)
    else:
        text = body
    head = trigger_head(trigger, style, prefix)
    if head and text:
        text = lower_first(text)
    return ", ".join([*head, text] if text else head)


# ---- frequencies ----


def is_tag_list(caption: str) -> bool:
    parts = [p.strip() for p in re.split(r"[,\n]", caption) if p.strip()]
    return bool(parts) and all(
        len(p.split()) <= TAG_WORDS and not re.search(r"[.!?](?:\s|$)", p) for p in parts
    )


def _tag_form(tag: str) -> str:
    return " ".join(tag.replace("\\(", "(").replace("\\)", ")").replace("_", " ").lower().split())


def phrases(caption: str) -> list[str]:
    """The caption's tags (a tag list) or phrases (sentences), lower-cased, each once, in order."""
    if is_tag_list(caption):
        found = [_tag_form(t) for t in re.split(r"[,\n]", caption) if t.strip()]
        return list(dict.fromkeys(found))
    found = []
    # Clauses: between punctuation (apostrophes and hyphens belong to words: "woman's", "close-up").
    for clause in re.split(r"[^\w\s'’-]+", caption.lower()):
        run: list[str] = []
        for word in [*(w.strip("'’-") for w in clause.split()), ""]:
            if word and word not in STOP_WORDS and not word.isdigit():
                run.append(word)
                continue
            if len(run) <= MAX_PHRASE_WORDS:
                found.append(" ".join(run))
            else:
                found.extend(run)
            run = []
    return list(dict.fromkeys(p for p in found if p))


def caption_frequency(captions: Iterable[str], exclude: Iterable[str] = ()) -> list[TagCount]:
    """How many captions carry each tag or phrase (see the module's note), most frequent first (ties
    in order of first appearance); ``exclude`` (the trigger word, the prefix) is left out."""
    captions = list(captions)
    skip = {_tag_form(e) for e in exclude if e and e.strip()}
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(p for p in phrases(caption) if p not in skip)
    return [TagCount(tag=p, count=n, share=round(n / len(captions), 4)) for p, n in counts.most_common()]
