"""PII scan: planted entities found, counted and redacted exactly; clean text left alone; offline."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tierlm.core.errors import InvalidParameterError
from tierlm.synth.pii import PiiScanner, PiiSpan, resolve_overlaps

CARD = "4111 1111 1111 1111"  # valid Luhn
CARD_BAD_LUHN = "4111 1111 1111 1112"
IBAN = "GB82 WEST 1234 5698 7654 32"  # valid mod-97
SSN = "536-22-1234"
BITCOIN = "1BvBMSEYstWetqTFn5Au4m4GFg7xJaNVN2"  # valid base58 checksum

PLANTED = [
    "Write to alice.smith@example.com or call (212) 555-0198 before noon.",
    f"Her card {CARD} was charged; the IBAN on file is {IBAN}.",
    f"SSN {SSN}, login from 192.168.1.20 and 2001:db8::1, see https://docs.example.org/help/faq.",
    f"Donations: {BITCOIN}. Device 00:1B:44:11:3A:B7 is on www.example.net, mail bob@mail.example.co.uk",
]
CLEAN = [
    "The quick brown fox jumps over the lazy dog.",
    "In 2023 the team sold 1,500 units at 3.50 each; see chapter 12, pages 30-34.",
    "Call numpy.array or os.path.join in script.py and read README.md, said Mr.Smith.",
    f"A wrong card number: {CARD_BAD_LUHN}. Version 2.10.1 fixed it. Genesis 1:1-3.",
]


@pytest.fixture(scope="module")
def scanner() -> PiiScanner:
    return PiiScanner()


def found(spans: list[PiiSpan]) -> list[tuple[str, str]]:
    return [(s.entity, s.text) for s in spans]


def test_planted_entities_found_exactly(scanner):
    assert found(scanner.find(PLANTED[0])) == [("EMAIL_ADDRESS", "alice.smith@example.com"),
                                               ("PHONE_NUMBER", "(212) 555-0198")]
    assert found(scanner.find(PLANTED[1])) == [("CREDIT_CARD", CARD), ("IBAN_CODE", IBAN)]
    assert found(scanner.find(PLANTED[2])) == [
        ("US_SSN", SSN), ("IP_ADDRESS", "192.168.1.20"), ("IP_ADDRESS", "2001:db8::1"),
        ("URL", "https://docs.example.org/help/faq")]  # the sentence's final "." is not part of the URL
    assert found(scanner.find(PLANTED[3])) == [
        ("CRYPTO", BITCOIN), ("MAC_ADDRESS", "00:1B:44:11:3A:B7"), ("URL", "www.example.net"),
        ("EMAIL_ADDRESS", "bob@mail.example.co.uk")]
    for text in PLANTED:
        assert all(text[s.start:s.end] == s.text for s in scanner.find(text))


@pytest.mark.parametrize("text", CLEAN)
def test_clean_text_has_no_pii(scanner, text):
    assert scanner.find(text) == []


def test_invalid_ssn_is_not_an_ssn(scanner):
    # 000 area, 00 group and the famous Woolworth wallet number are rejected by presidio
    for ssn in ("000-12-3456", "536-00-1234"):
        assert scanner.find(f"SSN {ssn} on file") == []
    assert "US_SSN" not in {s.entity for s in scanner.find("SSN 078-05-1120")}


def test_redact_replaces_each_span(scanner):
    assert scanner.redact(PLANTED[0]) == "Write to <EMAIL_ADDRESS> or call <PHONE_NUMBER> before noon."
    assert scanner.redact(PLANTED[1]) == "Her card <CREDIT_CARD> was charged; the IBAN on file is <IBAN_CODE>."
    assert scanner.redact(PLANTED[2]) == "SSN <US_SSN>, login from <IP_ADDRESS> and <IP_ADDRESS>, see <URL>."
    assert scanner.redact(CLEAN[2]) == CLEAN[2]
    spans = scanner.find(PLANTED[0])[1:]  # given spans: only those are redacted
    assert scanner.redact(PLANTED[0], spans) == "Write to alice.smith@example.com or call <PHONE_NUMBER> before noon."


def test_scan_counts_and_report(scanner):
    report = scanner.scan(CLEAN[:2] + PLANTED + CLEAN[2:])
    assert report.samples == 8 and report.samples_with_pii == 4 and report.rate == 0.5
    assert report.counts == {"EMAIL_ADDRESS": 2, "PHONE_NUMBER": 1, "CREDIT_CARD": 1, "IBAN_CODE": 1, "US_SSN": 1,
                             "IP_ADDRESS": 2, "URL": 2, "CRYPTO": 1, "MAC_ADDRESS": 1}
    assert [bool(s) for s in report.per_sample] == [False, False, True, True, True, True, False, False]
    d = json.loads(json.dumps(report.to_dict()))
    assert d["rate"] == 0.5 and d["counts"] == report.counts
    assert [p["index"] for p in d["per_sample"]] == [2, 3, 4, 5]
    assert d["per_sample"][0]["spans"][0] == {"entity": "EMAIL_ADDRESS", "start": 9, "end": 32, "score": 1.0,
                                              "text": "alice.smith@example.com"}
    empty = scanner.scan([])
    assert (empty.samples, empty.samples_with_pii, empty.rate, empty.counts) == (0, 0, 0.0, {})


def test_overlap_keeps_higher_score_then_longer():
    a = PiiSpan("URL", 0, 30, 0.6, "")
    b = PiiSpan("EMAIL_ADDRESS", 10, 20, 1.0, "")  # inside a, higher score: wins
    c = PiiSpan("IP_ADDRESS", 30, 40, 0.6, "")  # touches a only at its end: no overlap
    d = PiiSpan("PHONE_NUMBER", 35, 50, 0.6, "")  # same score as c, longer: wins
    e = PiiSpan("US_SSN", 50, 55, 0.5, "")
    assert resolve_overlaps([e, d, c, b, a]) == [b, d, e]
    assert resolve_overlaps([a, c]) == [a, c]
    same = [PiiSpan("X", 5, 10, 0.5, ""), PiiSpan("Y", 0, 5 + 1, 0.5, "")]  # tie in score and length: earlier
    assert resolve_overlaps(same) == [same[1]]


def test_overlap_in_real_text():
    text = "See http://www.example.com/contact?email=jane@example.com today."
    urls = PiiScanner(entities=["URL"]).find(text)
    assert found(urls) == [("URL", "http://www.example.com/contact?email=jane@example.com")]
    both = PiiScanner(entities=["URL", "EMAIL_ADDRESS"]).find(text)
    assert len(both) == 1 and both[0].entity == "EMAIL_ADDRESS"  # 1.0 beats the URL's 0.6
    assert both[0].start > urls[0].start and both[0].end == urls[0].end


def test_threshold():
    text = f"Call (212) 555-0198, SSN {SSN}, host 10.0.0.7, card {CARD}."
    entities = {t: [s.entity for s in PiiScanner(threshold=t).find(text)] for t in (0.0, 0.4, 0.5, 0.6, 0.7, 1.0)}
    assert entities[0.0] == entities[0.4] == ["PHONE_NUMBER", "US_SSN", "IP_ADDRESS", "CREDIT_CARD"]
    assert entities[0.5] == ["US_SSN", "IP_ADDRESS", "CREDIT_CARD"]  # phone numbers score 0.4
    assert entities[0.6] == ["IP_ADDRESS", "CREDIT_CARD"]
    assert entities[0.7] == entities[1.0] == ["CREDIT_CARD"]  # checksum-validated: 1.0
    for bad in (-0.1, 1.5):
        with pytest.raises(InvalidParameterError, match="threshold"):
            PiiScanner(threshold=bad)


def test_entity_selection():
    text = "Born 12/05/1990, id 123e4567-e89b-12d3-a456-426614174000, mail a.b@example.com"
    assert [s.entity for s in PiiScanner().find(text)] == ["EMAIL_ADDRESS"]  # dates and UUIDs are opt-in
    assert found(PiiScanner(entities=["DATE_TIME", "UUID"]).find(text)) == [
        ("DATE_TIME", "12/05/1990"), ("UUID", "123e4567-e89b-12d3-a456-426614174000")]
    with pytest.raises(InvalidParameterError, match="US_PASSPORT") as e:
        PiiScanner(entities=["EMAIL_ADDRESS", "US_PASSPORT"])
    assert "EMAIL_ADDRESS" in e.value.fix
    with pytest.raises(InvalidParameterError, match="no PII entity types"):
        PiiScanner(entities=[])


def test_missing_presidio_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "presidio_analyzer", None)  # makes `import presidio_analyzer` fail
    with pytest.raises(InvalidParameterError, match="presidio-analyzer") as e:
        PiiScanner()
    assert e.value.fix == "pip install presidio-analyzer==2.2.366"


# Run in a fresh interpreter with an empty tldextract cache: records, and refuses, every connection.
_GUARD = """
import json, os, socket, sys
attempts = []
def refuse(kind):
    def f(*args, **kwargs):
        attempts.append(f"{kind} {args!r:.100}")
        raise OSError("network disabled by the test")
    return f
