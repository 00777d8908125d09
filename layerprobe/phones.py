"""The 39-phone ARPAbet set, silence marks, and the folding of other phone sets onto it."""

from __future__ import annotations

import re

ARPABET39: tuple[str, ...] = (
    "AA", "AE", "AH", "AO", "AW", "AY", "B", "CH", "D", "DH", "EH", "ER", "EY", "F", "G", "HH",
    "IH", "IY", "JH", "K", "L", "M", "N", "NG", "OW", "OY", "P", "R", "S", "SH", "T", "TH", "UH",
    "UW", "V", "W", "Y", "Z", "ZH",
)
VOWELS: frozenset[str] = frozenset(
    {"AA", "AE", "AH", "AO", "AW", "AY", "EH", "ER", "EY", "IH", "IY", "OW", "OY", "UH", "UW"}
)
# Marks that are not speech, compared case-insensitively (MFA, Kaldi, TIMIT, festival).
SILENCE_MARKS: frozenset[str] = frozenset(
    {"", "sil", "sp", "spn", "<eps>", "<sil>", "pau", "h#", "#", "[sil]", "silence", "<unk>",
     "[noise]", "<noise>", "[laughter]", "nsn", "<spoken_noise>", "[spn]", "epi", "pau1"}
)
# Extended ARPAbet / TIMIT / festival radio phones folded into the 39 set.
PHONE_MAP: dict[str, str] = {
    "AX": "AH", "AXH": "AH", "AX-H": "AH", "AXR": "ER", "IX": "IH", "UX": "UW", "EL": "L",
    "EM": "M", "EN": "N", "ENG": "NG", "NX": "N", "DX": "T", "HV": "HH",
}
_STRESS = re.compile(r"[0-9]+$")


def is_silence(mark: str) -> bool:
    """True for silence / noise / unknown-word marks (``""``, ``sil``, ``sp``, ``spn``…)."""
    return mark.strip().lower() in SILENCE_MARKS


def normalize_phone(mark: str) -> str | None:
    """Map one phone mark to the 39 set: strip stress digits, fold variants; ``None`` if unknown.

    Silence marks are not phones: call :func:`is_silence` first.
    """
    phone = _STRESS.sub("", mark.strip().upper())
    phone = PHONE_MAP.get(phone, phone)
    return phone if phone in ARPABET39 else None


def festival_to_arpabet(phone: str, stress: int) -> str:
    """A festival radio phone (``ax``, ``axr``…) as MFA-style ARPAbet with stress digits."""
    upper = phone.upper()
    if upper == "AX":
        return "AH0"
    if upper == "AXR":
        return "ER0"
    mapped = PHONE_MAP.get(upper, upper)
    if mapped in VOWELS:
        return f"{mapped}{1 if stress else 0}"
    return mapped
