"""Arms of an evaluation: the training sets compared, each built from the same training images.

An arm is what a user would keep and train on: the original images, an mpsd store at a budget,
a user's existing store, or a baseline's reconstruction or coreset at the same budget.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mpsd.errors import OptionError
from mpsd.evaluate.budget import Budget, compress_to_budget

__all__ = ["METHODS", "SEEDED_METHODS", "TEACHER_METHODS", "Arm", "build_arm", "build_kd_arm", "parse_methods", "store_arm"]

log = logging.getLogger(__name__)

#: Every method name :func:`build_arm` knows, in table order.
METHODS: tuple[str, ...] = (
    "original", "mpsd", "mpsd-kd", "ice", "svd", "cp", "tucker", "random", "kcenter", "jpeg", "webp",
)  # fmt: skip
#: Methods whose result depends on the seed (rebuilt for every repeat).
SEEDED_METHODS = frozenset({"random", "kcenter", "cp", "mpsd-kd"})
#: Methods that need a teacher (the model trained on the original training part).
TEACHER_METHODS = frozenset({"mpsd-kd"})
#: The default selection: quick on a CPU, and covers each family.
DEFAULT_METHODS: tuple[str, ...] = ("original", "mpsd", "ice", "svd", "random")


def parse_methods(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """Parse ``"original,mpsd,svd"`` (``"all"`` for every method) into method names.

    Raises
    ------
    OptionError
        For an unknown name.
    """
    if text is None:
        return DEFAULT_METHODS
    items = [t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if items == ["all"]:
        return METHODS
    bad = [t for t in items if t not in METHODS]
    if bad:
        raise OptionError(f"unknown method(s) {', '.join(bad)}; expected some of {', '.join(METHODS)} or 'all'")
    if not items:
        raise OptionError("no methods given")
    return tuple(dict.fromkeys(items))


@dataclass
class Arm:
    """One training set to train a classifier on.

    Attributes
    ----------
    method : str
        ``"original"``, ``"mpsd"``, ``"store"`` or a baseline name.
    budget : Budget or None
        None for ``"original"`` and ``"store"``.
    n_images : int
        Training images M (M < N for coresets).
    bytes_on_disk : int
        What is kept, labels included (for ``"original"``: the raw size N·H·W·C + labels).
    param_ratio : float or None
    subset : bool
        Whether the arm keeps only some of the images (coresets): such arms are also trained with
        as many steps as a full-size arm (the *equal-steps* protocol).
    images, labels : ndarray, optional
        In-memory training set (M, H, W, C) uint8 and (M,) int64.
    store : Path, optional
        A store to train from through :class:`~mpsd.integrations.torch.data.StoreDataset`.
    store_indices : ndarray, optional
        Images of ``store`` to use.
    settings : dict
        What the method chose.
    seconds : float
        Time to build the arm.
    """

    method: str
    budget: Budget | None
    n_images: int
    bytes_on_disk: int
    param_ratio: float | None
    subset: bool = False
    images: np.ndarray | None = None
    labels: np.ndarray | None = None
    store: Path | None = None
    store_indices: np.ndarray | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def budget_label(self) -> str:
        return "—" if self.budget is None else self.budget.label

    def meets_budget(self) -> bool:
        """Whether the arm is within its budget (always true without one)."""
        if self.budget is None:
            return True
        if self.budget.kind == "bytes":
            return self.bytes_on_disk <= int(self.budget.nbytes or 0)
        return self.param_ratio is None or self.param_ratio <= self.budget.fraction + 1e-9

    def describe(self) -> dict[str, Any]:
        """JSON-ready description (no arrays)."""
        return {
            "method": self.method,
            "budget": None if self.budget is None else self.budget.to_dict(),
            "n_images": self.n_images,
            "bytes_on_disk": self.bytes_on_disk,
            "byte_ratio": None if self.budget is None else self.bytes_on_disk / max(1, self.budget.raw_bytes),
            "param_ratio": self.param_ratio,
            "subset": self.subset,
            "meets_budget": self.meets_budget(),
            "settings": self.settings,
            "build_seconds": self.seconds,
        }


def build_arm(
    method: str,
    images: np.ndarray,
    labels: np.ndarray,
    budget: Budget | None,
    *,
    seed: int = 0,
    workdir: Path,
    classes: Sequence[str] | None = None,
    mpsd_options: dict[str, Any] | None = None,
    baseline_options: dict[str, Any] | None = None,
) -> Arm:
    """Build the arm of ``method`` at ``budget`` from the training images.

    Parameters
    ----------
    method : str
        A name in :data:`METHODS`.
    images : ndarray of shape (N, H, W, C), uint8
        The training part (validation images already removed).
    labels : ndarray of shape (N,), int64
    budget : Budget or None
        Required for every method but ``"original"``.
    seed : int
        For seeded methods.
    workdir : Path
        Where the mpsd store is written (``workdir/mpsd-<budget>-<seed>``).
    mpsd_options : dict, optional
        ``residual_bonds``, ``dtype``, ``sites``, ``order``, ``colour`` for :func:`compress_to_budget`.
    baseline_options : dict, optional
        Keyword options for :func:`mpsd.baselines.get_baseline`.

    Raises
    ------
    OptionError
        When the method cannot meet the budget (the message says by how much).
    """
    import time

    t0 = time.perf_counter()
    n = int(images.shape[0])
    if method == "original":
        arm = Arm("original", None, n, int(images.nbytes + labels.astype(np.int64).nbytes), 1.0, images=images, labels=labels)
    elif budget is None:
        raise OptionError(f"method {method!r} needs a budget")
    elif method == "mpsd":
        tag = f"{budget.kind}{budget.fraction:g}-seed{seed}"
        path = Path(workdir) / f"mpsd-{tag}.zarr"
        archive, settings = compress_to_budget(
            images, path, budget, labels=labels, classes=classes, **(mpsd_options or {})
        )
        stats = archive.stats()
        arm = Arm(
            "mpsd", budget, len(archive), int(archive.bytes_on_disk), float(stats.param_ratio),
            store=path, settings={**settings, "psnr": stats.psnr},
        )  # fmt: skip
    else:
        from mpsd.baselines import get_baseline

        baseline = get_baseline(method, **(baseline_options or {}))
        kwargs: dict[str, Any] = {"seed": seed}
        if budget.kind == "bytes":
            kwargs["budget_bytes"] = budget.nbytes
        else:
            kwargs["param_ratio"] = budget.fraction
        rec = baseline.fit(images, labels, **kwargs)
        rec_images = np.asarray(rec.images)
        if rec_images.ndim == 3:
            rec_images = rec_images[..., None]
        arm = Arm(
            method, budget, int(rec_images.shape[0]), int(rec.bytes_on_disk), rec.param_ratio,
            subset=rec.indices is not None and int(rec_images.shape[0]) < n,
            images=rec_images, labels=None if rec.labels is None else np.asarray(rec.labels, dtype=np.int64),
            settings=dict(rec.settings),
        )  # fmt: skip
        if arm.labels is None:
            raise OptionError(f"baseline {method!r} returned no labels")
    arm.seconds = time.perf_counter() - t0
    if not arm.meets_budget():
        raise OptionError(f"{method} uses {arm.bytes_on_disk:,} bytes, over the budget of {budget.nbytes if budget else 0:,}")
    return arm


def store_arm(path: Path, *, indices: np.ndarray | None = None, raw_bytes: int) -> Arm:
    """An arm for an existing store (e.g. one with a supplement): trained as it is, no budget."""
    from mpsd.api import open as open_store

    archive = open_store(path)
    if archive.labels is None:
        raise OptionError(f"{path}: the store has no labels, so a classifier cannot be trained on it")
    stats = archive.stats()
    n = len(archive) if indices is None else int(np.asarray(indices).size)
    return Arm(
        "store", None, n, int(archive.bytes_on_disk), float(stats.param_ratio),
        store=Path(path), store_indices=indices,
        settings={"path": str(path), "byte_ratio_of_train": archive.bytes_on_disk / max(1, raw_bytes),
                  "supplement_bytes": int(getattr(stats, "supplement_bytes", 0) or 0)},
    )  # fmt: skip


def _supplement_param_ratio(archive: Any) -> float:
    return float(sum(st.param_ratio for st in archive.stats().stages if st.role == "supplement"))


def build_kd_arm(
    images: np.ndarray,
    labels: np.ndarray,
    budget: Budget,
    teacher: Any,
    *,
    seed: int = 0,
    workdir: Path,
    classes: Sequence[str] | None = None,
    mpsd_options: dict[str, Any] | None = None,
    kd_options: dict[str, Any] | None = None,
    device: Any = "cpu",
    max_tries: int = 4,
) -> Arm:
    """The ``mpsd-kd`` arm: an mpsd store plus the task-specific supplement, within ``budget``.

    The supplement (``kd_options["bond"]``, default ``"2"`` for every bond) is learned by
    :func:`mpsd.integrations.torch.supplement.learn_bias` from ``teacher`` (projected onto what is
    stored) and added to the store; its bytes (or parameters) come out of the budget.  For a byte
    budget the base store is first given the budget less the size of a supplement holding a random
    bias; if the total is still over, the base shrinks by the excess and the bias is learned again
    (at most ``max_tries`` times).

    Parameters
    ----------
    images : ndarray of shape (N, H, W, C), uint8
    labels : ndarray of shape (N,)
    budget : Budget
    teacher : torch.nn.Module
        A model trained on ``images`` (the original arm's model).
    kd_options : dict, optional
        ``bond`` and keyword options of ``learn_bias`` (``temperature``, ``epochs``, ``lr``, ...).

    Raises
    ------
    OptionError
        When no base store leaves room for the supplement.
    """
    import time

    from mpsd.api import open as open_store
    from mpsd.archive import add_supplement
    from mpsd.core.ttsvd import parameter_count
    from mpsd.integrations.torch.supplement import _supplement_bonds, learn_bias, storage_projection

    t0 = time.perf_counter()
    kd = dict(kd_options or {})
    bond = kd.pop("bond", "2")
    path = Path(workdir) / f"mpsd-kd-{budget.kind}{budget.fraction:g}-seed{seed}.zarr"
    options = dict(mpsd_options or {})

    def base(b: Budget) -> Any:
        archive, settings = compress_to_budget(images, path, b, labels=labels, classes=classes, **options)
        return archive, settings

    if budget.kind == "ratio":
        probe, _ = base(Budget("ratio", budget.fraction, budget.raw_bytes))  # for the layout only
        sites = probe.meta.layout.sites
        bonds = _supplement_bonds(bond, len(sites))
        supp_ratio = float(parameter_count(sites, np.asarray(bonds))) / float(np.prod(sites))
        if supp_ratio >= budget.fraction:
            raise OptionError(f"mpsd-kd: the supplement alone (ρ {supp_ratio:.3f}) exceeds ρ={budget.fraction:g}")
        plan = [Budget("ratio", budget.fraction - supp_ratio, budget.raw_bytes)]
    else:
        limit = int(budget.nbytes or 0)
        probe, _ = base(budget)
        sites = probe.meta.layout.sites
        bonds = _supplement_bonds(bond, len(sites))
        h, w, c = probe.image_shape
        rng = np.random.default_rng(seed)
        dummy = storage_projection(probe, bonds)(rng.normal(0, 20, size=(len(probe), h, w, c)).astype(np.float32))
        before = probe.bytes_on_disk
        supp = int(add_supplement(path, dummy, bond=bonds).bytes_on_disk) - int(before)
        if limit - supp * 1.02 <= 0:
            raise OptionError(
                f"mpsd-kd: the supplement alone (bonds {','.join(map(str, bonds))}) takes about {supp:,} of the "
                f"{limit:,} bytes of the budget: no room is left for the base store"
            )
        plan = [Budget("bytes", (limit - supp * 1.02) / budget.raw_bytes, budget.raw_bytes)]
    tries = 0
    while True:
        tries += 1
        archive, settings = base(plan[-1])
        approx = archive.decode(slice(None), kind="float")
        result = learn_bias(
            teacher, images, approx, labels=labels, project=storage_projection(archive, bonds),
            seed=seed, device=device, max_value=float(archive.meta.max_value), **kd,
        )  # fmt: skip
        archive = add_supplement(path, result.bias, bond=bonds, settings={"kd": {k: v for k, v in result.settings.items() if k != "device"}})
        total = int(archive.bytes_on_disk)
        if budget.kind == "ratio" or total <= int(budget.nbytes or 0):
            break
        if tries >= max_tries:
            raise OptionError(f"mpsd-kd: store with supplement takes {total:,} bytes, over the budget of {budget.nbytes:,}")
        excess = total - int(budget.nbytes or 0)
        target = plan[-1].fraction * budget.raw_bytes - excess - 0.01 * int(budget.nbytes or 0)
        log.debug("mpsd-kd: %d bytes, %d over; base budget now %d bytes", total, excess, target)
        plan.append(Budget("bytes", max(1e-6, target / budget.raw_bytes), budget.raw_bytes))
    archive = open_store(path)
    stats = archive.stats()
    return Arm(
        "mpsd-kd", budget, len(archive), int(archive.bytes_on_disk),
        float(stats.param_ratio) + _supplement_param_ratio(archive), store=path,
        settings={
            **settings, "supplement_bonds": list(bonds), "supplement_bytes": int(stats.supplement_bytes),
            "kd": result.summary(), "tries": tries,
        },
        seconds=time.perf_counter() - t0,
    )  # fmt: skip


