"""`featurescope import` of SAEDashboard's `batch-N.json` output on SQLite and PostgreSQL: a
fixture written by hand from SAEDashboard's field names imports, renders with its tokens
escaped and gives back its values in the `.json`; bad input gets one error and writes nothing.

The fixture follows jbloomAus/SAEDashboard: `sae_dashboard/neuronpedia/neuronpedia_dashboard.py`
(`NeuronpediaDashboardBatch/Feature/Activation.to_dict`: the keys of a batch, a feature and an
activation), `sae_dashboard/neuronpedia/neuronpedia_converter.py` (top activations have
`bin_min` -1, `bin_max` the max, `bin_contains` -1; intervals their range and a fraction) and
`sae_dashboard/neuronpedia/neuronpedia_runner.py` (`batch-{n}.json` and `run_settings.json` in
the folder `{model_id}_{sae_set}_{hook_name}_{d_sae}`) and
`sae_dashboard/neuronpedia/neuronpedia_export.py` (its own conversion to Neuronpedia's layout:
the source id `{layer}-{set}[__{sae_id_suffix}]`, maxActApprox the largest activation value)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.cli import main
from app.config import Settings
from app.db.engine import make_engine
from app.db.tables import Feature, Model, Source
from app.main import create_app
from tests.web.test_web_import import write_fixture

SCRIPT_TOKEN = "<script>window.__pwned = 1</script>"
MODEL, SET, LAYER, HOOK, WIDTH = "tiny-gpt", "res-sd", 2, "blocks.2.hook_resid_post", 16
SOURCE = f"{LAYER}-{SET}"  # Neuronpedia's source id: layer-set


def activation(tokens, values, bin_min=-1, bin_max=None, bin_contains=-1):
    return {"bin_min": bin_min, "bin_max": max(values) if bin_max is None else bin_max,
            "bin_contains": bin_contains, "tokens": tokens, "values": values}


def feature(index, acts, **over):
    row = {"feature_index": index,
           "neuron_alignment_indices": [7, 3], "neuron_alignment_values": [0.5, -0.25],
           "neuron_alignment_l1": [0.1, 0.05], "correlated_neurons_indices": [1],
           "correlated_neurons_l1": [0.2], "correlated_neurons_pearson": [0.3],
           "correlated_features_indices": [index + 1], "correlated_features_l1": [0.4],
           "correlated_features_pearson": [0.6],
           "neg_str": [" the", " of"], "neg_values": [-0.75, -0.5],
           "pos_str": [" cat", SCRIPT_TOKEN], "pos_values": [1.5, 1.25],
           "frac_nonzero": 0.0125 * (index + 1),
           "freq_hist_data_bar_values": [0.5, 1.5, 4.25], "freq_hist_data_bar_heights": [3.0,
                                                                                         2.0, 1.0],
           "logits_hist_data_bar_heights": [1.0, 4.0], "logits_hist_data_bar_values": [-1.0, 1.0],
           "n_prompts_total": 64, "n_tokens_in_prompt": 8,
           "dataset": "monology/pile-uncopyrighted", "decoder_weights_dist": [],
           "activations": acts}
    row.update(over)
    return row


FEATURES = {
    0: feature(0, [activation(["<|endoftext|>", " cat", SCRIPT_TOKEN, " sat"], [0.0, 4.5, 0.5,
                                                                                 0.0]),
                   activation([" a", " cat"], [3.0, 0.25]),
                   activation(["A", " dog"], [0.0, 1.5], 0.9, 1.8, 0.25),
                   activation(["B", " cow", "!"], [0.0, 0.5, 0.75], 0.0, 0.9, 0.5)]),
    1: feature(1, [activation([" dog", "!"], [5.5, 0.0])]),
    5: feature(5, [activation([" fish"], [2.0])]),
}


def write_output(root, batches=((0, 1), (5,)), **settings):
    """SAEDashboard's output folder for the fixture's features, one batch file per group."""
    folder = root / f"{MODEL}_res-sd-release_{HOOK}_{WIDTH}"
    folder.mkdir(parents=True)
    (folder / "run_settings.json").write_text(json.dumps({
        "sae_set": "res-sd-release", "sae_path": HOOK, "np_set_name": SET,
        "np_sae_id_suffix": None, "huggingface_dataset_path": "monology/pile-uncopyrighted",
        "n_prompts_total": 64, "n_tokens_in_prompt": 8, "model_id": MODEL, "layer": LAYER,
        **settings}))
    for n, indices in enumerate(batches):
        (folder / f"batch-{n}.json").write_text(json.dumps({
            "model_id": MODEL, "layer": LAYER, "sae_set": SET,
            "features": [FEATURES[i] for i in indices]}))
    return folder


def examples(group):
    return [(e["tokens"], e["acts"], e["peak_index"]) for e in group]


def fixture_examples(acts):
    return [(a["tokens"], a["values"], a["values"].index(max(a["values"]))) for a in acts]


def test_a_saedashboard_output_imports_and_renders(db_url, tmp_path):
    write_output(tmp_path / "outputs")
    assert main(["import", str(tmp_path / "outputs"), "--db", db_url]) == 0
    engine = make_engine(db_url)
    with TestClient(create_app(Settings(database_url=db_url), engine=engine)) as c:
        for index, want in FEATURES.items():
            got = c.get(f"/{MODEL}/{SOURCE}/{index}.json").json()
            assert (got["kind"], got["layer"], got["hook_name"]) == ("sae", LAYER, HOOK)
            assert got["stats"]["max_act"] == max(v for a in want["activations"]
                                                  for v in a["values"])
            assert got["stats"]["frac_active"] == want["frac_nonzero"]
            assert [(t["text"], t["value"]) for t in got["top_logits"]] == list(
                zip(want["pos_str"], want["pos_values"], strict=True))
            assert [(t["text"], t["value"]) for t in got["bottom_logits"]] == list(
                zip(want["neg_str"], want["neg_values"], strict=True))
            tops = [a for a in want["activations"] if a["bin_min"] == -1]
            assert examples(got["top"]) == fixture_examples(
                sorted(tops, key=lambda a: -max(a["values"])))
            intervals = sorted((a for a in want["activations"] if a["bin_min"] != -1),
                               key=lambda a: -a["bin_min"])  # highest range first
            assert [examples(g["examples"]) for g in got["quantiles"]] == [
                fixture_examples([a]) for a in intervals]
            assert sum(got["histogram"]["counts"]) == sum(want["freq_hist_data_bar_heights"])
            assert got["related"]["pearson"] == [] and got["related"]["cosine"] == []
        f0 = c.get(f"/{MODEL}/{SOURCE}/0.json").json()
        assert f0["top_tokens"] == [{"id": 1, "text": " cat", "count": 1},
                                    {"id": 4, "text": " a", "count": 1}]
        assert c.get(f"/{MODEL}/{SOURCE}/3.json").status_code == 404
        page = c.get(f"/{MODEL}/{SOURCE}/0")
        assert page.status_code == 200
        assert "&lt;script&gt;window.__pwned" in page.text and SCRIPT_TOKEN not in page.text
    with engine.connect() as conn:
        assert conn.scalar(select(Source.n_features)) == WIDTH
        assert conn.scalar(select(func.count()).select_from(Feature)) == len(FEATURES)
    engine.dispose()


@pytest.mark.parametrize("in_batch", [False, True])
def test_the_sae_id_suffix_names_the_source(db_url, tmp_path, in_batch):
    folder = write_output(tmp_path, np_sae_id_suffix=None if in_batch else "l0-60")
    if in_batch:  # newer SAEDashboard versions write it into every batch file
        for path in folder.glob("batch-*.json"):
            path.write_text(json.dumps({**json.loads(path.read_text()),
                                        "sae_id_suffix": "l0-60"}))
    assert main(["import", str(tmp_path), "--db", db_url]) == 0
    engine = make_engine(db_url)
    with engine.connect() as conn:
        assert conn.scalar(select(Source.slug)) == f"{SOURCE}__l0-60"
    engine.dispose()


def second_batch(folder, features, **head):
    """Replaces the fixture's batch-1.json by one of these features (and head fields)."""
    (folder / "batch-1.json").write_text(json.dumps(
        {"model_id": MODEL, "layer": LAYER, "sae_set": SET, "features": features, **head}))


