"""`tierlm synth` on the default model: constrained samples checked and deduplicated in job order, files and
report written, a killed job resumed to exactly the records of an uninterrupted one, a corrupt journal refused
without loss, and the same job run against a real server over HTTP."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from tierlm.config import CacheConfig, EngineConfig, SchedulerConfig
from tierlm.engine.llm_engine import LLMEngine
from tierlm.synth.job import job_from_dict
from tierlm.synth.runner import EngineBackend, URLBackend, run_job

sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
from server_testing import running_server  # noqa: E402

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                           "age": {"type": "integer", "minimum": 18, "maximum": 90}},
          "required": ["name", "age"], "additionalProperties": False}
COLOURS = {"templates": {"fav": "Name a colour a {{ who }} likes.", "hate": "Name a colour a {{ who }} hates."},
           "variables": {"who": ["child", "painter", "pilot"]}, "samples_per_prompt": 2,
           "sampling": {"temperature": 1.0, "max_tokens": 8},
           "constraint": {"choice": ["red", "green", "blue"]}, "scan": {"pii": False}}
PEOPLE = {"name": "people", "templates": {"p": "Invent a {{ job }} from {{ city }}. Reply as JSON with name and age."},
          "variables": {"job": ["baker", "pilot", "nurse", "miner"], "city": ["Oslo", "Lima"]},
          "samples_per_prompt": 2, "sampling": {"temperature": 0.9, "max_tokens": 48},
          "constraint": {"json": PERSON}, "scan": {"pii": False}}


@pytest.fixture(scope="module")
def engine():
    e = LLMEngine(EngineConfig(cache=CacheConfig(memory_bytes=256 << 20), scheduler=SchedulerConfig(max_num_seqs=8)))
    yield e
    e.close()


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_choice_job_dedups_in_job_order_and_reports(engine, tmp_path):
    job = job_from_dict(dict(COLOURS, usd_per_hour=2.0), tmp_path)
    s = run_job(job, tmp_path / "out", EngineBackend(job, engine=engine), progress=False)
    recs = records(tmp_path / "out")
    assert [r["index"] for r in recs] == list(range(12)) and s["done"] == 12 and s["finished"]
    assert all(r["text"] in ("red", "green", "blue") for r in recs)
    first: dict[str, str] = {}
    for r in recs:  # the first sample with a text is accepted; every later one names it
        if r["text"] not in first:
            assert r["accepted"], r
            first[r["text"]] = r["id"]
        else:
            assert not r["accepted"] and r["reject"] == f"duplicate of {first[r['text']]}", r
    assert s["accepted"] == len(first) and s["constraint_pass_rate"] == 1.0
    assert s["reject_reasons"] == ({"duplicate": 12 - len(first)} if len(first) < 12 else {})
    accepted = [json.loads(line) for line in (tmp_path / "out/accepted.jsonl").read_text().splitlines()]
    assert [r["id"] for r in accepted] == list(first.values())
    run = s["run"]
    assert run["output_tok_per_s"] > 0 and run["kv_bytes_per_token"] == engine.kv_spec.bytes_per_token
    assert run["usd_per_1k_accepted"] == pytest.approx(2.0 / 3600 / run["accepted_per_s"] * 1000)
    r0 = recs[0]
    assert r0["model"] == "default" and r0["config"] == "baseline" and r0["job_digest"] == job.digest
    assert r0["variables"] == {"who": "child"} and r0["template"] == "fav" and r0["seed"] > 0


def test_json_job_every_accepted_sample_validates(engine, tmp_path):
    job = job_from_dict(PEOPLE, tmp_path)
    s = run_job(job, tmp_path / "out", EngineBackend(job, engine=engine), progress=False)
    recs = records(tmp_path / "out")
    assert s["accepted"] >= 12, s["reject_reasons"]
    for r in recs:
        if r["accepted"]:
            jsonschema.validate(json.loads(r["text"]), PERSON)
        else:
            assert r["reject"].startswith(("duplicate", "near-duplicate", "truncated")), r["reject"]


def test_report_files(engine, tmp_path):
    from tierlm.synth.report import write_report

    job = job_from_dict(COLOURS, tmp_path)
    s = run_job(job, tmp_path, EngineBackend(job, engine=engine), progress=False)
    md = write_report(s, records(tmp_path), tmp_path).read_text()
    assert "| accepted |" in md and "duplicate" in md and (tmp_path / "report.png").stat().st_size > 5000


# ---- resume ------------------------------------------------------------------------------------------------
def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "tierlm.cli", "synth", *map(str, args)], capture_output=True,
                          text=True, timeout=600, **kw)


def write_job(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


FLAGS = ("--no-progress", "--no-scan", "--max-num-seqs", "4", "--kv-cache-memory", "128MiB")


@pytest.mark.slow
def test_a_killed_job_resumes_to_the_records_of_an_uninterrupted_run(tmp_path):
    jobf = write_job(tmp_path / "people.yaml", PEOPLE)
    r = cli(jobf, "--out", tmp_path / "whole", *FLAGS)
    assert r.returncode == 0, r.stderr[-2000:]
    whole = records(tmp_path / "whole")
    assert len(whole) == 16

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "tierlm.cli", "synth", str(jobf), "--out", str(out), *FLAGS],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        p = out / "samples.jsonl"
        if p.exists() and len(p.read_text().splitlines()) >= 5:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    have = len(records(out))
    assert 5 <= have < 16, "the job finished before it could be killed"
    with open(out / "samples.jsonl", "a") as f:  # a write the kill cut short
        f.write('{"index": %d, "id": "p/' % have)
    r = cli(jobf, "--out", out, *FLAGS)
    assert r.returncode == 0, r.stderr[-2000:]
    assert records(out) == whole  # nothing lost, nothing repeated, the same decisions
    assert (out / "samples.jsonl.torn").read_text().startswith('{"index": %d' % have)
    run = json.loads((out / "summary.json").read_text())["run"]
    assert run["sessions"] == 2  # the killed session counts up to its last checkpoint (its first record at least)
    assert 16 - have < run["samples"] <= 16 and run["wall_s"] > 0


def test_a_corrupt_journal_is_refused_and_kept(tmp_path):
    jobf = write_job(tmp_path / "c.yaml", dict(COLOURS, samples_per_prompt=1))
    out = tmp_path / "out"
    out.mkdir()
    text = 'not json\n{"index": 1, "id": "fav/0/1"}\n'
    (out / "samples.jsonl").write_text(text)
    r = cli(jobf, "--out", out, *FLAGS)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "line 1 is not a JSON record" in err[0] and "--fresh" in err[0], r.stderr
    assert (out / "samples.jsonl").read_text() == text  # untouched
    r = cli(jobf, "--out", out, "--fresh", *FLAGS)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(records(out)) == 6 and [p.read_text() for p in out.glob("samples.jsonl.*.old")] == [text]


def test_an_unreachable_url_is_one_line(tmp_path):
    jobf = write_job(tmp_path / "c.yaml", COLOURS)
    r = cli(jobf, "--out", tmp_path / "o", "--url", "http://127.0.0.1:9", "--no-progress")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "cannot reach http://127.0.0.1:9" in r.stderr and "tierlm serve" in r.stderr


# ---- over HTTP -------------------------------------------------------------------------------------------------
def test_the_same_job_against_a_real_server_gives_the_same_texts(engine, tmp_path):
    job = job_from_dict(PEOPLE, tmp_path)
    run_job(job, tmp_path / "local", EngineBackend(job, engine=engine), progress=False)
    with running_server(engine) as srv:
        s = run_job(job, tmp_path / "http", URLBackend(job, srv.url, concurrency=4), progress=False)
    local, http = records(tmp_path / "local"), records(tmp_path / "http")
    assert s["done"] == 16 and s["run"]["output_tokens"] == sum(r["output_tokens"] for r in http)
    assert [r["text"] for r in http] == [r["text"] for r in local]  # seeded: the same samples either way
    assert [r["accepted"] for r in http] == [r["accepted"] for r in local]


# ---- scans at the end of a job, and compare -----------------------------------------------------------------
VERSE = "in the beginning god created the heaven and the earth and the earth was without form and void"
MAIL = "It is ada.lovelace@example.org"
GENESIS = "In the beginning God created the heaven and the earth. And the earth was without form, and void"
PLANTED = {"templates": {"t": "Repeat exactly, nothing else: {{ x }}"}, "variables": {"x": [MAIL, GENESIS, "It will rain"]},
           "samples_per_prompt": 2, "sampling": {"temperature": 0.7, "max_tokens": 40},
           "constraint": {"choice": [MAIL, GENESIS, "It will rain"]},
           "dedup": {"exact": False, "near_threshold": None}, "scan": {"leakage": ["corpus.txt"]}}


def test_job_scans_find_planted_pii_and_copies(engine, tmp_path):
    from tierlm.synth.command import job_scans

    (tmp_path / "corpus.txt").write_text("Genesis 1. " + VERSE.capitalize() + ". And darkness was upon the deep.\n")
    job = job_from_dict(PLANTED, tmp_path)
    out = tmp_path / "out"
    backend = EngineBackend(job, engine=engine)
    run_job(job, out, backend, progress=False)
    recs = records(out)
    mails = [r for r in recs if "@" in r["text"]]
    verses = [r for r in recs if r["text"].startswith("In the beginning")]
    assert mails and verses and len(mails) + len(verses) < len(recs)  # the fixed seeds pick each kind
    scans = job_scans(job, out, backend)
    assert scans["constraint"]["pass_rate"] == 1.0
    assert scans["pii"]["counts"] == {"EMAIL_ADDRESS": len(mails)}
    assert scans["pii"]["samples_with_pii"] == len(mails)
    redacted = [json.loads(line) for line in (out / "accepted.redacted.jsonl").read_text().splitlines()]
    assert all("@" not in r["text"] for r in redacted)
    assert sum("<EMAIL_ADDRESS>" in r["text"] for r in redacted) == len(mails)
    leak = scans["leakage"]
    assert leak["samples_with_match"] == len(verses)
    assert leak["longest"][0]["words"] == len(VERSE.split()) and leak["longest"][0]["text"] == VERSE


@pytest.mark.slow
def test_compare_two_configs(tmp_path):
    jobf = write_job(tmp_path / "people.yaml", dict(PEOPLE, samples_per_prompt=1))
    r = subprocess.run([sys.executable, "-m", "tierlm.cli", "synth", "compare", str(jobf), "--config", "baseline",
                        "--config", "prefix-cache", "--config", "fp8", "--out", str(tmp_path / "cmp"),
                        "--no-progress", "--max-num-seqs", "4", "--kv-cache-memory", "128MiB",
                        "--max-pass-rate-drop", "0.5"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((tmp_path / "cmp/compare.json").read_text())
    assert list(result["configs"]) == ["baseline", "prefix-cache", "fp8"]
    assert result["configs"]["prefix-cache"]["same_text"] == 1.0  # exact: the same samples
    assert result["configs"]["fp8"]["same_text"] < 1.0  # lossy: some samples change
    assert r.stdout.strip().splitlines()[-1].startswith("verdict: ")
    assert "| fp8 |" in (tmp_path / "cmp/compare.md").read_text()


def test_scan_subcommands_on_a_samples_file(tmp_path):
    recs = [{"id": "a", "text": "Mail jane.doe@example.org or call +1 415-555-0132.", "accepted": True},
            {"id": "b", "text": "Nothing personal here, " + VERSE + ", said the reader.", "accepted": True},
            {"id": "c", "text": "{bad json", "accepted": False, "reject": "invalid JSON: Expecting value"}]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "corpus.txt").write_text(VERSE.capitalize() + ".\n")
    r = cli("scan", "pii", tmp_path / "s.jsonl", "--redacted", tmp_path / "red.jsonl", "--json", tmp_path / "p.json")
    assert r.returncode == 0, r.stderr[-2000:]
    pii = json.loads((tmp_path / "p.json").read_text())
    assert pii["counts"] == {"EMAIL_ADDRESS": 1, "PHONE_NUMBER": 1} and pii["samples"] == 2
    assert json.loads((tmp_path / "red.jsonl").read_text().splitlines()[0])["text"] == \
        "Mail <EMAIL_ADDRESS> or call <PHONE_NUMBER>."
    r = cli("scan", "leakage", tmp_path / "s.jsonl", "--corpus", tmp_path / "corpus.txt", "--json", tmp_path / "l.json")
    assert r.returncode == 0, r.stderr[-2000:]
    leak = json.loads((tmp_path / "l.json").read_text())
    assert leak["samples_with_match"] == 1 and leak["longest"][0]["id"] == "b" and leak["longest"][0]["text"] == VERSE
    r = cli("scan", "constraint", tmp_path / "s.jsonl", "--json", tmp_path / "c.json")
    c = json.loads((tmp_path / "c.json").read_text())
    assert r.returncode == 0 and c["pass_rate"] == pytest.approx(2 / 3) and c["failures"] == {"invalid JSON": 1}
    r = cli("scan", "leakage", tmp_path / "s.jsonl")
    assert r.returncode == 2 and "--corpus" in r.stderr
