"""A synth job: prompt templates x variables x samples, how to sample and constrain them, what to keep.

    name: people
    model: default                      # a model tierlm loads; with `url`, the served model's name
    url: null                           # an OpenAI-compatible base URL (http://host:port/v1) to run against instead
    chat: true                          # render prompts as a user message with the model's chat template
    system: null                        # a system message (chat only)
    templates:                          # name -> Jinja2 text, {{ variable }} placeholders
      person: "Invent a {{ job }} who lives in {{ city }}. Reply with JSON."
    variables:                          # a list, or a file: CSV (column) or JSONL (field)
      job: [baker, pilot, nurse]
      city: {file: cities.csv, column: name}
    samples_per_prompt: 4
    seed: 0                             # each sample's seed derives from it and the sample's id
    sampling: {temperature: 0.8, top_p: 0.95, max_tokens: 256}
    constraint: {json: {type: object, ...}}   # or json_file, json_object, regex, choice, grammar; none by default
    dedup: {exact: true, near_threshold: 0.8, num_perm: 128, shingle: 3}
    scan: {pii: true, leakage: [corpus/], membership: true, members: a.txt, nonmembers: b.txt}
    usd_per_hour: null                  # the machine's price: $ per 1M tokens and per 1,000 accepted samples

A template uses only the variables it names; its prompts are the product of their values, in the order the
variables are declared. Every sample has a stable id (template/prompt/sample) and seed, so a resumed or repeated
job produces the same records. Bad input (an unknown key, a template naming a variable with no values, a missing
variables file, a constraint the grammar library refuses) is one InvalidParameterError naming the fix.
"""
from __future__ import annotations

import csv
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierlm.core.errors import InvalidParameterError
from tierlm.core.sampling_params import StructuredOutputsParams

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "max_tokens", "min_tokens", "repetition_penalty",
                 "presence_penalty", "frequency_penalty", "stop")
JOB_KEYS = ("name", "model", "url", "chat", "system", "templates", "variables", "samples_per_prompt", "seed",
            "sampling", "constraint", "dedup", "scan", "usd_per_hour")


@dataclass(frozen=True)
class Dedup:
    exact: bool = True
    near_threshold: float | None = 0.8  # MinHash-estimated Jaccard at or over which a sample is a near-duplicate
    num_perm: int = 128
    shingle: int = 3  # words per shingle


@dataclass(frozen=True)
class ScanSpec:
    pii: bool = True
    pii_threshold: float = 0.4  # presidio scores phone numbers 0.4 without its NLP context boost
    leakage: tuple[str, ...] = ()  # reference corpus paths (files or directories)
    leakage_n: int = 8
    membership: bool = False  # score the samples under the generating model (on with a members/nonmembers split)
    members: str | None = None  # membership split: texts the model was trained on (one per line / JSONL "text")
    nonmembers: str | None = None
    reference_model: str | None = None  # for the loss-ratio score


@dataclass(frozen=True)
class Prompt:
    template: str
    number: int  # the prompt's position among its template's prompts
    variables: dict[str, str]
    text: str


@dataclass(frozen=True)
class Sample:
    index: int  # position in the job
    id: str  # template/prompt/sample
    prompt: Prompt
    sample: int
    seed: int


