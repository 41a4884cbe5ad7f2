"""Baselines the paper (and users) compare mpsd against, behind one interface.

>>> from mpsd.baselines import BASELINES, get_baseline
>>> BASELINES
('ice', 'svd', 'cp', 'tucker', 'random', 'kcenter', 'jpeg', 'webp')

``get_baseline(name, **options).fit(images, labels, budget_bytes=... | param_ratio=...)``
returns a :class:`Reconstruction`.  See ``docs/baselines.md``.
"""

from mpsd.baselines.base import BASELINES, Baseline, Reconstruction, get_baseline

__all__ = ["BASELINES", "Baseline", "Reconstruction", "get_baseline"]
