"""Python API parity: every public name of `moelab` resolves to a real object."""

import importlib

import pytest

import moelab


@pytest.mark.parametrize("name", sorted(moelab._EXPORTS))
def test_public_name_resolves(name):
    obj = getattr(moelab, name)
    module, attr = moelab._EXPORTS[name]
    assert obj is getattr(importlib.import_module(module), attr)
    assert callable(obj)


def test_unknown_name_is_a_clear_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        moelab.nope  # noqa: B018


def test_no_public_name_is_shadowed_by_a_subpackage():
    import pkgutil

    subpackages = {m.name for m in pkgutil.iter_modules(moelab.__path__)}
    assert not set(moelab._EXPORTS) & subpackages
