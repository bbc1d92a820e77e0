"""Import of sources in Neuronpedia's bulk layout (app/export.py writes it; Neuronpedia's own
exports have it) and in SAEDashboard's `batch-N.json` output (its NeuronpediaRunner's upload
files), so a published or generated source can be browsed here offline.

Each reader turns a folder into `SourceFiles` (rows in Neuronpedia's column names); one writer
stores them. Tokens arrive as strings: an imported model's vocabulary is the distinct token
strings of its files (ids in order of first appearance), and each example is a sequence of its
own. What the formats do not carry is listed in the README ("Export and import"). Everything of
one import is written in one transaction.
"""

from __future__ import annotations

import bisect
import datetime as dt
import gzip
import hashlib
import json
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import Engine, insert, select

from app.db.engine import transaction
from app.db.tables import (
    SEQUENCE_TOKENS,
    BosPolicy,
    Dataset,
    ExampleBlock,
    ExampleGroup,
    Explanation,
    Feature,
    Model,
    PeakToken,
    Relation,
    RelationKind,
    Sequence,
    Source,
    SourceStatus,
    Vocabulary,
    example_record,
)
from app.export import CREATOR, GROUP_TAG
from app.histogram import HIST_BINS, histogram_edges

N_TOP_TOKENS = 5


class ImportFormatError(ValueError):
    """The folder is not a Neuronpedia export, or does not fit the database."""


