"""Collecting runs for `bltool report`: find the artifacts under some directories and link them by
content hash into one row per model.

Every bltool artifact cites its inputs in its manifest: `compress` cites the distilled student by its
artifact hash, and `eval-ppl`, `eval-icl` and `bench` cite the model they measured by content
(`content.artifact_hash` for a bltool artifact, file hashes otherwise). So no naming convention is
needed: whatever directories hold a run's artifacts, the hashes say which result belongs to which model.

A row is one model as a user would deploy it: a distilled student (with its compressed form, whose
measurements are preferred when both exist, since that is what gets served), or a model that was only
evaluated (the teacher, the untrained student). Values a row lacks stay None and the stages that would
have produced them are listed in `missing`, so an incomplete run is reported, never dropped. A row whose
values come from both forms of a student, or from one of two evaluations of one model by the same stage,
says so in `conflicts` (the newest evaluation is used), for `report` to refuse or mark.

A `capacity` plan covers several models: its inputs cite each as a `bench-serving` artifact (by artifact
hash; that artifact names its model by content) or as a model by content, in the order of its result.json's
rows, so each row gets its own model's plan (`_add_capacity`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from bltool.artifacts import MANIFEST, STAGE_DIRS, Stage, read_manifest
from bltool.errors import UsageError
from bltool.eval.probes import composite_se, standard_error
from bltool.train import methods

EVALUATIONS = (Stage.EVAL_PPL, Stage.EVAL_ICL, Stage.BENCH, Stage.BENCH_SERVING)
MODELS = (Stage.DISTILL, Stage.COMPRESS, Stage.BUILD_STUDENT, Stage.IMPORT_GGUF)
COLUMNS = ("name", "method", "budget", "tokens", "perplexity", "perplexity_se", "bits_per_byte", "icl_composite",
           "icl_se", "icl_seed_std", "icl_baseline", "compute_proxy", "compute_realised", "mac_speedup",
           "module_speedup", "prefill_speedup", "decode_speedup", "param_reduction", "serving_decode_tps",
           "serving_engine", "serving_rate", "serving_binding", "servers", "kept", "svd", "dropped", "missing", "path")


@dataclass
class Artifact:
    path: Path
    manifest: dict
    root: Path | None = None  # the RUN_DIR it was found under

    @property
    def name(self) -> str:
        """The artifact's directory relative to its RUN_DIR, without a trailing `distilled` / `compressed`
        (runs/bl-0.4/distilled → bl-0.4), so a row is named after its run."""
        try:
            parts = list(self.path.relative_to(self.root).parts) if self.root else [self.path.name]
        except ValueError:
            parts = [self.path.name]
        if len(parts) > 1 and parts[-1] in STAGE_DIRS:
            parts = parts[:-1]
        return "/".join(parts) or self.path.name

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def hash(self) -> str:
        return self.manifest["hash"]

    def model_key(self) -> str | None:
        """The content key of the model an evaluation or compression measured."""
        for entry in self.manifest.get("inputs", []):
            if entry.get("role") == "model":
                if "hash" in entry:  # artifact_ref (compress)
                    return entry["hash"]
                return content_key(entry.get("content"))
        return None

    def result(self) -> dict:
        """The evaluation's result.json, checked against the manifest first (size and SHA-256)."""
        read_manifest(self.path, (self.stage,), "RUN_DIR")
        path = self.path / "result.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def content_key(content: dict | None) -> str | None:
    if not content:
        return None
    if "artifact_hash" in content:
        return content["artifact_hash"]
    return json.dumps(content, sort_keys=True)


def find_artifacts(roots: list[Path]) -> list[Artifact]:
    """Every directory with a bltool manifest under `roots` (checkpoints of interrupted runs excluded)."""
    found, seen = [], set()
    for root in roots:
        root = Path(root).resolve()
        if not root.exists():
            raise UsageError(f"RUN_DIR: {root} does not exist")
        candidates = [root / MANIFEST] if (root / MANIFEST).is_file() else []
        candidates += sorted(root.rglob(MANIFEST))
        for path in candidates:
            directory = path.parent.resolve()
            if directory in seen or any(part.startswith(".") for part in directory.parts[-1:]):
                continue
            seen.add(directory)
            try:
                manifest = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                raise UsageError(f"RUN_DIR: {path} is not valid JSON") from None
            if isinstance(manifest, dict) and "stage" in manifest and "hash" in manifest:
                found.append(Artifact(directory, manifest, root))
    return found


