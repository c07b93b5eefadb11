"""Seed / held-out import: identity of an example includes its document."""
from __future__ import annotations

import json
import re

import pytest
from sqlalchemy import func, select

from tuneloop.errors import InputError
from tuneloop.stages.seeds import import_pairs
from tuneloop.store import Example, open_store


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_same_question_and_answer_about_two_documents_are_two_examples(tmp_path):
    sessions = open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    q = "Does the contract contain a non-compete clause?"
    f = _write(tmp_path / "eval.jsonl", [{"question": q, "answer": "No", "source": "a.txt"},
                                         {"question": q, "answer": "No", "source": "b.txt"},
                                         {"question": q, "answer": "No", "source": "b.txt"}])
    with sessions() as s:
        r = import_pairs(s, f, "eval")
        s.commit()
        assert (r.added, r.duplicates) == (2, 1)
        assert s.scalar(select(func.count(Example.id))) == 2


def test_an_item_is_never_both_trained_on_and_evaluated(tmp_path):
    sessions = open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    row = {"question": "Who is the Supplier?", "answer": "Acme Ltd", "source": "a.txt",
           "references": ["Acme Ltd, a company"]}
    f = _write(tmp_path / "pairs.jsonl", [row])
    with sessions() as s:
        assert import_pairs(s, f, "train").added == 1
        r = import_pairs(s, f, "eval")
        s.commit()
        assert (r.added, r.other_split) == (0, 1)
        stored = s.scalar(select(Example))
        assert stored.split == "train" and stored.meta["references"] == ["Acme Ltd, a company"]


def test_references_must_be_a_list_of_strings(tmp_path):
    sessions = open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    f = _write(tmp_path / "bad.jsonl", [{"question": "Who?", "answer": "Acme", "references": "Acme"}])
    with sessions() as s, pytest.raises(InputError, match=r"bad.jsonl line 1: 'references'"):
        import_pairs(s, f, "train")


def test_category_is_kept_and_must_be_a_string(tmp_path):
    sessions = open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    f = _write(tmp_path / "cat.jsonl", [{"question": "Who?", "answer": "Acme", "category": " Parties "},
                                        {"question": "What law?", "answer": "Delaware"}])
    with sessions() as s:
        import_pairs(s, f, "eval")
        s.commit()
        metas = {e.question: e.meta for e in s.scalars(select(Example))}
        assert metas["Who?"]["category"] == "Parties" and "category" not in metas["What law?"]
    bad = _write(tmp_path / "bad.jsonl", [{"question": "Who?", "answer": "Acme", "category": 3}])
    with sessions() as s, pytest.raises(InputError, match=r"bad.jsonl line 1: 'category' must be a string"):
        import_pairs(s, bad, "train")


def test_holdout_splits_seeds_stably_and_never_overlaps(tmp_path):
    from tuneloop.splits import heldout_side, question_key
    from tuneloop.stages.eval import check_no_overlap

    rows = [{"question": f"What is the notice period in clause {i}?", "answer": f"{i} days", "source": "a.txt"}
            for i in range(60)]
    f = _write(tmp_path / "seeds.jsonl", rows)
    sessions = open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with sessions() as s:
        r = import_pairs(s, f, "train", holdout=0.25)
        s.commit()
        split = {e.question: e.split for e in s.scalars(select(Example))}
        again = import_pairs(s, f, "train", holdout=0.25)  # the same file, split the same way
        check_no_overlap(s, list(s.scalars(select(Example).where(Example.split == "eval"))))
    assert r.added == 60 and r.held_out == list(split.values()).count("eval") and 5 <= r.held_out <= 25
    assert all(split[q["question"]] == heldout_side(question_key(q["question"], "a.txt"), 0.25) for q in rows)
    assert (again.added, again.duplicates) == (0, 60)
    with sessions() as s, pytest.raises(InputError, match="--holdout"):
        import_pairs(s, f, "eval", holdout=0.2)
    with sessions() as s, pytest.raises(InputError, match="--holdout"):
        import_pairs(s, f, "train", holdout=1.0)


def test_cli_holdout_reports_both_splits(tmp_path, project):
    from typer.testing import CliRunner

    from tuneloop.cli import app

    p = project(pairs=False)
    rows = [{"question": f"Who signs annex {i}?", "answer": "The Supplier", "source": "a.txt"} for i in range(40)]
    f = _write(tmp_path / "seeds.jsonl", rows)
    result = CliRunner().invoke(app, ["seeds", "import", str(f), "--holdout", "0.3", "-p", str(p.root)])
    assert result.exit_code == 0, result.output
    with open_store(p.store_url)() as s:
        n_eval = s.scalar(select(func.count(Example.id)).where(Example.split == "eval"))
    assert 0 < n_eval < 40 and f"'eval' ({n_eval})" in result.output and f"'train' ({40 - n_eval})" in result.output
    bad = CliRunner().invoke(app, ["seeds", "import", str(f), "--split", "eval", "--holdout", "0.3", "-p", str(p.root)])
    assert bad.exit_code != 0 and "--holdout" in bad.output and "Traceback" not in bad.output


