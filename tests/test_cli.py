"""The command line, end to end on the tiny model, and its error messages."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from sqlalchemy import func, select
from typer.testing import CliRunner

from tests.helpers import deep_merge
from tuneloop.cli import app
from tuneloop.config import load_project
from tuneloop.store import Chunk, Document, open_store

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def runner(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich: wide enough that tables show every column
    return CliRunner()


def invoke(runner, *args):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=True)
    return result


def ok(result):
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def fails(result, *needles, code=None):
    """Non-zero exit through the friendly path: an `error:` message, no traceback, no stray exception."""
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    out = result.output
    assert "Traceback" not in out
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    assert lines and lines[0].startswith("error:"), out
    for needle in needles:
        assert needle in out, (needle, out)
    return out


def one_line(out: str) -> str:
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, out
    return lines[0]


def tiny_init(runner, root: Path, model_dir: Path) -> Path:
    ok(invoke(runner, "init", root, "--sample"))
    cfg = root / "tuneloop.yaml"
    data = yaml.safe_load(cfg.read_text())
    m = str(model_dir)
    data = deep_merge(data, {
        "models": {"student": {"model": m, "max_new_tokens": 8}, "teacher": {"model": m, "max_new_tokens": 8},
                   "judge": {"model": m}},
        "ingest": {"dense": False}, "synth": {"questions_per_cycle": 3},
        "sft": {"epochs": 1, "learning_rate": 5e-3}, "lora": {"r": 8, "alpha": 16}, "eval": {"limit": 4},
    })
    cfg.write_text(yaml.safe_dump(data))
    return root


def counts(root: Path) -> tuple[int, int]:
    with open_store(f"sqlite:///{root.resolve() / 'tuneloop.db'}")() as s:
        return s.scalar(select(func.count(Document.id))), s.scalar(select(func.count(Chunk.id)))


def test_init_writes_settings_and_sample(runner, tmp_path):
    root = tmp_path / "proj"
    ok(invoke(runner, "init", root, "--sample"))
    assert all((root / name).is_file() for name in ("tuneloop.yaml", "seeds.jsonl", "dev.jsonl", "heldout.jsonl"))
    assert len(list((root / "documents").glob("*.md"))) == 6
    assert yaml.safe_load((root / "tuneloop.yaml").read_text())["documents"] == ["documents"]
    out = fails(invoke(runner, "init", root), "already exists", "--force")
    one_line(out)
    ok(invoke(runner, "init", root, "--force"))
    assert yaml.safe_load((root / "tuneloop.yaml").read_text())["documents"] == []


def test_the_manual_workflow(runner, tmp_path, tiny_model_dir):
    root = tiny_init(runner, tmp_path / "proj", tiny_model_dir)
    p = ["-p", root]
    out = ok(invoke(runner, "ingest", root / "documents", *p))
    assert "6 added" in out and "index rebuilt" in out
    out = ok(invoke(runner, "ingest", root / "documents", *p))
    assert "0 added, 0 changed, 6 unchanged" in out and "index up to date" in out
    assert "imported 20 pairs into split 'train'" in ok(invoke(runner, "seeds", "import", root / "seeds.jsonl", *p))
    out = ok(invoke(runner, "seeds", "import", root / "heldout.jsonl", "--split", "eval", *p))
    assert "imported 30 pairs into split 'eval'" in out
    out = ok(invoke(runner, "seeds", "import", root / "seeds.jsonl", "--split", "eval", *p))
    assert "imported 0 pairs" in out and "20 skipped: already in the other split" in out
    out = ok(invoke(runner, "train", "sft", *p))
    assert "candidate v1: loss" in out and str(root.resolve() / "artifacts" / "adapters") in out.replace("\n", "")
    out = ok(invoke(runner, "eval", *p))
    primary = yaml.safe_load((root / "tuneloop.yaml").read_text())["eval"]["primary_metric"]
    assert f"held-out set (4 questions; primary metric: {primary})" in out
    table = [ln for ln in out.splitlines() if ln.strip().startswith(("│ base", "│ v1", "| base", "| v1"))]
    assert len(table) == 2, out
    assert "champion" in table[0] and "candidate" in table[1]
    out = ok(invoke(runner, "status", *p))
    assert "champion: base" in out
    for label, n in (("documents", 6), ("examples: seed / train", 20), ("examples: seed / eval", 30)):
        assert any(label in ln and f" {n} " in ln for ln in out.splitlines()), (label, out)
    assert "no cycle yet" in out
    assert "v1" in out and "sft" in out


def test_cycle_command_and_status(runner, tmp_path, tiny_model_dir, monkeypatch):
    from tests.helpers import FakeTeacher, use_teacher

    root = tiny_init(runner, tmp_path / "proj", tiny_model_dir)
    ok(invoke(runner, "seeds", "import", root / "seeds.jsonl", "-p", root))
    ok(invoke(runner, "seeds", "import", root / "heldout.jsonl", "--split", "eval", "-p", root))
    use_teacher(monkeypatch, FakeTeacher())
    out = ok(invoke(runner, "cycle", "--trigger", "nightly", "-p", root))
    # the tiny random-weight student cannot learn to answer in a few SFT steps, so its candidate
    # does not beat the base model on the held-out set (fixed seeds: the same every run): rejected
    assert "cycle 1 done:" in out and "rejected v1" in out and "promoted" not in out, out
    # not a terminal: progress comes as plain lines, at least one when each task ends
    assert any(ln.startswith("  fine-tuning (LoRA SFT): ") and ln.endswith(", done") for ln in out.splitlines()), out
    out = ok(invoke(runner, "status", "-p", root))
    minutes = [ln.split("│")[-2].strip() for ln in out.splitlines() if ln.count("│") > 5]
    assert minutes[-1] and float(minutes[-1]) >= 0  # the "all" row: the cycle's minutes, summed per step
    assert "last cycle 1: done (trigger: nightly)" in out
    for step in ("ingest", "synth", "sft", "eval", "gate", "review"):
        assert any(ln.split("│")[1:2] and ln.split("│")[1].strip() == step and "done" in ln
                   for ln in out.splitlines()), (step, out)
    assert any("examples: synthetic / train" in ln for ln in out.splitlines())
    # the cycle's last step opened a review queue of review.per_cycle items
    per_cycle = str(load_project(root).settings.review.per_cycle)
    assert any("review queue: open" in ln and ln.split("│")[2].strip() == per_cycle for ln in out.splitlines()), out


def test_missing_ingest_path(runner, tmp_path, tiny_model_dir):
    root = tiny_init(runner, tmp_path / "proj", tiny_model_dir)
    out = fails(invoke(runner, "ingest", root / "nothing-here", "-p", root), "Input not found", "nothing-here",
                code=2)
    one_line(out)


def test_unsupported_file_type(runner, tmp_path, tiny_model_dir):
    root = tiny_init(runner, tmp_path / "proj", tiny_model_dir)
    (root / "contract.docx").write_bytes(b"PK\x03\x04")
    out = fails(invoke(runner, "ingest", root / "contract.docx", "-p", root), "Unsupported file type",
                "contract.docx", code=2)
    one_line(out)


def test_seed_line_missing_answer(runner, tmp_path, tiny_model_dir):
    root = tiny_init(runner, tmp_path / "proj", tiny_model_dir)
    bad = root / "bad.jsonl"
    bad.write_text(json.dumps({"question": "Q one?", "answer": "A"}) + "\n\n"
                   + json.dumps({"question": "Q two?", "anwser": "typo"}) + "\n")
    out = fails(invoke(runner, "seeds", "import", bad, "-p", root), "bad.jsonl line 3", "'answer'", code=2)
    one_line(out)
    with open_store(f"sqlite:///{root.resolve() / 'tuneloop.db'}")() as s:
        from tuneloop.store import Example
        assert s.scalar(select(func.count(Example.id))) == 0  # the good first line was not kept either


def test_bad_config_key(runner, tmp_path, tiny_model_dir):
    root = tiny_init(runner, tmp_path / "proj", tiny_model_dir)
    cfg = root / "tuneloop.yaml"
    data = yaml.safe_load(cfg.read_text())
    data["sft"]["epochz"] = 3
    cfg.write_text(yaml.safe_dump(data))
    out = fails(invoke(runner, "status", "-p", root), "unknown key 'sft.epochz'", code=2)
    # one line per problem: the file, then each bad key
    assert len([ln for ln in out.strip().splitlines() if ln.strip()]) == 2


def test_no_project(runner, tmp_path):
    one_line(fails(invoke(runner, "status", "-p", tmp_path / "empty"), "tuneloop init", code=2))


def test_train_before_ingest(runner, tmp_path, tiny_model_dir):
    root = tiny_init(runner, tmp_path / "proj", tiny_model_dir)
    ok(invoke(runner, "seeds", "import", root / "seeds.jsonl", "-p", root))
    out = fails(invoke(runner, "train", "sft", "-p", root), "tuneloop ingest", code=3)
    one_line(out)


def test_train_with_no_examples(runner, tmp_path, tiny_model_dir):
    root = tiny_init(runner, tmp_path / "proj", tiny_model_dir)
    ok(invoke(runner, "ingest", root / "documents", "-p", root))
    one_line(fails(invoke(runner, "train", "sft", "-p", root), "no training examples", code=3))


def test_eval_without_heldout_and_unknown_version(runner, tmp_path, tiny_model_dir):
    root = tiny_init(runner, tmp_path / "proj", tiny_model_dir)
    ok(invoke(runner, "ingest", root / "documents", "-p", root))
    one_line(fails(invoke(runner, "eval", "-p", root), "no held-out questions", code=3))
    one_line(fails(invoke(runner, "eval", "-v", "v9", "-p", root), "unknown model version", "v9", code=3))


def test_corrupt_pdf_leaves_the_store_unchanged(runner, tmp_path, tiny_model_dir):
    root = tiny_init(runner, tmp_path / "proj", tiny_model_dir)
    ok(invoke(runner, "ingest", root / "documents", "-p", root))
    before = counts(root)
    index_before = (root / "index" / "index.json").read_text()
    bad = root / "incoming"
    bad.mkdir()
    (bad / "new-contract.md").write_text("# New contract\n\nThe Buyer shall pay ten dollars.\n")
    (bad / "scan.pdf").write_bytes(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog /Pages 9 0 R")
    out = fails(invoke(runner, "ingest", bad, "-p", root), "scan.pdf", code=2)
    one_line(out)
    assert counts(root) == before
    assert (root / "index" / "index.json").read_text() == index_before


def test_errors_in_a_real_process_are_one_line_without_traceback(tmp_path):
    """The installed entry point, not CliRunner: stderr holds one short line, stdout nothing."""
    exe = Path(sys.executable).with_name("tuneloop")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-c", "from tuneloop.cli import main; main()"]
    (tmp_path / "tuneloop.yaml").write_text("project: x\n")
    long_name = tmp_path / ("a-rather-long-folder-name-" * 4) / "missing-contract.md"
    r = subprocess.run(cmd + ["ingest", str(long_name), "-p", str(tmp_path)], capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "80"}, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Input not found:"), r.stderr
    assert str(long_name) in lines[0]


@pytest.mark.parametrize("name, create", [
    ("[draft] contract.docx", True), ("[bold]terms.docx", True), ("missing [/b] here.md", False)])
def test_error_messages_show_brackets_literally(runner, tmp_path, name, create):
    """File names are not rich markup: nothing vanishes and '[/b]' does not crash the printer."""
    (tmp_path / "tuneloop.yaml").write_text("project: x\n")
    if create:
        (tmp_path / name).write_bytes(b"PK")
    out = fails(invoke(runner, "ingest", tmp_path / name, "-p", tmp_path), str(tmp_path / name), code=2)
    one_line(out)


def test_synth_command_prints_its_report(runner, tmp_path, tiny_model_dir, monkeypatch):
    from tests.helpers import FakeTeacher, use_teacher

    root = tiny_init(runner, tmp_path / "proj", tiny_model_dir)
    ok(invoke(runner, "seeds", "import", root / "seeds.jsonl", "-p", root))
    ok(invoke(runner, "ingest", root / "documents", "-p", root))
    use_teacher(monkeypatch, FakeTeacher(round_trip=lambda conv: "something else"))
    out = ok(invoke(runner, "synth", "-p", root))
    report = json.loads(next((root / "artifacts" / "datasets").glob("synth-*/report.json")).read_text())
    assert f"kept {report['kept']} of {report['generated']} generated" in out
    assert "round-trip" in out and "question types kept/generated:" in out and "distinct_1" in out


def test_init_refuses_a_file_and_never_overwrites_user_files(runner, tmp_path):
    (tmp_path / "afile").write_text("mine")
    one_line(fails(invoke(runner, "init", tmp_path / "afile"), "afile exists and is not a folder", code=2))
    assert (tmp_path / "afile").read_text() == "mine"
    one_line(fails(invoke(runner, "init", tmp_path / "afile" / "proj"), "cannot write into", code=2))
    root = tmp_path / "proj"
    root.mkdir()
    (root / "seeds.jsonl").write_text("my own seeds\n")
    one_line(fails(invoke(runner, "init", root, "--sample"), "seeds.jsonl already exists", "--force"))
    assert (root / "seeds.jsonl").read_text() == "my own seeds\n" and not (root / "tuneloop.yaml").exists()
    ok(invoke(runner, "init", root))  # no sample: the seeds file is not in the way


def test_report_onto_a_folder_is_an_error(runner, tmp_path):
    ok(invoke(runner, "init", tmp_path / "proj"))
    (tmp_path / "out").mkdir()
    one_line(fails(invoke(runner, "report", "-o", tmp_path / "out", "-p", tmp_path / "proj"),
                   "out is a folder: give a file name", code=2))
    (tmp_path / "afile").write_text("x")
    one_line(fails(invoke(runner, "report", "-o", tmp_path / "afile" / "r.html", "-p", tmp_path / "proj"),
                   "cannot write the report to", code=2))


@pytest.mark.parametrize("name, data, needles", [
    ("s.csv", b"question,answer\nWho?,Acm\xe9\n", ["s.csv line 2: not UTF-8 text"]),
    ("s.jsonl", b"\xff\xfe\x00", ["s.jsonl line 1: not UTF-16 text"]),
    ("s.jsonl", b'{"question": "Who?", "answer": "Acme", "references": 5}\n', ["s.jsonl line 1: 'references'"]),
    ("s.csv", b"question,answer,notes\nWho?,Acme,x\n", ["s.csv line 1: unknown column(s) 'notes'"]),
    ("s.jsonl", b'{"question": "' + b"Q" * 1_000_000 + b'", "answer": "A"}\n',
     ["s.jsonl line 1: 'question' is 1,000,000 characters long"]),
])
def test_bad_seed_files_are_one_line(runner, tmp_path, name, data, needles):
    ok(invoke(runner, "init", tmp_path / "proj"))
    (tmp_path / name).write_bytes(data)
    one_line(fails(invoke(runner, "seeds", "import", tmp_path / name, "-p", tmp_path / "proj"), *needles, code=2))


@pytest.mark.parametrize("settings, needles", [
    ("store_url: not-a-url\n", ["store_url: not a database URL"]),
    ("store_url: sqlite:////no/such/folder/t.db\n", ["store_url: the folder /no/such/folder does not exist"]),
    ("synth: {max_question_chars: -1}\n", ["synth.max_question_chars"]),
    ("continual: {wise_alphas: [1.5]}\n", ["continual.wise_alphas.0"]),
])
def test_bad_settings_are_errors_not_tracebacks(runner, tmp_path, settings, needles):
    (tmp_path / "tuneloop.yaml").write_text(settings)
    fails(invoke(runner, "status", "-p", tmp_path), str(tmp_path / "tuneloop.yaml"), *needles, code=2)
    (tmp_path / "tuneloop.yaml").write_bytes(b"project: caf\xe9\n")
    one_line(fails(invoke(runner, "status", "-p", tmp_path), "tuneloop.yaml line 1: not UTF-8 text", code=2))


def test_ingesting_an_empty_folder_is_an_error(runner, tmp_path):
    (tmp_path / "tuneloop.yaml").write_text("ingest: {dense: false}\n")
    (tmp_path / "docs").mkdir()
    one_line(fails(invoke(runner, "ingest", tmp_path / "docs", "-p", tmp_path),
                   f"Nothing to ingest in folder {tmp_path / 'docs'}", ".txt, .md, .pdf, .jsonl", code=2))
    assert counts(tmp_path) == (0, 0)