socket.getaddrinfo = refuse("getaddrinfo")
socket.socket.connect = refuse("connect")
socket.socket.connect_ex = refuse("connect_ex")
"""


def _run_guarded(code: str, tmp_path, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS"}
    environ.update(TLDEXTRACT_CACHE=str(tmp_path / "tldextract-cache"), **env)
    script = _GUARD + textwrap.dedent(code) + "\nprint(json.dumps({'attempts': attempts, 'found': found}))\n"
    out = subprocess.run([sys.executable, "-c", script], env=environ, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "stderr": out.stderr}


def test_scan_makes_no_network_attempt(tmp_path):
    result = _run_guarded("""
        from tierlm.synth.pii import PiiScanner
        found = [s.text for s in PiiScanner().find("Mail jane.doe@example.com or bob@mail.example.co.uk")]
    """, tmp_path)
    assert result["found"] == ["jane.doe@example.com", "bob@mail.example.co.uk"]
    assert result["attempts"] == []
    assert "Public Suffix List" not in result["stderr"]


def test_network_guard_catches_a_suffix_list_fetch(tmp_path):
    """The guard above works: tldextract told to fetch a suffix list is caught trying."""
    result = _run_guarded("""
        import tldextract
        found = tldextract.extract("mail.example.co.uk").suffix
    """, tmp_path, TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS="https://publicsuffix.invalid/list.dat")
    assert result["attempts"] and result["found"] == "co.uk"  # then fell back to the bundled snapshot