def with_activation(**over):
    return [feature(5, [{**FEATURES[5]["activations"][0], **over}])]


def broken_feature(folder):
    second_batch(folder, [{k: v for k, v in FEATURES[1].items() if k != "activations"}])


def broken_activation(folder):
    act = {k: v for k, v in FEATURES[5]["activations"][0].items() if k != "tokens"}
    second_batch(folder, [feature(5, [act])])


def broken_head(folder):
    (folder / "batch-1.json").write_text(json.dumps({"model_id": MODEL, "features": []}))


def not_json(folder):
    (folder / "batch-1.json").write_text('{"model_id": "tiny-gpt", "features": [')


def other_source(folder):
    second_batch(folder, [FEATURES[5]], layer=LAYER + 1)


def duplicate(folder):
    second_batch(folder, [FEATURES[1]])


def text_values(folder):
    second_batch(folder, with_activation(values=["2.0"]))


def no_bin(folder):
    second_batch(folder, with_activation(bin_max=None))


def text_layer(folder):
    second_batch(folder, [FEATURES[5]], layer="two")


@pytest.mark.parametrize(("spoil", "message"), [
    (broken_feature, r"batch-1\.json: feature 0 lacks activations"),
    (broken_activation, r"batch-1\.json: feature 0: activation 0 lacks tokens"),
    (broken_head, r"batch-1\.json lacks layer, sae_set"),
    (not_json, r"batch-1\.json is not JSON"),
    (other_source, r"batch files are of 2 sources"),
    (duplicate, r"feature 1 is in more than one batch file"),
    (text_values, r"batch-1\.json: feature 0: activation 0: values is not a list of numbers"),
    (no_bin, r"activation 0: bin_min and bin_max are not numbers"),
    (text_layer, r"batch-1\.json: invalid literal for int"),
])
def test_bad_output_gets_one_error_and_writes_nothing(db_url, tmp_path, spoil, message):
    good = write_output(tmp_path / "a")  # a good source beside the bad one: not written either
    good.rename(tmp_path / "a" / "good")
    spoil(write_output(tmp_path / "a"))
    with pytest.raises(SystemExit, match=message) as err:
        main(["import", str(tmp_path / "a"), "--db", db_url])
    assert str(err.value).startswith("error: ") and "\n" not in str(err.value)
    engine = make_engine(db_url)
    with engine.connect() as conn:
        for table in (Model, Source, Feature):
            assert conn.scalar(select(func.count()).select_from(table)) == 0
    engine.dispose()


