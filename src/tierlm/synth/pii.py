"""PII detection and redaction for generated samples, fully offline.

Uses presidio-analyzer's pattern recognizers directly, without its `AnalyzerEngine`: the engine
needs a spaCy language model (a download), the recognizers below need none. Each recognizer is a
regex plus, for most, a checksum or validity check, so scores are presidio's raw pattern scores:

- validated (score 1.0): EMAIL_ADDRESS (the domain must end in a real public suffix),
  CREDIT_CARD (Luhn), IBAN_CODE (mod-97), CRYPTO (Bitcoin base58/bech32 checksums)
- 0.6: IP_ADDRESS (v4/v6), MAC_ADDRESS, URL with an http(s) scheme
- 0.5: US_SSN ("ddd-dd-dddd" and space/dot variants, known-invalid numbers rejected),
  URL starting with "www."
- 0.4: PHONE_NUMBER (libphonenumber matches valid for US, GB, DE, FR, IL, IN, CA, BR)

Hence the default threshold of 0.4: presidio only lifts phone numbers above 0.4 with its
context-word boost, which needs the spaCy pipeline, so a 0.5 default would drop every phone
number. Raise it to 0.5 to ignore phone numbers, to 0.7 to keep only checksum-validated entities.

Choices made against presidio's defaults, for text that an LLM writes (prose and code):

- URL: only "http(s)://..." and "www...." are recognized. Presidio's schemeless pattern flags
  "numpy.ar" in "numpy.array", "script.py", "README.md", "Mr.Sm" (ccTLDs .ar, .py, .md, .sm).
  A bare "example.com" is therefore not reported. Trailing sentence punctuation is trimmed.
- Opt-in only (pass `entities=`): DATE_TIME (any date: common and rarely identifying) and UUID
  (identifiers in code samples).
- Left out: US_BANK_NUMBER, US_PASSPORT, US_DRIVER_LICENSE, US_ITIN and similar score 0.01-0.3
  on bare digit runs ("B7" is a driver licence) and only make sense with the context boost.

Known false positives: version strings like "1.2.3.4" are IP addresses; digit groups like
"12345 67890" are valid Indian phone numbers.

Offline: the email recognizer asks tldextract for the public suffix list, which tldextract
fetches from the internet on first use unless TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS is set; an empty
value makes it use its bundled snapshot. It is set (unless already set) before presidio is
imported; that only works if nothing imported tldextract earlier in the process.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any

from tierlm.core.errors import InvalidParameterError

PRESIDIO_PIN = "presidio-analyzer==2.2.366"
DEFAULT_ENTITIES = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "US_SSN",
                    "IP_ADDRESS", "MAC_ADDRESS", "URL", "CRYPTO")
OPTIONAL_ENTITIES = ("DATE_TIME", "UUID")
_URL_TRAILING_PUNCTUATION = ".,;:!?"


@dataclass
class PiiSpan:
    """One detected entity: `text == sample[start:end]`."""

    entity: str
    start: int
    end: int
    score: float
    text: str


@dataclass
class PiiReport:
    """PII found in a batch of samples."""

    samples: int
    samples_with_pii: int
    counts: dict[str, int]
    per_sample: list[list[PiiSpan]] = field(repr=False)

    @property
    def rate(self) -> float:
        """Fraction of samples with at least one entity (0.0 for no samples)."""
        return self.samples_with_pii / self.samples if self.samples else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary; `per_sample` lists only the samples with PII, by index."""
        return {
            "samples": self.samples,
            "samples_with_pii": self.samples_with_pii,
            "rate": self.rate,
            "counts": dict(self.counts),
            "per_sample": [{"index": i, "spans": [asdict(s) for s in spans]}
                           for i, spans in enumerate(self.per_sample) if spans],
        }


def _presidio() -> tuple[ModuleType, ModuleType]:
    """Import presidio offline; returns (presidio_analyzer, its predefined_recognizers)."""
    os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")
    try:
        import presidio_analyzer
        from presidio_analyzer import predefined_recognizers
    except ImportError as e:
        raise InvalidParameterError(
            f"PII scanning needs presidio-analyzer, which is not installed ({e})",
            f"pip install {PRESIDIO_PIN}") from None
    return presidio_analyzer, predefined_recognizers


def _url_recognizer(presidio: ModuleType, recognizers: ModuleType) -> Any:
    """URLs with an http(s) scheme (0.6) or a leading "www." (0.5); see the module docstring."""
    base = recognizers.UrlRecognizer.BASE_URL_REGEX
    return recognizers.UrlRecognizer(patterns=[
        presidio.Pattern("URL with scheme", r"(?i)\bhttps?://" + base, 0.6),
        presidio.Pattern("www URL", r"(?i)\b(?=www\d{0,3}\.)" + base, 0.5),
    ])


