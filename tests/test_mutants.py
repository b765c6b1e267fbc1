"""The mutant list (tests/mutation/mutants.py) stays in step with the code: every mutant applies to exactly one
place, and the tests it names exist. The mutation run itself is slow and not part of CI (README: Developing)."""
import os
import re

import pytest

from tests.conftest import ROOT
from tests.mutation import mutants


def test_mutant_names_are_unique():
    names = [m.name for m in mutants.MUTANTS]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("mutant", mutants.MUTANTS, ids=lambda m: m.name)
def test_each_mutant_applies_once_and_names_existing_tests(mutant):
    with open(os.path.join(ROOT, mutant.file)) as f:
        text = f.read()
    assert mutants.apply(mutant, text) != text
    assert mutant.tests
    for test in mutant.tests:
        path, _, name = test.partition("::")
        assert os.path.isfile(os.path.join(ROOT, path)), test
        if name:
            with open(os.path.join(ROOT, path)) as f:
                assert re.search(rf"^def {re.escape(name.split('[')[0])}\(", f.read(), re.MULTILINE), test


def test_apply_refuses_text_that_is_not_there_exactly_once():
    mutant = mutants.Mutant("m", "f.py", "a = 1", "a = 2", ("tests",), "bug")
    for text in ("b = 1\n", "a = 1\na = 1\n"):
        with pytest.raises(ValueError, match="not once"):
            mutants.apply(mutant, text)
    assert mutants.apply(mutant, "a = 1\n") == "a = 2\n"
