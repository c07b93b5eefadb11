"""Settings: unknown keys and bad values are errors that name the key; the init file is valid."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from tuneloop.config import Settings, load_project, parse_settings
from tuneloop.errors import ConfigError
from tuneloop.settings_template import default_settings_yaml


def write(root: Path, text: str) -> Path:
    (root / "tuneloop.yaml").write_text(text, encoding="utf-8")
    return root


def test_mistyped_nested_key_is_named(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_project(write(tmp_path, "sft:\n  epochz: 1\n"))
    assert "unknown key 'sft.epochz'" in str(err.value)
    assert str(tmp_path / "tuneloop.yaml") in str(err.value)


def test_mistyped_top_level_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'modle'"):
        load_project(write(tmp_path, "modle:\n  student: {model: x}\n"))


def test_every_bad_key_is_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_project(write(tmp_path, "modle: 1\nsft: {epochz: 1}\nmodels: {student: {temprature: 0.1}}\n"))
    msg = str(err.value)
    for key in ("modle", "sft.epochz", "models.student.temprature"):
        assert f"unknown key '{key}'" in msg


@pytest.mark.parametrize("text, key", [
    ("sft: {epochs: many}\n", "sft.epochs"),
    ("ingest: {dense: maybe}\n", "ingest.dense"),
    ("models: {teacher: {temperature: 5}}\n", "models.teacher.temperature"),
    ("eval: {primary_metric: bleu}\n", "eval.primary_metric"),
    ("documents: docs\n", "documents"),
])
def test_wrong_type_or_value_names_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as err:
        load_project(write(tmp_path, text))
    assert f"  {key}: " in str(err.value)
    assert "unknown key" not in str(err.value)


def test_openai_backend_needs_base_url(tmp_path):
    with pytest.raises(ConfigError, match="base_url") as err:
        load_project(write(tmp_path, "models:\n  teacher: {backend: openai, model: gpt-x}\n"))
    assert "models.teacher" in str(err.value)
    ok = load_project(write(tmp_path, "models:\n  teacher: {backend: openai, model: gpt-x, "
                                      "base_url: 'http://localhost:8000/v1'}\n"))
    assert ok.settings.models.teacher.base_url == "http://localhost:8000/v1"


def test_overlap_must_be_below_chunk_size(tmp_path):
    with pytest.raises(ConfigError, match="overlap_tokens"):
        load_project(write(tmp_path, "ingest: {chunk_tokens: 32, overlap_tokens: 32}\n"))


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_project(write(tmp_path, "- a\n- b\n"))


def test_invalid_yaml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_project(write(tmp_path, "sft: {epochs: 1\n"))


def test_empty_file_gives_defaults(tmp_path):
    assert load_project(write(tmp_path, "")).settings == Settings()


def test_init_yaml_parses_to_the_documented_defaults(tmp_path):
    data = yaml.safe_load(default_settings_yaml("demo", ["documents", "more/docs"]))
    settings = parse_settings(data, tmp_path / "tuneloop.yaml")
    assert settings.project == "demo"
    assert settings.documents == ["documents", "more/docs"]
    # Apart from name and documents, the commented file must say exactly what the code defaults are.
    expected = Settings(project="demo", documents=["documents", "more/docs"])
    assert settings.model_dump() == expected.model_dump()


def test_missing_settings_file_says_to_run_init(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_project(tmp_path / "nowhere")
    assert "tuneloop init" in str(err.value)
    assert "tuneloop.yaml" in str(err.value)


def test_paths_resolve_relative_to_the_project(tmp_path, monkeypatch):
    p = load_project(write(tmp_path, "artifacts_dir: out\nstore_url: null\n"))
    assert p.artifacts == tmp_path.resolve() / "out"
    assert p.store_url == f"sqlite:///{tmp_path.resolve() / 'tuneloop.db'}"
    monkeypatch.setenv("TUNELOOP_CACHE", str(tmp_path / "c"))
    assert p.cache == tmp_path / "c"
    p2 = load_project(write(tmp_path, "cache_dir: mycache\n"))
    assert p2.cache == tmp_path.resolve() / "mycache"


def test_settings_assignment_is_validated():
    s = Settings()
    with pytest.raises(ValidationError):
        s.sft.epochs = -1


def test_settings_file_not_in_utf8_names_file_and_line(tmp_path):
    (tmp_path / "tuneloop.yaml").write_bytes(b"project: demo\nsft: {epochs: 1}  # caf\xe9\n")
    with pytest.raises(ConfigError, match=r"tuneloop.yaml line 2: not UTF-8 text"):
        load_project(tmp_path)
    (tmp_path / "tuneloop.yaml").write_bytes("project: café\n".encode("utf-16"))  # with a byte-order mark
    assert load_project(tmp_path).settings.project == "café"


@pytest.mark.parametrize("text", ["[" * 5000, "x: " + "1" * 5000])
def test_pathological_yaml_is_a_config_error(tmp_path, text):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_project(write(tmp_path, text))


@pytest.mark.parametrize("text, key", [
    ("synth: {max_question_chars: -5}\n", "synth.max_question_chars"),
    ("synth: {min_answer_chars: 300, max_answer_chars: 200}\n", "synth"),
    ("synth: {seed: -1}\n", "synth.seed"),
    ("continual: {wise_alphas: [0.5, 1.5]}\n", "continual.wise_alphas.1"),
    ("continual: {wise_alphas: [-0.1]}\n", "continual.wise_alphas.0"),
    ("continual: {wise_alphas: []}\n", "continual.wise_alphas"),
    ("continual: {anchor_tolerance: 2}\n", "continual.anchor_tolerance"),
    ("ingest: {max_document_mb: 0}\n", "ingest.max_document_mb"),
    ("sft: {epochs: .inf}\n", "sft.epochs"),
    ("sft: {learning_rate: .nan}\n", "sft.learning_rate"),
    ("eval: {min_improvement: -0.1}\n", "eval.min_improvement"),
    ("monitor: {min_votes: 60, satisfaction_window: 50}\n", "monitor"),
    ("monitor: {min_queries: 200}\n", "monitor"),
    ("feedback: {rlaif_prompts: 0}\n", "feedback.rlaif_prompts"),
])
def test_settings_that_make_no_sense_are_refused(tmp_path, text, key):
    with pytest.raises(ConfigError) as err:
        load_project(write(tmp_path, text))
    assert f"  {key}: " in str(err.value), str(err.value)


@pytest.mark.parametrize("url, why", [("not-a-url", "Could not parse"), ("foo://host/db", "foo"),
                                      ("postgresql://host:port/db", "port")])
def test_store_url_must_be_a_database_url(tmp_path, url, why):
    with pytest.raises(ConfigError, match="store_url: not a database URL") as err:
        load_project(write(tmp_path, f"store_url: '{url}'\n"))
    assert why in str(err.value)


def test_sqlite_store_folder_is_created_inside_the_project_only(tmp_path):
    root = tmp_path / "proj"
    root.mkdir()
    p = load_project(write(root, "store_url: sqlite:///data/store.db\n"))  # relative to the project
    assert p.store_url == f"sqlite:///{root.resolve() / 'data' / 'store.db'}" and (root / "data").is_dir()
    outside = tmp_path / "elsewhere" / "store.db"
    with pytest.raises(ConfigError, match=r"store_url: the folder .*elsewhere does not exist"):
        load_project(write(root, f"store_url: sqlite:///{outside}\n"))
    assert not outside.parent.exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is not a folder"):
        load_project(write(root, f"store_url: sqlite:///{tmp_path / 'afile' / 'store.db'}\n"))
    with pytest.raises(ConfigError, match="is a folder, not a database file"):
        load_project(write(root, f"store_url: sqlite:///{tmp_path}\n"))
    assert load_project(write(root, "store_url: 'sqlite://'\n")).store_url == "sqlite://"  # in memory


@pytest.mark.parametrize("text, old, new", [
    ("sft:\n  lora_r: 8\n", "sft.lora_r", "lora.r"),
    ("sft:\n  lora_alpha: 16\n", "sft.lora_alpha", "lora.alpha"),
    ("sft:\n  lora_dropout: 0.1\n", "sft.lora_dropout", "lora.dropout"),
    ("sft:\n  target_modules: [q_proj]\n", "sft.target_modules", "lora.target_modules"),
    ("continual:\n  wise_max_rank: 32\n", "continual.wise_max_rank", "lora.max_rank"),
    ("synth:\n  adapter: chat\n", "synth.adapter", "models.judge.adapter"),
])
def test_a_moved_key_names_its_new_place_in_one_line(tmp_path, text, old, new):
    with pytest.raises(ConfigError) as err:
        load_project(write(tmp_path, text))
    message = str(err.value)
    assert f"{old} is now" in message and new in message and "\n" not in message
    assert str(tmp_path / "tuneloop.yaml") in message


def test_lora_and_role_adapter_settings_are_read_where_they_now_live(tmp_path):
    p = load_project(write(tmp_path, "lora: {r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj], max_rank: 8}\n"
                                     "models:\n  judge: {adapter: chat}\n"))
    assert (p.settings.lora.r, p.settings.lora.alpha, p.settings.lora.max_rank) == (4, 8, 8)
    assert p.settings.models.judge.adapter == "chat" and p.settings.models.teacher.adapter == "auto"