def _lines(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _batches(folder: Path) -> list[dict]:
    files = sorted(folder.glob("batch-*.jsonl*"),
                   key=lambda p: int(re.match(r"batch-(\d+)", p.name).group(1)))
    return [row for f in files for row in _lines(f)]


@dataclass
class SourceFiles:
    """One source read from a folder, as rows in Neuronpedia's column names."""

    folder: Path
    origin: str  # what wrote it, for the dataset row
    model: str
    model_meta: dict
    source_meta: dict
    feats: list[dict]
    acts: list[dict]
    expl: list[dict]

    @property
    def slug(self) -> str:
        return self.source_meta.get("id") or self.feats[0]["layer"]


def read_neuronpedia(folder: Path) -> SourceFiles:
    """A folder of Neuronpedia's bulk layout: features/, activations/, explanations/."""
    meta = {k: (_lines(folder / f"{k}.jsonl")[0] if (folder / f"{k}.jsonl").is_file() else {})
            for k in ("model", "source")}
    feats = _batches(folder / "features")
    return SourceFiles(folder, f"neuronpedia export {folder.name}",
                       meta["model"].get("id") or feats[0]["modelId"], meta["model"],
                       meta["source"], feats, _batches(folder / "activations"),
                       _batches(folder / "explanations") if (folder / "explanations").is_dir()
                       else [])


BATCH_JSON = re.compile(r"batch-(\d+)\.json")
# SAEDashboard's NeuronpediaRunner names its output folder {model}_{sae_set}_{hook}_{d_sae}[_sfx]
SAED_FOLDER = re.compile(r"_(?P<hook>blocks\.\d+\.[\w.]+?)_(?P<width>\d+)(?:_|$)")
SAED_BATCH = ("model_id", "layer", "sae_set", "features")
SAED_FEATURE = ("feature_index", "activations", "pos_str", "pos_values", "neg_str", "neg_values",
                "frac_nonzero", "freq_hist_data_bar_heights", "freq_hist_data_bar_values")
SAED_ACTIVATION = ("tokens", "values", "bin_min", "bin_max")
NUMBER = (int, float)


def _need(row, keys: tuple[str, ...], where: str) -> dict:
    if not isinstance(row, dict):
        raise ImportFormatError(f"{where} is not a JSON object")
    missing = [k for k in keys if k not in row]
    if missing:
        raise ImportFormatError(f"{where} lacks {', '.join(missing)}")
    return row


def _listed(row: dict, key: str, kind: type | tuple[type, ...], where: str) -> list:
    """row[key], a list whose items are all of `kind` (booleans are not numbers)."""
    xs = row[key]
    if not isinstance(xs, list) or any(isinstance(x, bool) or not isinstance(x, kind)
                                       for x in xs):
        raise ImportFormatError(f"{where}: {key} is not a list of "
                                f"{'strings' if kind is str else 'numbers'}")
    return xs


def _saed_activation(idx: int, a: dict, where: str) -> dict:
    """One SAEDashboard activation as a Neuronpedia Activation row: the peak is the first
    largest value; the top group has bin_min -1 as in Neuronpedia's layout."""
    vals = _listed(_need(a, SAED_ACTIVATION, where), "values", NUMBER, where)
    if not vals or len(vals) != len(_listed(a, "tokens", str, where)):
        raise ImportFormatError(f"{where} has {len(a['tokens'])} tokens and {len(vals)} values")
    if not all(isinstance(a[k], NUMBER) and not isinstance(a[k], bool)
               for k in ("bin_min", "bin_max")):
        raise ImportFormatError(f"{where}: bin_min and bin_max are not numbers")
    peak = max(range(len(vals)), key=vals.__getitem__)
    return {"index": idx, "tokens": a["tokens"], "values": vals, "maxValue": vals[peak],
            "maxValueTokenIndex": peak, "minValue": min(vals), "binMin": a["bin_min"],
            "binMax": a["bin_max"]}


def _saed_feature(f: dict, where: str) -> tuple[dict, list[dict]]:
    """One SAEDashboard feature as a Neuronpedia Neuron row and its Activation rows."""
    idx = int(_need(f, SAED_FEATURE, where)["feature_index"])
    for k in ("pos", "neg"):
        if len(_listed(f, k + "_str", str, where)) != len(_listed(f, k + "_values", NUMBER,
                                                                   where)):
            raise ImportFormatError(f"{where}: {k}_str and {k}_values differ in length")
    for k in ("freq_hist_data_bar_heights", "freq_hist_data_bar_values"):
        _listed(f, k, NUMBER, where)
    rows = [_saed_activation(idx, a, f"{where}: activation {i}")
            for i, a in enumerate(f["activations"])]
    return ({"index": idx, "maxActApprox": max((r["maxValue"] for r in rows), default=0.0),
             **{k: f[k] for k in SAED_FEATURE[2:]}}, rows)


def _saed_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ImportFormatError(f"{path} is not JSON: {exc}") from None


def read_saedashboard(folder: Path) -> SourceFiles:
    """A folder of SAEDashboard's batch-N.json files (one JSON object each: model_id, layer,
    sae_set and its features with their activations), plus its run_settings.json if present.
    The source is named as Neuronpedia names it: {layer}-{sae_set}[__{suffix}], the suffix from
    the batch's sae_id_suffix or the run's np_sae_id_suffix; the max is the largest activation."""
    files = sorted((p for p in folder.glob("batch-*.json") if BATCH_JSON.fullmatch(p.name)),
                   key=lambda p: int(BATCH_JSON.fullmatch(p.name).group(1)))
    heads, feats, acts, dataset = set(), [], [], None
    for path in files:
        batch = _need(_saed_json(path), SAED_BATCH, str(path))
        try:
            heads.add((str(batch["model_id"]), int(batch["layer"]), str(batch["sae_set"]),
                       batch.get("sae_id_suffix")))
            for n, f in enumerate(batch["features"]):
                feat, rows = _saed_feature(f, f"{path}: feature {n}")
                feats.append(feat)
                acts += rows
                dataset = dataset or f.get("dataset")
        except ImportFormatError:
            raise
        except (TypeError, ValueError) as exc:
            raise ImportFormatError(f"{path}: {exc}") from None
    if not feats:
        raise ImportFormatError(f"{folder}: its batch files hold no features")
    if len(heads) != 1:
        raise ImportFormatError(f"{folder}: its batch files are of {len(heads)} sources "
                                f"{sorted(map(str, heads))}: one folder holds one source")
    dup = [i for i, c in Counter(f["index"] for f in feats).items() if c > 1]
    if dup:
        raise ImportFormatError(f"{folder}: feature {dup[0]} is in more than one batch file")
    (model, layer, sae_set, suffix), = heads
    settings = folder / "run_settings.json"
    settings = _need(_saed_json(settings), (), str(settings)) if settings.is_file() else {}
    named = SAED_FOLDER.search(folder.name)
    suffix = suffix or settings.get("np_sae_id_suffix")
    meta = {"id": f"{layer}-{sae_set}" + (f"__{suffix}" if suffix else ""),
            "hookName": named.group("hook") if named else f"blocks.{layer}",
            "numFeatures": int(named.group("width")) if named else 0,
            "dataset": settings.get("huggingface_dataset_path") or dataset}
    return SourceFiles(folder, f"SAEDashboard output {folder.name}", model, {}, meta, feats,
                       acts, [])


def source_folders(root: Path) -> list[tuple[Path, Callable[[Path], SourceFiles]]]:
    """The folders under root (itself included, two levels down) that hold a source, each with
    its reader: features/batch-N.jsonl[.gz] is Neuronpedia's layout, batch-N.json SAEDashboard's."""
    found = {}
    for depth in ("", "*/", "*/*/"):
        for p in root.glob(f"{depth}features"):
            if p.is_dir() and any(p.glob("batch-*.jsonl*")):
                found[p.parent] = read_neuronpedia
        for p in root.glob(f"{depth}batch-*.json"):
            if p.is_file() and BATCH_JSON.fullmatch(p.name):
                found.setdefault(p.parent, read_saedashboard)
    if not found:
        raise ImportFormatError(f"{root} holds no Neuronpedia export (no features/batch-N.jsonl.gz)"
                                " and no SAEDashboard output (no batch-N.json)")
    return sorted(found.items())


@dataclass
class Tokens:
    """The vocabulary of an imported model: token strings, ids in order of first appearance."""

    ids: dict[str, int] = field(default_factory=dict)

    def of(self, texts: list[str]) -> list[int]:
        return [self.ids.setdefault(t, len(self.ids)) for t in texts]


def _group_codes(acts: list[dict]) -> list[int]:
    """Each activation's example group: its tag where this project wrote it, else top for
    activations without a bin (or binMin -1) and quantile-N by ascending bin."""
    bins = sorted({(a["binMin"], a.get("binMax")) for a in acts
                   if not str(a.get("dataSource") or "").startswith(GROUP_TAG)
                   and a.get("binMin") not in (None, -1)})
    codes = []
    for a in acts:
        tag = str(a.get("dataSource") or "")
        if tag.startswith(GROUP_TAG):
            codes.append(ExampleGroup.code_of(tag[len(GROUP_TAG):]))
        elif a.get("binMin") in (None, -1):
            codes.append(ExampleGroup.top)
        else:
            codes.append(ExampleGroup.quantile + bins.index((a["binMin"], a.get("binMax"))))
    return codes


def _histogram(row: dict) -> list[int]:
    """Bars (activation, count) on this project's fixed bins."""
    edges = histogram_edges()
    counts = [0] * HIST_BINS
    for v, n in zip(row.get("freq_hist_data_bar_values") or [],
                    row.get("freq_hist_data_bar_heights") or [], strict=False):
        counts[min(HIST_BINS - 1, max(0, bisect.bisect_right(edges, v) - 1))] += int(n)
    return counts


def _idx(row: dict) -> int:
    return int(row["index"])


@dataclass
class Imported:
    model: str
    sources: list[str]
    n_features: int


def import_dir(engine: Engine, root: Path) -> list[Imported]:
    """Import every source folder under root, in one transaction."""
    by_model: dict[str, list[SourceFiles]] = defaultdict(list)
    for folder, read in source_folders(Path(root)):
        part = read(folder)
        same = [p.folder for p in by_model[part.model] if p.slug == part.slug]
        if same:
            raise ImportFormatError(f"{same[0]} and {folder} both hold {part.model}/{part.slug}")
        by_model[part.model].append(part)
    out = []
    with transaction(engine) as s:
        for model, parts in by_model.items():
            if s.scalar(select(Model.id).where(Model.slug == model)) is not None:
                raise ImportFormatError(f"the database already has a model {model!r}: import into "
                                   "a database without it")
            tokens = Tokens()
            for part in parts:  # the vocabulary first: the model row needs it
                for a in part.acts:
                    tokens.of(a["tokens"])
                for f in part.feats:
                    tokens.of(f.get("pos_str") or [])
                    tokens.of(f.get("neg_str") or [])
            meta = parts[0].model_meta
            vocab = list(tokens.ids)
            thash = "strings:" + hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:24]
            m = Model(slug=model, hub_id=f"import:{root}", revision=None, arch="imported",
                      n_layers=int(meta.get("layers") or 0), d_model=int(meta.get("dimension") or 0),
                      d_mlp=int(meta.get("neuronsPerLayer") or 0), vocab_size=len(vocab),
                      tokenizer_hash=thash)
            s.add(m)
            s.flush()
            s.add(Vocabulary(model_id=m.id, tokens=vocab))
            names = [_import_source(s, m, tokens, part) for part in parts]
            out.append(Imported(model, names, sum(len(p.feats) for p in parts)))
    return out