def test_both_formats_in_one_folder_import_together(db_url, tmp_path):
    write_output(tmp_path / "saedashboard")
    write_fixture(tmp_path)  # Neuronpedia's layout in np-tiny/3-res-jb, from test_web_import
    assert main(["import", str(tmp_path), "--db", db_url]) == 0
    engine = make_engine(db_url)
    with TestClient(create_app(Settings(database_url=db_url), engine=engine)) as c:
        assert c.get(f"/{MODEL}/{SOURCE}/1.json").json()["stats"]["max_act"] == 5.5
        assert c.get("/np-tiny/3-res-jb/0.json").json()["stats"]["max_act"] == 4.5
    engine.dispose()


def test_two_copies_of_a_source_are_refused(db_url, tmp_path):
    write_output(tmp_path / "a")
    write_output(tmp_path / "b")
    with pytest.raises(SystemExit, match=f"both hold {MODEL}/{SOURCE}"):
        main(["import", str(tmp_path), "--db", db_url])
    engine = make_engine(db_url)
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Model)) == 0
    engine.dispose()


def test_an_empty_folder_is_refused(db_url, tmp_path):
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "batch-notes.json").write_text("{}")
    with pytest.raises(SystemExit, match="no SAEDashboard output"):
        main(["import", str(tmp_path / "outputs"), "--db", db_url])