@dataclass
class Row:
    name: str
    path: str
    method: str
    budget: float | None = None
    tokens: int | None = None
    values: dict[str, Any] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    log: Path | None = None  # the distill run's per-step log, for the dense-fraction figure
    # how each evaluation was run: {stage: {setting: value}}, what `evaluation_differences` compares
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    # what makes the row itself mixed: evaluations of both the distilled and the compressed form, or two
    # evaluations of one model by one stage (`report` refuses these, or marks the row with --allow-mixed)
    conflicts: list[str] = field(default_factory=list)
    # which engine and machine measured its serving costs (bench-serving), for the report's note
    serving_machine: str | None = None
    # the artifact each evaluation's values come from ({stage: directory}), for the paired comparisons
    sources: dict[str, Path] = field(default_factory=dict)

    # the capacity plan's row for this model ({label, max_stable_rate, gpus, binding, ...}), when one was made
    capacity: dict | None = None
    # the content keys of the models the row stands for (the distilled student, then its compressed form)
    keys: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        row = {"name": self.name, "method": self.method, "budget": self.budget, "tokens": self.tokens,
               **{c: self.values.get(c) for c in COLUMNS if c not in ("name", "method", "budget", "tokens",
                                                                       "missing", "path")},
               "missing": ", ".join(self.missing), "path": self.path}
        return {c: row[c] for c in COLUMNS}


def build_rows(artifacts: list[Artifact]) -> list[Row]:
    by_hash = {a.hash: a for a in artifacts}
    found: dict[str, dict[str, list[Artifact]]] = {}
    labels: dict[str, str] = {}
    for a in artifacts:
        if a.stage in EVALUATIONS and (key := a.model_key()):
            found.setdefault(key, {}).setdefault(a.stage, []).append(a)
            spec = next((e.get("spec") for e in a.manifest["inputs"] if e.get("role") == "model"), None)
            labels.setdefault(key, Path(spec).name if spec else key[:12])
    # one evaluation per model and stage: the newest; a second one is a conflict the row reports
    evaluations = {key: {stage: _newest(group) for stage, group in by_stage.items()} for key, by_stage in found.items()}
    duplicates = {key: {stage: group for stage, group in by_stage.items() if len(group) > 1}
                  for key, by_stage in found.items()}
    teachers = {content_key(e.get("content")) for a in artifacts if a.stage in (Stage.DISTILL, Stage.TEACHER_LOGITS)
                for e in a.manifest.get("inputs", []) if e.get("role") == "teacher"}
    compressed_of: dict[str, Artifact] = {}
    for a in artifacts:
        if a.stage == Stage.COMPRESS and not a.manifest.get("compressed", {}).get("densified"):
            compressed_of.setdefault(a.model_key(), a)

    rows, used = [], set()
    for d in (a for a in artifacts if a.stage == Stage.DISTILL):
        c = compressed_of.get(d.hash)
        row = _distill_row(d, c, evaluations)
        row.keys = (d.hash, *([c.hash] if c else []))
        for key in (d.hash, *([c.hash] if c else [])):
            row.conflicts += _duplicate_notes(row.name, duplicates.get(key, {}))
        used.update({d.hash} | ({c.hash} if c else set()))
        rows.append(row)
    for key, evals in evaluations.items():
        if key in used:
            continue
        model = by_hash.get(key)
        if model is not None and model.stage == Stage.COMPRESS:
            continue  # a compressed model whose distilled input is not among the runs: reported via bench
        method = {Stage.BUILD_STUDENT: "student (untrained)", Stage.IMPORT_GGUF: "teacher"}.get(
            model.stage if model else "", "teacher" if key in teachers else "model")
        name = model.name if model is not None and model.stage == Stage.BUILD_STUDENT else labels[key]
        row = Row(name, str(model.path) if model else labels[key], method, keys=(key,))
        _add_evaluations(row, evals, need=(Stage.EVAL_PPL, Stage.EVAL_ICL))
        row.conflicts += _duplicate_notes(row.name, duplicates.get(key, {}))
        rows.append(row)
    _add_capacity(rows, artifacts, by_hash)
    return rows


def _newest(group: list[Artifact]) -> Artifact:
    """The most recently written of several evaluations of one model by one stage (the last path on a tie)."""
    return max(enumerate(group), key=lambda item: (item[1].manifest.get("created_at", ""), item[0]))[1]


