"""Which upload names the API takes: the rule the SDK's default names follow."""

from __future__ import annotations

import pytest

from app.assets import _check_name
from app.errors import ApiError
from modelpress._base import default_name


@pytest.mark.parametrize("name", ["digits", "my model_copy v2.pt2", "a@b+c-d", "é", "x" * 128])
def test_names_taken(name: str) -> None:
    assert _check_name(name) == name


@pytest.mark.parametrize("name", ["", "abc\n", " lead", ".hidden", "a/b", "x" * 129, "a\tb"])
def test_names_refused(name: str) -> None:
    with pytest.raises(ApiError, match="name must be 1-128 letters"):
        _check_name(name)


@pytest.mark.parametrize("stem", ["my model (copy)", "data[v2]", ".hidden", "abc\n", "(", "..",
                                  "x" * 300, "über-modell"])
def test_default_names_from_any_file_name_are_taken(stem: str) -> None:
    name = default_name(stem)
    assert _check_name(name) == name