def _build_recognizer(entity: str, presidio: ModuleType, recognizers: ModuleType) -> Any:
    if entity == "URL":
        return _url_recognizer(presidio, recognizers)
    classes = {
        "EMAIL_ADDRESS": "EmailRecognizer", "PHONE_NUMBER": "PhoneRecognizer",
        "CREDIT_CARD": "CreditCardRecognizer", "IBAN_CODE": "IbanRecognizer",
        "US_SSN": "UsSsnRecognizer", "IP_ADDRESS": "IpRecognizer",
        "MAC_ADDRESS": "MacAddressRecognizer", "CRYPTO": "CryptoRecognizer",
        "DATE_TIME": "DateRecognizer", "UUID": "UuidRecognizer",
    }
    return getattr(recognizers, classes[entity])()


def _check_entities(entities: list[str] | None) -> tuple[str, ...]:
    if entities is None:
        return DEFAULT_ENTITIES
    known = DEFAULT_ENTITIES + OPTIONAL_ENTITIES
    unknown = [e for e in entities if e not in known]
    if unknown or not entities:
        raise InvalidParameterError(
            f"unknown PII entity types {unknown}" if unknown else "no PII entity types given",
            f"choose from {', '.join(known)}", param="entities")
    return tuple(dict.fromkeys(entities))


def _trim_url(span: PiiSpan) -> PiiSpan:
    """Drop sentence punctuation that the URL regex swallows ("see https://x.org/a.")."""
    text = span.text.rstrip(_URL_TRAILING_PUNCTUATION)
    return PiiSpan(span.entity, span.start, span.start + len(text), span.score, text)


def resolve_overlaps(spans: list[PiiSpan]) -> list[PiiSpan]:
    """Keep non-overlapping spans, preferring the higher score, then the longer span (then the
    earlier one); returned sorted by start."""
    kept: list[PiiSpan] = []
    for span in sorted(spans, key=lambda s: (-s.score, -(s.end - s.start), s.start)):
        if all(span.end <= k.start or k.end <= span.start for k in kept):
            kept.append(span)
    return sorted(kept, key=lambda s: s.start)


class PiiScanner:
    """Finds, counts and redacts PII with presidio's offline pattern recognizers.

    `entities`: entity types to look for (default `DEFAULT_ENTITIES`; `OPTIONAL_ENTITIES` may be
    added). `threshold`: minimum presidio score, in [0, 1], for a match to count.
    """

    def __init__(self, entities: list[str] | None = None, threshold: float = 0.4):
        if not 0.0 <= threshold <= 1.0:
            raise InvalidParameterError(f"PII score threshold {threshold} is outside [0, 1]",
                                        "pass a threshold between 0 and 1", param="threshold")
        self.entities = _check_entities(entities)
        self.threshold = threshold
        presidio, recognizers = _presidio()
        self._recognizers = [_build_recognizer(e, presidio, recognizers) for e in self.entities]

    def find(self, text: str) -> list[PiiSpan]:
        """Entities in `text` scoring at least the threshold, non-overlapping, sorted by start."""
        spans = []
        for recognizer in self._recognizers:
            for r in recognizer.analyze(text, recognizer.supported_entities, None):
                span = PiiSpan(r.entity_type, r.start, r.end, r.score, text[r.start:r.end])
                spans.append(_trim_url(span) if span.entity == "URL" else span)
        return resolve_overlaps([s for s in spans if s.score >= self.threshold and s.text])

    def redact(self, text: str, spans: list[PiiSpan] | None = None) -> str:
        """`text` with each span (default: `find(text)`) replaced by `<ENTITY_TYPE>`."""
        spans = self.find(text) if spans is None else resolve_overlaps(spans)
        for span in reversed(spans):
            text = f"{text[:span.start]}<{span.entity}>{text[span.end:]}"
        return text

    def scan(self, texts: list[str]) -> PiiReport:
        """Find PII in every sample and count it per entity type."""
        per_sample = [self.find(t) for t in texts]
        counts: dict[str, int] = {}
        for spans in per_sample:
            for span in spans:
                counts[span.entity] = counts.get(span.entity, 0) + 1
        return PiiReport(samples=len(texts), samples_with_pii=sum(1 for s in per_sample if s),
                         counts=counts, per_sample=per_sample)