def _duplicate_notes(name: str, duplicates: dict[str, list[Artifact]]) -> list[str]:
    notes = []
    for stage, group in duplicates.items():
        used = _newest(group)
        others = ", ".join(str(a.path) for a in group if a is not used)
        notes.append(f"{name}: {len(group)} {stage} results for one model; used the newest, {used.path}, "
                     f"not {others}")
    return notes


def _distill_row(d: Artifact, c: Artifact | None, evaluations: dict[str, dict[str, Artifact]]) -> Row:
    m = d.manifest
    row = Row(d.name, str(d.path), m.get("method") or m["config"].get("method", "?"),
              budget=(m.get("budget") or {}).get("budget"), tokens=(m.get("training") or {}).get("tokens_seen"))
    log = d.path / "log.arrow"
    row.log = log if log.is_file() else None
    if m.get("evaluation"):  # distill --eval-every: the held-out slice its learning curve was scored on
        row.settings[Stage.DISTILL] = {"held-out data": m["evaluation"].get("data"),
                                       "--eval-tokens": m["evaluation"].get("tokens")}
    compute = m.get("compute") or {}
    row.values.update(compute_proxy=compute.get("proxy"), compute_realised=compute.get("realised"))
    if c is None:
        row.missing.append(Stage.COMPRESS)
        evals = evaluations.get(d.hash, {})
    else:
        summary = c.manifest["compressed"].get("summary", {})
        row.values.update(mac_speedup=summary.get("mac_speedup"), param_reduction=summary.get("param_reduction"),
                          kept=summary.get("kept"), svd=summary.get("svd"), dropped=summary.get("dropped"))
        method = methods.find(row.method)
        if method and method.compress == methods.COPY and row.values["mac_speedup"] is None:  # dense by design
            row.values.update(mac_speedup=1.0, param_reduction=0.0)
        row.path = str(c.path)
        # measurements of the compressed form first; the distilled form's fill what is left
        of_distilled, of_compressed = evaluations.get(d.hash, {}), evaluations.get(c.hash, {})
        evals = {**of_distilled, **of_compressed}
        from_distilled = [stage for stage in evals if stage not in of_compressed]
        if from_distilled and of_compressed:  # one row, two models: SVD makes them differ
            row.conflicts.append(
                f"{row.name}: {' and '.join(from_distilled)} measured the distilled form ({d.path}), "
                f"{' and '.join(of_compressed)} the compressed form ({c.path})")
    _add_evaluations(row, evals, need=(Stage.EVAL_PPL, Stage.EVAL_ICL, Stage.BENCH))
    return row


def _add_evaluations(row: Row, evals: dict[str, Artifact], need: tuple[str, ...]) -> None:
    row.sources.update({stage: artifact.path for stage, artifact in evals.items()})
    if Stage.EVAL_PPL in evals:
        r = evals[Stage.EVAL_PPL].result()
        row.values.update(perplexity=r.get("perplexity"), perplexity_se=r.get("perplexity_se"),
                          bits_per_byte=r.get("bits_per_byte"))
        row.settings[Stage.EVAL_PPL] = ppl_settings(evals[Stage.EVAL_PPL].manifest)
    if Stage.EVAL_ICL in evals:
        artifact = evals[Stage.EVAL_ICL]
        r = artifact.result().get("composite", {})
        se = r["se"] if "se" in r else icl_se_from_predictions(artifact.path)
        row.values.update(icl_composite=r.get("mean"), icl_se=se, icl_seed_std=r.get("seed_std", r.get("std")),
                          icl_baseline=r.get("baseline"))
        row.settings[Stage.EVAL_ICL] = icl_settings(artifact.manifest)
    if Stage.BENCH in evals:
        r = evals[Stage.BENCH].result()
        prefill = [s for s in r.get("modules", []) if s.get("phase") == "prefill"]
        e2e = {(s["phase"], s["batch"]): s for s in r.get("end_to_end", [])}
        decode = sorted((k for k in e2e if k[0] == "decode"), key=lambda k: k[1])
        row.values.update(
            module_speedup=prefill[0]["speedup"] if prefill else None,
            prefill_speedup=e2e[("prefill", 1)]["speedup"] if ("prefill", 1) in e2e else None,
            decode_speedup=e2e[decode[0]]["speedup"] if decode else None,
        )
    if Stage.BENCH_SERVING in evals:
        r = evals[Stage.BENCH_SERVING].result()
        row.values.update(serving_decode_tps=r.get("decode_tokens_per_s"), serving_engine=r.get("engine"))
        row.settings[Stage.BENCH_SERVING] = bench_serving_settings(r)
        row.serving_machine = serving_machine(r)
    row.missing += [stage for stage in need if stage not in evals]