def _import_source(s, m: Model, tokens: Tokens, part: SourceFiles) -> str:
    folder, meta, feats, acts, expl = (part.folder, part.source_meta, part.feats, part.acts,
                                       part.expl)
    slug = part.slug
    hook = meta.get("hookName") or feats[0].get("hookName") or ""
    layer = re.match(r"(?:blocks\.)?(\d+)", hook) or re.match(r"(\d+)", slug)
    n_features = max(int(meta.get("numFeatures") or 0), max(_idx(f) for f in feats) + 1)
    seqs = [np.asarray(tokens.of(a["tokens"]), dtype=SEQUENCE_TOKENS) for a in acts]
    ds = Dataset(slug=f"import-{m.slug}-{slug}", name=meta.get("dataset") or f"imported {slug}",
                 source=part.origin, slice="",
                 n_sequences=len(seqs), seq_len=max((len(q) for q in seqs), default=1),
                 bos_policy=BosPolicy.none, tokenizer_hash=m.tokenizer_hash)
    s.add(ds)
    s.flush()
    if seqs:
        s.execute(insert(Sequence), [{"dataset_id": ds.id, "idx": i, "tokens": q.tobytes()}
                                     for i, q in enumerate(seqs)])
    version = hashlib.sha256(f"{m.slug}/{slug}/{len(feats)}/{len(acts)}".encode()).hexdigest()
    src = Source(model_id=m.id, dataset_id=ds.id, slug=slug,
                 kind="neurons" if hook.endswith("mlp.hook_post") else "sae", hook_name=hook,
                 layer=int(layer.group(1)) if layer else 0, n_features=n_features,
                 sae_config=meta.get("saelensConfig"), harvest_config={"imported": str(folder)},
                 status=SourceStatus.ready, version_hash=version[:20],
                 finished_at=dt.datetime.now(dt.UTC))
    s.add(src)
    s.flush()
    per_feature: dict[int, list[int]] = defaultdict(list)
    for i, a in enumerate(acts):
        per_feature[_idx(a)].append(i)
    blocks, features, peaks, relations = [], [], [], []
    for f in feats:
        idx = _idx(f)
        mine = [acts[i] for i in per_feature.get(idx, [])]
        codes = _group_codes(mine)
        top_peaks = Counter()
        for code in sorted(set(codes)):
            members = [(i, a) for i, a, c in zip(per_feature[idx], mine, codes, strict=True)
                       if c == code]
            window = max(len(a["values"]) for _, a in members)
            rec = np.zeros(len(members), dtype=example_record(window))
            for r, (i, a) in enumerate(members):
                rec["seq_idx"][r], rec["start"][r] = i, 0
                rec["peak_pos"][r], rec["peak_value"][r] = a["maxValueTokenIndex"], a["maxValue"]
                rec["acts"][r, :len(a["values"])] = a["values"]
                if code == ExampleGroup.top:
                    top_peaks[int(seqs[i][a["maxValueTokenIndex"]])] += 1
            blocks.append((src.id, idx, code, len(members), window, rec.tobytes()))
        top_tokens = sorted(top_peaks.items(), key=lambda tc: (-tc[1], tc[0]))[:N_TOP_TOKENS]
        peaks += [(src.id, t, idx, c) for t, c in top_tokens]
        logits = [[[t, v] for t, v in zip(tokens.of(f.get(k + "_str") or []),
                                          f.get(k + "_values") or [], strict=True)]
                  for k in ("pos", "neg")]
        features.append((src.id, idx, f.get("maxActApprox") or 0.0,
                         min((a["minValue"] for a in mine), default=0.0), 0.0, 0.0,
                         f.get("frac_nonzero") or 0.0, 0, 0, _histogram(f), logits[0], logits[1],
                         [list(tc) for tc in top_tokens]))
        for kind, key, vals in ((RelationKind.cosine, "topkCosSimIndices", "topkCosSimValues"),
                                (RelationKind.pearson, "correlated_features_indices",
                                 "correlated_features_pearson")):
            relations += [(src.id, idx, kind, r, src.id, int(j), v) for r, (j, v) in enumerate(
                zip(f.get(key) or [], f.get(vals) or [], strict=False))]
    for table, cols, rows in (
            (Feature, FEATURE_COLUMNS, features), (ExampleBlock, BLOCK_COLUMNS, blocks),
            (PeakToken, ("source_id", "token_id", "feature_idx", "count"), peaks),
            (Relation, ("source_id", "feature_idx", "kind", "rank", "other_source_id",
                        "other_idx", "value"), relations)):
        if rows:
            s.execute(insert(table), [dict(zip(cols, r, strict=True)) for r in rows])
    if expl:
        s.execute(insert(Explanation), [{
            "source_id": src.id, "feature_idx": _idx(e), "text": e["description"],
            "explainer": e.get("typeName") or "unknown",
            "explainer_model": e.get("explanationModelName") or "",
            "author": None if e.get("authorId") in (None, CREATOR) else e["authorId"],
            "created_at": _time(e.get("createdAt"))} for e in expl])
    return slug


FEATURE_COLUMNS = ("source_id", "idx", "max_act", "min_act", "mean_act", "std_act",
                   "frac_active", "n_active", "n_tokens", "histogram", "top_logits",
                   "bottom_logits", "top_tokens")
BLOCK_COLUMNS = ("source_id", "feature_idx", "group", "n", "window", "data")


def _time(text: str | None) -> dt.datetime:
    if not text:
        return dt.datetime.now(dt.UTC)
    t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)
