"""safe_rmtree: tuneloop removes only folders it made, inside folders it owns, never a project."""
from __future__ import annotations

import pytest

from tuneloop.safety import UnsafeRemoval, holds_project, safe_rmtree


def tree(root, *files):
    for f in files:
        path = root / f
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")


def test_removes_a_folder_inside_its_owner(tmp_path):
    owner = tmp_path / "artifacts"
    tree(owner, ".work/sft-1/checkpoint-2/model.bin", "keep.txt")
    assert safe_rmtree(owner / ".work" / "sft-1", inside=owner) is True
    assert not (owner / ".work" / "sft-1").exists() and (owner / "keep.txt").is_file()
    assert safe_rmtree(owner / ".work" / "sft-1", inside=owner) is False  # already gone


@pytest.mark.parametrize("target", ["owner", "parent", "sibling", "dotdot"])
def test_refuses_the_owner_itself_and_anything_outside_it(tmp_path, target):
    owner = tmp_path / "proj" / "artifacts"
    tree(tmp_path, "proj/artifacts/a/f.txt", "other/f.txt")
    path = {"owner": owner, "parent": owner.parent, "sibling": tmp_path / "other",
            "dotdot": owner / "a" / ".." / ".."}[target]
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(UnsafeRemoval, match="not inside"):
        safe_rmtree(path, inside=owner)
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("marker", ["tuneloop.yaml", "tuneloop.db"])
def test_refuses_a_folder_that_holds_a_project_at_any_depth(tmp_path, marker):
    tree(tmp_path, f"owner/tmp-1/a/b/{marker}", "owner/tmp-1/other.txt")
    assert holds_project(tmp_path / "owner" / "tmp-1")
    with pytest.raises(UnsafeRemoval, match="holds a tuneloop project"):
        safe_rmtree(tmp_path / "owner" / "tmp-1", inside=tmp_path / "owner")
    assert (tmp_path / "owner" / "tmp-1" / "a" / "b" / marker).is_file()
    assert (tmp_path / "owner" / "tmp-1" / "other.txt").is_file()


def test_a_symlink_is_unlinked_never_followed(tmp_path):
    tree(tmp_path, "precious/data.txt", "owner/x.txt")
    link = tmp_path / "owner" / ".tmp-link"
    link.symlink_to(tmp_path / "precious", target_is_directory=True)
    assert safe_rmtree(link, inside=tmp_path / "owner") is True
    assert not link.exists() and (tmp_path / "precious" / "data.txt").is_file()


def test_refuses_a_file(tmp_path):
    tree(tmp_path, "owner/file.txt")
    with pytest.raises(UnsafeRemoval, match="not a folder"):
        safe_rmtree(tmp_path / "owner" / "file.txt", inside=tmp_path / "owner")