def serving_machine(result: dict) -> str:
    """Which machine and engine a bench-serving result measured on: "transformers 4.57 on cuda (NVIDIA H100),
    bfloat16" or "vllm 0.11 on cpu (AMD EPYC …), 2 threads, float32"."""
    engine = result.get("engine", "transformers")
    version = result.get(engine) or ""
    where = f"{result.get('device', '?')} ({result.get('device_name', '?')})"
    threads = ""
    if str(result.get("device", "")).startswith("cpu") and "threads" in result:
        threads = f", {result['threads']} thread{'' if result['threads'] == 1 else 's'}"
    return f"{engine} {version}".strip() + f" on {where}{threads}, {result.get('dtype', '?')}"


def bench_serving_settings(result: dict) -> dict[str, Any]:
    """What must match for two bench-serving measurements (and the plans made from them) to be compared: the
    engine, the machine, the dtype and the measured load."""
    settings = result.get("settings", {})
    measured = ("concurrency", "prompt_len", "output_len", "chunk")
    return {"engine": result.get("engine", "transformers"), "device": result.get("device_name"),
            "dtype": result.get("dtype"), **{f"--{k.replace('_', '-')}": settings.get(k) for k in measured}}


def capacity_settings(manifest: dict) -> dict[str, Any]:
    """What must match for two capacity plans to be compared: the workload (a trace by content, or its
    length distributions), the accelerator memory and what is planned for."""
    config = manifest.get("config", {})
    trace = _input(manifest, "workload")
    workload = (f"trace {trace[0].get('sha256', '')[:12]}" if trace else
                f"--prompt-len {config.get('prompt_len')} --output-len {config.get('output_len')} "
                f"--samples {config.get('samples')} --seed {config.get('seed')}")
    return {"workload": workload, "--gpu-mem": config.get("gpu_mem"), "--mem-util": config.get("mem_util"),
            "--activation-reserve": config.get("activation_reserve"), "--dtype": config.get("dtype"),
            "--chunk": config.get("chunk"), "--rate": config.get("rate"), "--target-util": config.get("target_util"),
            "--iteration-stat": config.get("iteration_stat")}


def _add_capacity(rows: list[Row], artifacts: list[Artifact], by_hash: dict[str, Artifact]) -> None:
    """Each row's capacity plan: a `capacity` artifact's inputs are, per model, a bench-serving artifact (whose
    own manifest names the model it served, by content) or a model by content, in the order of its
    result.json's rows. The newest plan of a model is used (a second is a conflict), the compressed form's
    before the distilled one's; when some row has a plan, the distilled students and the teacher without
    one list `capacity` as missing."""
    plans: dict[str, list[tuple[Artifact, int]]] = {}
    for a in artifacts:
        if a.stage != Stage.CAPACITY:
            continue
        models = [e for e in a.manifest.get("inputs", []) if e.get("role") in ("model", Stage.BENCH_SERVING)]
        for i, entry in enumerate(models):
            if entry.get("role") == Stage.BENCH_SERVING:
                measured = by_hash.get(entry.get("hash"))
                key = measured.model_key() if measured is not None else None
            else:
                key = content_key(entry.get("content"))
            if key:
                plans.setdefault(key, []).append((a, i))
    for row in rows:
        key = next((k for k in reversed(row.keys) if k in plans), None)
        if key is None:
            continue
        group = plans[key]
        artifact, index = max(enumerate(group), key=lambda item: (item[1][0].manifest.get("created_at", ""),
                                                                   item[0]))[1]
        if len(group) > 1:
            others = ", ".join(str(a.path) for a, _ in group if a is not artifact)
            row.conflicts.append(f"{row.name}: {len(group)} capacity plans for one model; used the newest, "
                                 f"{artifact.path}, not {others}")
        plan = artifact.result().get("models", [])[index]
        row.capacity = plan
        row.sources[Stage.CAPACITY] = artifact.path
        row.settings[Stage.CAPACITY] = capacity_settings(artifact.manifest)
        row.values.update(serving_rate=plan.get("max_stable_rate"), serving_binding=plan.get("binding"),
                          servers=plan.get("gpus"))
    if any(row.capacity is not None for row in rows):
        for row in rows:
            if row.capacity is None and (row.method == "teacher" or methods.find(row.method) is not None):
                row.missing.append(Stage.CAPACITY)


