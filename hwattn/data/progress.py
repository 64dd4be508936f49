"""Progress bars (tqdm when installed, a silent stand-in otherwise)."""

from __future__ import annotations


class _Silent:
    def __init__(self, iterable=None, **_):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def update(self, n=1):
        pass

    def set_postfix_str(self, s, refresh=True):
        pass

    def set_description(self, s):
        pass

    def write(self, s):
        print(s)

    def close(self):
        pass


def progress_bar(iterable=None, **kwargs):
    """`tqdm(iterable, **kwargs)`, or an object with the same methods that prints nothing."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - depends on the install
        return _Silent(iterable, **kwargs)
    return tqdm(iterable, dynamic_ncols=True, **kwargs)
