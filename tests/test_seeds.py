"""Seed / held-out import: identity of an example includes its document."""
from __future__ import annotations

import json

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