def icl_se_from_predictions(path: Path) -> float | None:
    """The composite's standard error of an eval-icl run written before result.json recorded one,
    recomputed from its predictions.arrow (one row per task, seed and query) as eval-icl computes it now."""

    file = path / "predictions.arrow"
    if not file.is_file():
        return None
    try:
        with pa.memory_map(str(file)) as source:
            rows = pa.ipc.open_stream(source).read_all().select(["task", "seed", "query", "correct"]).to_pylist()
    except (pa.ArrowInvalid, KeyError):
        return None
    grids: dict[str, dict[int, dict[int, bool]]] = {}
    for r in rows:
        grids.setdefault(r["task"], {}).setdefault(r["seed"], {})[r["query"]] = bool(r["correct"])
    ses = []
    for by_seed in grids.values():
        queries = sorted(next(iter(by_seed.values())))
        ses.append(standard_error([[by_seed[s][j] for j in queries] for s in sorted(by_seed)]))
    return composite_se(ses)


# ---------------------------------------------------------------------------------------------------
# Were the rows evaluated the same way?


def _input(manifest: dict, role: str) -> list[dict]:
    return [e for e in manifest.get("inputs", []) if e.get("role") == role]


def ppl_settings(manifest: dict) -> dict[str, Any]:
    """What must match for two perplexities to be compared: the held-out data (by content) and the token
    budget scored."""
    data = _input(manifest, "data")
    return {"held-out data": data[0].get("hash") if data else None,
            "--max-tokens": manifest.get("config", {}).get("max_tokens")}


def icl_settings(manifest: dict) -> dict[str, Any]:
    """What must match for two ICL composites to be compared: the protocol's sizes and the probe set
    (built-in pools by the SHA-256 of their pairs, files by content, whatever their paths)."""
    config = manifest.get("config", {})
    probes = [{k: v for k, v in e.items() if k != "path"} for e in _input(manifest, "probes")]
    return {"--n": config.get("n"), "--shots": config.get("shots"), "--seeds": config.get("seeds"),
            "probe set": json.dumps(probes, sort_keys=True)}


def evaluation_differences(rows: list[Row]) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Per evaluation stage, the settings that differ between the rows that have it: {stage: [(setting,
    {row name: value})]}; empty when every compared row was evaluated the same way."""
    out: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for stage in (Stage.EVAL_PPL, Stage.EVAL_ICL, Stage.BENCH_SERVING, Stage.CAPACITY):
        having = [r for r in rows if stage in r.settings]
        keys = dict.fromkeys(k for r in having for k in r.settings[stage])
        for key in keys:
            values = {r.name: r.settings[stage].get(key) for r in having}
            if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
                out.setdefault(stage, []).append((key, values))
    return out


def describe_difference(setting: str, values: dict[str, Any]) -> str:
    """`--n differs: bl 10, lora 20` (hashes and probe sets shortened to a digest)."""
    def short(v):
        if isinstance(v, str) and len(v) > 16:
            import hashlib

            return hashlib.sha256(v.encode()).hexdigest()[:10] if v.startswith("[") else v[:10]
        return v

    return f"{setting} differs: " + ", ".join(f"{name} {short(v)}" for name, v in values.items())


FLOATS = ("perplexity", "perplexity_se", "bits_per_byte", "icl_composite", "icl_se", "icl_seed_std", "icl_baseline",
          "compute_proxy", "compute_realised", "mac_speedup", "module_speedup", "prefill_speedup", "decode_speedup",
          "param_reduction", "serving_decode_tps", "serving_rate")


def rows_table(rows: list[Row]) -> pa.Table:
    types = {"name": pa.string(), "method": pa.string(), "budget": pa.float64(), "tokens": pa.int64(),
             **{c: pa.float64() for c in FLOATS}, "serving_engine": pa.string(), "serving_binding": pa.string(),
             "servers": pa.int64(), "kept": pa.int64(), "svd": pa.int64(), "dropped": pa.int64(),
             "missing": pa.string(), "path": pa.string()}
    return pa.Table.from_pylist([r.as_dict() for r in rows], schema=pa.schema([(c, types[c]) for c in COLUMNS]))
