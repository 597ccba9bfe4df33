"""Shared test helpers."""

import pytest


@pytest.fixture
def interrupt_epoch(monkeypatch):
    """``interrupt_epoch(n)``: the n-th epoch of the engine's training loop raises KeyboardInterrupt, as Ctrl-C in that
    epoch would; earlier epochs train as usual. Returns a function that restores the real one."""
    from dermpipe.engine import loop as module

    def install(n: int):
        real, calls = module.train_one_epoch, []

        def interrupted(*args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(module, "train_one_epoch", interrupted)
        return lambda: monkeypatch.setattr(module, "train_one_epoch", real)

    return install
