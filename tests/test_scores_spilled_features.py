"""`diffedit bench score` keeps each edit's Inception features in an unnamed scratch file, not in
memory (16 KiB an edit grew to 0.45 GB on a whole ImageNet grid): what it reads back per group is
what it wrote, bit for bit, and nothing is left in the folder."""

import os
import tempfile

import pytest
import torch

from diffedit.errors import OutputFileError
from diffedit.research.scores.sets import FEATURES, SpilledFeatures


def test_groups_read_back_the_rows_written_bit_for_bit(tmp_path):
    rows = {f"edit-{i}": torch.randn(FEATURES, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
            for i in range(7)}
    spill = SpilledFeatures(tmp_path)
    for key, row in rows.items():
        spill.add(key, row)
    for keys in (["edit-3", "edit-0", "edit-6"], ["edit-5"], list(rows)):
        assert torch.equal(spill.group(keys), torch.stack([rows[k] for k in keys]))
    spill.add("late", rows["edit-1"] * 2)                 # adding after a read appends, not overwrites
    assert torch.equal(spill.group(["late", "edit-1"]), torch.stack([rows["edit-1"] * 2, rows["edit-1"]]))
    assert os.listdir(tmp_path) == []                      # unnamed: nothing in the folder, even while open
    spill.close()


def test_float32_features_are_kept_as_float64(tmp_path):
    spill = SpilledFeatures(tmp_path)
    row = torch.linspace(-1, 1, FEATURES, dtype=torch.float32)
    spill.add("a", row)
    assert torch.equal(spill.group(["a"])[0], row.double())


def test_a_folder_it_cannot_write_in_is_one_sentence(tmp_path, monkeypatch):
    def refused(**_):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(tempfile, "TemporaryFile", refused)
    with pytest.raises(OutputFileError, match=r"^cannot write in .* \(Permission denied\); the scores are written "
                                              r"there: make it writable\.$"):
        SpilledFeatures(tmp_path)