def _read(path, data: bytes):
    from tuneloop.stages.seeds import read_pairs

    path.write_bytes(data)
    return read_pairs(path)


@pytest.mark.parametrize("name, data, where", [
    ("s.jsonl", b'{"question": "Q?", "answer": "A"}\n{"question": "Qui?", "answer": "caf\xe9"}\n', "s.jsonl line 2"),
    ("s.csv", b"question,answer\nQ?,A\nQui?,caf\xe9\n", "s.csv line 3"),
])
def test_a_seed_file_not_in_utf8_names_file_and_line(tmp_path, name, data, where):
    with pytest.raises(InputError, match=f"{where}: not UTF-8 text"):
        _read(tmp_path / name, data)


def test_seed_files_with_a_byte_order_mark_are_read(tmp_path):
    rows = _read(tmp_path / "s.csv", "question,answer,source\nQui paie ?,Le client,a.txt\n".encode("utf-8-sig"))
    assert rows[0]["question"] == "Qui paie ?" and rows[0]["document"] == "a.txt"
    rows = _read(tmp_path / "s.jsonl", '{"question": "Qui ?", "answer": "Acmé"}\n'.encode("utf-16"))
    assert rows[0]["answer"] == "Acmé"


@pytest.mark.parametrize("value", [5, 1.5, True, {"a": "b"}, [1, 2]])
def test_references_of_any_wrong_type_name_the_line_and_field(tmp_path, value):
    line = json.dumps({"question": "Who?", "answer": "Acme", "references": value})
    with pytest.raises(InputError, match=r"s.jsonl line 1: 'references' must be a list of strings"):
        _read(tmp_path / "s.jsonl", line.encode())


def test_csv_columns_are_checked(tmp_path):
    with pytest.raises(InputError, match=r"s.csv line 1: unknown column\(s\) 'notes', 'sorce'"):
        _read(tmp_path / "s.csv", b"question,answer,notes,sorce\nQ?,A,x,a.txt\n")
    with pytest.raises(InputError, match=r"s.csv line 1: the header has no 'answer' column"):
        _read(tmp_path / "s.csv", b"question,reply\nQ?,A\n")
    with pytest.raises(InputError, match=r"s.csv line 3: 3 fields, but the header names 2"):
        _read(tmp_path / "s.csv", b"question,answer\nQ?,A\nWho, then?,B\n")
    # known columns, an ignored id, and a quoted field over two lines: errors give the record's last line
    rows = _read(tmp_path / "s.csv", b'id,question,answer,category\n1,"Who\nsigns?",Acme,Parties\n2,Why?,Law,\n')
    assert rows[1]["question"] == "Why?" and rows[1]["category"] is None
    assert rows[0] == {"question": "Who\nsigns?", "answer": "Acme", "document": None, "references": [],
                       "category": "Parties"}
    with pytest.raises(InputError, match=r"s.csv line 4: missing or empty 'answer'"):
        _read(tmp_path / "s.csv", b'question,answer\n"Who\nsigns?",Acme\nWhy?,\n')


def test_csv_field_over_the_csv_module_limit_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match=r"s.csv line \d+: malformed CSV \(field larger than field limit"):
        _read(tmp_path / "s.csv", b'question,answer\n"' + b"x" * 200_000 + b'",A\n')


@pytest.mark.parametrize("field, limit", [("question", 4_000), ("answer", 20_000), ("category", 200)])
def test_seed_fields_have_size_limits(tmp_path, field, limit):
    from tuneloop.stages import seeds

    assert {"question": seeds.MAX_QUESTION_CHARS, "answer": seeds.MAX_ANSWER_CHARS,
            "category": seeds.MAX_CATEGORY_CHARS}[field] == limit
    row = {"question": "Who?", "answer": "Acme", field: "x" * (limit + 1)}
    good = {"question": "Who?", "answer": "Acme", field: "x" * limit}
    lines = json.dumps(good) + "\n" + json.dumps(row) + "\n"
    with pytest.raises(InputError, match=rf"s.jsonl line 2: '{field}' is {limit + 1:,} characters long; "
                                         rf"the limit is {limit:,}"):
        _read(tmp_path / "s.jsonl", lines.encode())
    assert len(_read(tmp_path / "s.jsonl", (json.dumps(good) + "\n").encode())) == 1


@pytest.mark.parametrize("data, message", [
    (b"[" * 100_000 + b"\n", "s.jsonl line 1: nested too deeply"),
    (b'{"question": "Q?", "answer": ' + b"1" * 5000 + b"}\n", "s.jsonl line 1"),
    (b'{"question": "Q\\u0000?", "answer": "A"}\n', "s.jsonl line 1: 'question' contains a NUL character"),
    (b'{"question": "Q?", "answer": "A"}\n\x00\n', "s.jsonl line 2: contains a NUL character"),
    (b'{"question": "Q?", "answer": "A", "source": ["a.txt"]}\n', "s.jsonl line 1: 'source' must be a string"),
])
def test_pathological_seed_lines_name_the_line(tmp_path, data, message):
    with pytest.raises(InputError, match=re.escape(message)):
        _read(tmp_path / "s.jsonl", data)
