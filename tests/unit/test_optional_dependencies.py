"""matplotlib, scipy and kornia are needed by one feature each: a missing one is named with its pip extra."""

import sys

import pytest

from renyiprune.data.augment import TrainTransform
from renyiprune.utils.optional import require


def test_require_names_the_extra_that_installs_a_missing_module():
    needle = r"drawing figures needs no_such_module_xyz: pip install 'renyiprune\[plots\]'"
    with pytest.raises(ImportError, match=needle):
        require("no_such_module_xyz.sub", "drawing figures", "plots")
    assert require("json", "anything", "none").dumps([1]) == "[1]"


def test_randaugment_without_kornia_says_how_to_install_it(monkeypatch):
    for name in ("kornia", "kornia.augmentation", "kornia.augmentation.auto"):
        monkeypatch.setitem(sys.modules, name, None)  # what an environment without kornia finds
    needle = r"RandAugment \(--randaug\) needs kornia: pip install 'renyiprune\[train\]'"
    with pytest.raises(ImportError, match=needle):
        TrainTransform(randaug_n=2)