@dataclass
class Job:
    name: str
    templates: dict[str, str]
    variables: dict[str, list[str]]
    model: str | None = None
    url: str | None = None
    chat: bool = True
    system: str | None = None
    samples_per_prompt: int = 1
    seed: int = 0
    sampling: dict[str, Any] = field(default_factory=dict)
    constraint: StructuredOutputsParams | None = None
    dedup: Dedup = field(default_factory=Dedup)
    scan: ScanSpec = field(default_factory=ScanSpec)
    usd_per_hour: float | None = None
    source: str = "job"

    # ---- expansion -----------------------------------------------------------------------------
    def prompts(self) -> list[Prompt]:
        from jinja2 import StrictUndefined
        from jinja2.sandbox import SandboxedEnvironment

        env = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
        out = []
        for name, text in self.templates.items():
            used = [v for v in self.variables if v in _names(env, text)]
            tmpl = env.from_string(text)
            for number, values in enumerate(itertools.product(*(self.variables[v] for v in used))):
                bound = dict(zip(used, values))
                out.append(Prompt(name, number, bound, tmpl.render(**bound)))
        return out

    def samples(self) -> list[Sample]:
        out = []
        for p in self.prompts():
            for s in range(self.samples_per_prompt):
                sid = f"{p.template}/{p.number}/{s}"
                out.append(Sample(len(out), sid, p, s, sample_seed(self.seed, sid)))
        return out

    @property
    def digest(self) -> str:
        """What the records depend on (not where they are written or what is scanned afterwards)."""
        keep = {"templates": self.templates, "variables": self.variables, "model": self.model, "chat": self.chat,
                "system": self.system, "samples_per_prompt": self.samples_per_prompt, "seed": self.seed,
                "sampling": self.sampling, "constraint": self.constraint.key if self.constraint else None,
                "dedup": self.dedup.__dict__}
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sample_seed(job_seed: int, sample_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{job_seed}:{sample_id}".encode()).digest()[:4], "little") & 0x7FFFFFFF


def _names(env, text: str) -> set[str]:
    from jinja2 import meta

    return meta.find_undeclared_variables(env.parse(text))


# ---- loading ---------------------------------------------------------------------------------------
def load_job(path: str | Path) -> Job:
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InvalidParameterError(f"job file {path} does not exist", "pass the path of a synth job (YAML)") from None
    except yaml.YAMLError as e:
        raise InvalidParameterError(f"{path} is not valid YAML: {str(e).splitlines()[0]}", "fix the file") from None
    return job_from_dict(doc or {}, path.parent, str(path), default_name=path.stem)


def job_from_dict(doc: dict, base: Path, where: str = "job", default_name: str = "synth") -> Job:
    if not isinstance(doc, dict):
        raise InvalidParameterError(f"{where} must be a mapping", "write the job as YAML keys (see tierlm synth -h)")
    unknown = sorted(set(doc) - set(JOB_KEYS))
    if unknown:
        raise InvalidParameterError(f"unknown key(s) in {where}: {', '.join(unknown)}", f"use only {', '.join(JOB_KEYS)}")
    templates = doc.get("templates")
    if isinstance(templates, str):
        templates = {"prompt": templates}
    if not isinstance(templates, dict) or not templates or not all(
            isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in templates.items()):
        raise InvalidParameterError(f"{where}: templates must map names to non-empty texts",
                                    'write templates: {person: "Invent a {{ job }}..."}')
    variables = {str(k): _values(k, v, base, where) for k, v in (doc.get("variables") or {}).items()}
    job = Job(name=str(doc.get("name") or default_name), templates=dict(templates), variables=variables,
              model=doc.get("model"), url=doc.get("url"), chat=bool(doc.get("chat", True)), system=doc.get("system"),
              samples_per_prompt=_int(doc.get("samples_per_prompt", 1), "samples_per_prompt", where, 1),
              seed=_int(doc.get("seed", 0), "seed", where, 0), sampling=_sampling(doc.get("sampling") or {}, where),
              constraint=_constraint(doc.get("constraint"), base, where),
              dedup=_sub(Dedup, doc.get("dedup"), f"{where}.dedup"), scan=_scan(doc.get("scan"), base, where),
              usd_per_hour=doc.get("usd_per_hour"), source=where)
    _check_templates(job, where)
    if job.usd_per_hour is not None and (not isinstance(job.usd_per_hour, (int, float)) or job.usd_per_hour < 0):
        raise InvalidParameterError(f"{where}: usd_per_hour {job.usd_per_hour!r}", "give the machine's $ per hour")
    nt = job.dedup.near_threshold
    if nt is not None and not 0.0 < nt <= 1.0:
        raise InvalidParameterError(f"{where}.dedup.near_threshold {nt}", "give a Jaccard threshold in (0, 1], or null")
    return job


def _int(v, key: str, where: str, low: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise InvalidParameterError(f"{where}: {key} {v!r}", f"give an integer >= {low}")
    return v


def _sub(cls, data, where: str):
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise InvalidParameterError(f"{where} must be a mapping", f"fix {where}")
    names = set(cls.__dataclass_fields__)
    unknown = sorted(set(data) - names)
    if unknown:
        raise InvalidParameterError(f"unknown key(s) in {where}: {', '.join(unknown)}", f"use only {', '.join(names)}")
    return cls(**data)


def _scan(data, base: Path, where: str) -> ScanSpec:
    data = dict(data or {})
    leak = data.get("leakage") or ()
    data["leakage"] = tuple(str(_path(p, base)) for p in ([leak] if isinstance(leak, str) else leak))
    for key in ("members", "nonmembers"):
        if data.get(key):
            data[key] = str(_path(data[key], base, f"{where}.scan.{key}"))
    spec = _sub(ScanSpec, data, f"{where}.scan")
    if bool(spec.members) != bool(spec.nonmembers):
        raise InvalidParameterError(f"{where}.scan: members and nonmembers go together",
                                    "give both files (texts the model trained on, and held-out texts) or neither")
    return spec


def _path(p, base: Path, what: str = "file") -> Path:
    path = Path(str(p)).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.exists():
        raise InvalidParameterError(f"{what} {path} does not exist", "fix the path (relative paths are read from the "
                                                                     "job file's directory)")
    return path


def _values(name, spec, base: Path, where: str) -> list[str]:
    if isinstance(spec, (list, tuple)):
        values = [str(v) for v in spec]
    elif isinstance(spec, dict) and "file" in spec:
        values = _file_values(name, spec, _path(spec["file"], base, f"variables.{name}.file"))
    elif isinstance(spec, (str, int, float)):
        values = [str(spec)]
    else:
        raise InvalidParameterError(f"{where}: variables.{name} is {spec!r}",
                                    "give a list of values, or {file: values.csv, column: NAME} / {file: x.jsonl, field: NAME}")
    if not values:
        raise InvalidParameterError(f"{where}: variables.{name} has no values", "give at least one value")
    return values


def _file_values(name, spec: dict, path: Path) -> list[str]:
    key = spec.get("column") or spec.get("field")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        col = key or (list(rows[0]) if rows else [None])[0]
        if rows and col not in rows[0]:
            raise InvalidParameterError(f"variables.{name}: {path} has no column {col!r}",
                                        f"use one of {', '.join(rows[0])}")
        return [r[col] for r in rows if r.get(col)]
    if suffix in (".jsonl", ".ndjson"):
        out = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                raise InvalidParameterError(f"variables.{name}: {path} line {n} is not JSON", "fix the line") from None
            if isinstance(rec, dict):
                if key not in rec:
                    raise InvalidParameterError(f"variables.{name}: {path} line {n} has no field {key!r}",
                                                "name the field with field: NAME")
                rec = rec[key]
            out.append(str(rec))
        return out
    return [line for line in path.read_text().splitlines() if line.strip()]  # one value per line


def _sampling(data: dict, where: str) -> dict:
    if not isinstance(data, dict):
        raise InvalidParameterError(f"{where}.sampling must be a mapping", "e.g. sampling: {temperature: 0.8}")
    unknown = sorted(set(data) - set(SAMPLING_KEYS))
    if unknown:
        raise InvalidParameterError(f"unknown key(s) in {where}.sampling: {', '.join(unknown)}",
                                    f"use only {', '.join(SAMPLING_KEYS)} (seeds come from the job's seed)")
    from tierlm.core.sampling_params import SamplingParams

    SamplingParams(**data)  # range checks, named
    return dict(data)


def _constraint(data, base: Path, where: str) -> StructuredOutputsParams | None:
    if data is None:
        return None
    if isinstance(data, dict) and "json_file" in data:
        path = _path(data["json_file"], base, f"{where}.constraint.json_file")
        try:
            schema = json.loads(path.read_text())
        except ValueError as e:
            raise InvalidParameterError(f"{path} is not JSON: {e}", "fix the schema file") from None
        data = dict(data)
        del data["json_file"]
        data["json"] = schema
    params = StructuredOutputsParams.from_dict(data)
    from tierlm.engine.structured import check_constraint

    check_constraint(params)  # a constraint the grammar library refuses stops the job before the model loads
    return params


def _check_templates(job: Job, where: str) -> None:
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import SandboxedEnvironment

    env = SandboxedEnvironment()
    for name, text in job.templates.items():
        try:
            names = _names(env, text)
        except TemplateSyntaxError as e:
            raise InvalidParameterError(f"{where}: template {name!r} line {e.lineno}: {e.message}",
                                        "fix the template (Jinja2 syntax: {{ variable }})") from None
        missing = sorted(names - set(job.variables))
        if missing:
            raise InvalidParameterError(f"{where}: template {name!r} uses {', '.join(missing)} but variables gives "
                                        f"{'no value' if len(missing) == 1 else 'no values'} for "
                                        f"{'it' if len(missing) == 1 else 'them'}",
                                        f"add {missing[0]}: [value, ...] under variables, or remove it from the "
                                        "template")
