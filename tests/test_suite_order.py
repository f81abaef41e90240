"""The suite's own scheduling (tests/conftest.py HEAVIEST_MODULES): a renamed or deleted module must
not silently drop out of the heaviest-first order."""

from pathlib import Path

from conftest import HEAVIEST_MODULES


def test_heaviest_modules_exist_once():
    here = Path(__file__).parent
    assert len(set(HEAVIEST_MODULES)) == len(HEAVIEST_MODULES)
    assert [m for m in HEAVIEST_MODULES if not (here / m).is_file()] == []


def test_collection_puts_them_first(request):
    names = []
    for item in request.session.items:
        if item.path.name not in names:
            names.append(item.path.name)
    listed = [n for n in names if n in HEAVIEST_MODULES]
    assert names[: len(listed)] == listed == [m for m in HEAVIEST_MODULES if m in listed]
