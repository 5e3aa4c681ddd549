"""Progress bars: one per stage, or one over a whole run.

Every long verb takes ``progress``: ``True`` draws a bar per stage (``tqdm``), ``False`` none,
and a :class:`RunBar` draws one bar over several stages and verbs, with one ETA (what
:func:`tl_degen.fit_and_graph` uses for a whole model). Stages count their batches; a stage
that learns of more work (another round of probes) adds it to the total.

Examples:
    >>> bar = RunBar(total=40, desc="whole model")
    >>> bases = tl_degen.fit_bases(model, tokens, sites, progress=bar)
    >>> graph = tl_degen.interaction_graph(model, tokens, bases, progress=bar)
    >>> bar.close()
"""

from __future__ import annotations

from tqdm.auto import tqdm

__all__ = ["RunBar", "stage_bar"]


class RunBar:
    """One bar over a run of several stages: ``total`` steps (batches) in all, known or
    grown as stages start (:meth:`stage` with ``expected=False``).

    Args:
        total: the run's steps, if known up front (for an ETA from the first step).
        desc: the bar's label; the running stage is shown after it.
        disable: draw nothing (the counts are still kept).
    """

    def __init__(self, total: int = 0, desc: str = "tl_degen", disable: bool = False):
        self.bar = tqdm(total=total, desc=desc, disable=disable, unit="batch",
                        dynamic_ncols=True)
        self.done = 0

    def stage(self, desc: str, total: int, initial: int = 0, *,
              expected: bool = True) -> _Stage:
        """A stage of ``total`` steps, ``initial`` of them already done (a resumed run).
        ``expected``: its steps are in the run's total already; else they are added."""
        if not expected:
            self.grow(total)
        self.bar.set_postfix_str(desc, refresh=False)
        if initial:
            self.update(initial)
        return _Stage(self, total - initial)

    def grow(self, steps: int) -> None:
        """Add ``steps`` unforeseen steps to the total (another round of probes)."""
        self.bar.total = (self.bar.total or 0) + steps
        self.bar.refresh()

    def update(self, steps: int = 1) -> None:
        self.done += steps
        if self.done > (self.bar.total or 0):  # never past the end: the total follows
            self.bar.total = self.done
        self.bar.update(steps)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> RunBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunBar({self.done}/{self.bar.total} steps)"


class _Stage:
    """One stage's view of a :class:`RunBar`, with ``tqdm``'s ``update``/``close``."""

    def __init__(self, run: RunBar, remaining: int):
        self.run, self.remaining = run, remaining

    def update(self, steps: int = 1) -> None:
        self.remaining -= steps
        self.run.update(steps)

    def close(self) -> None:
        if self.remaining > 0:  # a stage that ended early: its steps leave the total
            self.run.bar.total = max(self.run.done, (self.run.bar.total or 0) - self.remaining)
            self.remaining = 0
            self.run.bar.refresh()


def stage_bar(progress: bool | RunBar, total: int, desc: str, initial: int = 0, *,
              expected: bool = True):
    """A bar for one stage: its own ``tqdm`` (``progress`` a bool) or a stage of a
    :class:`RunBar`. Both have ``update(n)`` and ``close()``."""
    if isinstance(progress, RunBar):
        return progress.stage(desc, total, initial, expected=expected)
    return tqdm(total=total, initial=initial, desc=desc, disable=not progress)
