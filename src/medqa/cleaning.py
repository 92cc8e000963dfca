"""Text cleaning for patient questions and doctor answers.

Keeps case and punctuation (the original project lower-cased and stripped punctuation, which a tokenizer
trained on real text then scores as noise). Normalises Unicode to NFC, strips HTML, removes the anonymiser's
"Chat Doctor" artefacts and scrubs e-mail addresses, phone numbers and URLs.
"""

from __future__ import annotations

import html
import re
import unicodedata

# HTML tags: a `<` followed by a letter, `/` or `!` so that "BP < 120 and > 80" survives.
_TAG = re.compile(r"<\s*[A-Za-z/!][^<>]{0,200}>")
_WS = re.compile(r"\s+")

# Personal data. URLs first (they can contain @ and digits), then e-mails, then phone numbers.
_URL = re.compile(r"\b(?:https?://|ftp://|www\.)[^\s<>\"')\]]+", re.IGNORECASE)
_EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")
# 10 to 15 digits with optional separators and a leading +: long enough to skip doses, dates, "120/80".
_PHONE = re.compile(r"(?<![\w/])\+?(?:\d[\s().-]{0,2}){9,14}\d(?![\w/])")

URL_TOKEN, EMAIL_TOKEN, PHONE_TOKEN = "[url]", "[email]", "[phone]"

# The HealthCareMagic anonymiser replaced doctors' names, greetings and some ordinary words with
# "Chat Doctor". Whole greeting and sign-off phrases go first; any remaining "Chat Doctor" is dropped
# on its own, and the punctuation it leaves behind is tidied, so the rest of the sentence is untouched.
_CD = r"chat\s*doctor"
_ARTEFACTS = [
    re.compile(p, re.IGNORECASE)
    for p in (
        rf"\b(?:and\s+)?welcome\s+(?:to|at|in)\s+(?:the\s+)?{_CD}(?:\s+(?:forum|virtual\s+clinic))?[\s.,!;:]*",
        rf"\bthanks?(?:\s+you)?\s+(?:a\s+lot\s+)?for\s+(?:\w+\s+){{0,4}}?(?:at|in|on|to|with|from|using|choosing)"
        rf"\s+(?:the\s+)?{_CD}(?:\s+(?:forum|virtual\s+clinic|\.com))?[\s.,!;:]*",
        rf"\bthanks?(?:\s+you)?\s+for\s+(?:using|choosing|consulting|contacting)\s+{_CD}[\s.,!;:]*",
    )
]
_CHAT_DOCTOR = re.compile(rf"\s*{_CD}\s*[:,]?", re.IGNORECASE)
_MARK = "\x00"  # stands where an artefact was removed, so tidying touches nothing else


def _tidy(text: str) -> str:
    """Close the gap an artefact left: "Regards : <gap>." -> "Regards.", "Hi;<gap>The" -> "Hi; The"."""
    text = re.sub(r"\s*\x00[\s\x00]*", _MARK, text)
    text = re.sub(r"\s*[,;:]?\s*\x00([.,;:!?])", r"\1", text)
    text = re.sub(r"^\x00[\s.,;:!?-]*", "", text)
    return _WS.sub(" ", text.replace(_MARK, " ")).strip()


# Questions that are only a greeting carry no medical content ("Hello sir", "hi doctor").
_GREETING_ONLY = re.compile(
    r"^(?:hi+|hello+|hey|dear|good\s+(?:morning|evening|afternoon|day)|respected)?"
    r"(?:\s*(?:sir|madam|mam|doctor|doc|dr\.?|there|all))*[\s.,!?]*$",
    re.IGNORECASE,
)


# Terminal escape sequences (ESC [ ... letter, ESC ] ... BEL) and then any other control character: C0 and C1
# controls (NUL, bell, backspace, ...), lone UTF-16 surrogates (from "\ud800"-style JSON escapes; they cannot be
# written as UTF-8) and invisible format marks (zero-width space, word joiner, byte-order mark). Tabs and line
# breaks are white space and collapse to one space.
# An operating-system command (ESC ] ... BEL) is removed only with its terminator: an unterminated one must not eat
# the rest of the text (its ESC alone goes, as a control character). Controls that Python counts as white space
# (vertical tab, file/group/record/unit separators, next line) become a space, so words are not glued together.
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
_SPACE_CONTROL = re.compile(r"[\x0b\x1c-\x1f\x85]")
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f\ud800-\udfff\u200b\u2060\ufeff]")


def has_control_chars(text: str) -> bool:
    """True when `normalize_text` would remove control characters or escape sequences from `text`."""
    return bool(_CONTROL.search(text) or _SPACE_CONTROL.search(text))


def normalize_text(text: str) -> str:
    """NFC, HTML tags and entities removed, control characters and escape sequences removed, white space
    collapsed. Case and punctuation are kept."""
    text = _CONTROL.sub("", _SPACE_CONTROL.sub(" ", _ANSI.sub("", text)))
    text = unicodedata.normalize("NFC", text)
    text = _TAG.sub(" ", text)
    text = html.unescape(text)
    text = _CONTROL.sub("", unicodedata.normalize("NFC", text))  # entities can decode to controls or combinings
    text = text.replace("\u00a0", " ")
    return _WS.sub(" ", text).strip()


def scrub_personal_data(text: str) -> str:
    """Replace URLs, e-mail addresses and phone numbers with placeholders."""
    text = _URL.sub(URL_TOKEN, text)
    text = _EMAIL.sub(EMAIL_TOKEN, text)
    return _PHONE.sub(PHONE_TOKEN, text)


def remove_chat_doctor(text: str) -> str:
    """Remove the anonymiser's "Chat Doctor" greetings, sign-offs and stray mentions."""
    for pattern in _ARTEFACTS:
        text = pattern.sub(_MARK, text)
    return _tidy(_CHAT_DOCTOR.sub(_MARK, text))


def clean_text(text: str) -> str:
    """The full cleaning applied to questions and answers alike."""
    return scrub_personal_data(remove_chat_doctor(normalize_text(text)))


def is_greeting_only(question: str) -> bool:
    return bool(_GREETING_ONLY.match(question))


def normalize_key(text: str) -> str:
    """The key for duplicate detection and split hashing: case-folded, punctuation and spaces removed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = re.sub(r"[\W_]+", " ", text)
    return text.strip()
