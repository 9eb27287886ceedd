"""CLI-side helpers: tqdm bars driven by library ProgressEvents."""

from __future__ import annotations

from tqdm.auto import tqdm

from .progress import ProgressEvent


class TqdmProgress:
    """A ``progress`` callback that keeps one tqdm bar per stage (per class when events carry a label)."""

    def __init__(self, *, disable: bool | None = None):
        self._bars: dict[str, tqdm] = {}
        self.disable = disable

    def __call__(self, event: ProgressEvent) -> None:
        bar = self._bars.get(event.stage)
        if bar is None:
            bar = self._bars[event.stage] = tqdm(total=event.total, desc=event.stage, unit="it",
                                                 disable=self.disable, leave=True)
        if bar.total != event.total:
            bar.total = event.total
        bar.n = event.done
        postfix = {}
        if event.label:
            postfix["class"] = event.label
        if event.message:
            postfix["info"] = event.message
        postfix.update({k: v for k, v in event.extra.items() if isinstance(v, (int, float, str))})
        if postfix:
            bar.set_postfix(postfix, refresh=False)
        bar.refresh()

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()

    def __enter__(self) -> TqdmProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
