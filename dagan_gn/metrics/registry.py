"""The quality-metric registry: one :func:`register_metric` call adds a metric to ``dagan assess`` or
``dagan evaluate``.

Modelled on torch-fidelity's registry (``register_feature_extractor``: a name → an entry; a name taken twice is an
error) and MONAI's factories (a name → a callable; registration also works as a decorator). An entry says three
things, and nothing else has to be kept in step:

- **its name** (lower case; ``aliases`` are accepted wherever the name is, e.g. ``is`` for ``isc``);
- **what it needs** (``needs``), which also says which job computes it and how ``compute`` is called:

  ====================== ===================================================================================
  ``images``             ``compute(a, b) -> [B]``: a distance between two image batches ``[B, C, H, W]`` in
                         [-1, 1] (:data:`dagan_gn.metrics.diversity.Distance`: symmetric, 0 for identical
                         inputs). ``dagan assess`` reports diversity, distance to source and the real-pair
                         scale in that space.
  ``classifier_features`` the same on embeddings ``[B, D]`` of assess's class-consistency classifier (the
                         penultimate layer); measured only when the classifier runs.
  ``samples``            ``compute(fake, real, *, metrics, **options) -> dict``: generated vs real images
                         (torch-fidelity's ``uint8 [N, 3, H, W]``) for ``dagan evaluate``; ``metrics`` lists the
                         wanted entries that share this ``compute`` (one call, one feature pass: FID, KID and IS
                         share torch-fidelity's), ``options`` are :func:`~dagan_gn.metrics.fidelity.compute_fidelity`'s
                         keyword arguments (accept ``**options``). Returns the result keys to add.
  ``noise_generator``    ``compute(generator, images01, labels, *, device) -> dict``: a noise-to-image
                         generator ``G(z)`` and held-out images in [0, 1] (``dagan evaluate`` of CIFAR runs); for
                         image-to-image generators the result says ``<name>_unavailable``.
  ====================== ===================================================================================

- **how it reports**: ``label`` names it in tables, Markdown and figure titles; ``identity_p`` (distance metrics)
  is the Lp norm whose nearest neighbours agree with the distance, and asks assess for its identity check in that
  space (None: no identity check).

::

    from dagan_gn.metrics.registry import register_metric

    register_metric("pixel_linf", lambda a, b: (a - b).abs().flatten(1).amax(1) / 2, needs="images",
                    label="pixel L∞")

The built-in entries (:data:`dagan_gn.metrics.builtin_metrics.BUILTIN_METRICS`) are registered when this module
loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from dagan_gn.errors import DaganError

__all__ = [
    "MetricError",
    "MetricEntry",
    "NEEDS",
    "register_metric",
    "unregister_metric",
    "get_metric",
    "metric_names",
    "compute_sample_metrics",
]

#: What a metric can be computed from (see the module docstring for how ``compute`` is called for each).
NEEDS: tuple[str, ...] = ("images", "classifier_features", "samples", "noise_generator")


class MetricError(DaganError, ValueError):
    """A metric registration or lookup that cannot be done (a name taken twice, an unknown name or ``needs``)."""


@dataclass(frozen=True)
class MetricEntry:
    """One registered metric (see the module docstring)."""

    name: str
    needs: str
    compute: Callable[..., Any]
    label: str
    aliases: tuple[str, ...] = ()
    identity_p: float | None = None
    description: str = ""


#: name → entry, in registration order (the order the jobs report them in).
METRICS: dict[str, MetricEntry] = {}
_ALIASES: dict[str, str] = {}


def _key(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise MetricError(f"a metric name must be a non-empty string, got {name!r}")
    return name.strip().lower()


def register_metric(name: str, compute: Callable[..., Any] | None = None, *, needs: str, label: str | None = None,
                    aliases: Iterable[str] = (), identity_p: float | None = None, description: str = "") -> Any:
    """Register a metric; returns its :class:`MetricEntry`. Without ``compute`` it returns a decorator that
    registers the decorated function (and returns it unchanged). ``label`` defaults to the name.

    Raises:
        MetricError: the name or an alias is taken (unregister it first), ``needs`` is not one of :data:`NEEDS`,
            or ``compute`` is not callable.
    """
    if compute is None:
        def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
            register_metric(name, fn, needs=needs, label=label, aliases=aliases, identity_p=identity_p,
                            description=description)
            return fn
        return decorator
    key = _key(name)
    if needs not in NEEDS:
        raise MetricError(f"metric {key!r}: unknown needs {needs!r}; choose from {', '.join(NEEDS)}")
    if not callable(compute):
        raise MetricError(f"metric {key!r}: compute must be callable, got {type(compute).__name__}")
    keys = [key, *dict.fromkeys(_key(a) for a in aliases if _key(a) != key)]
    taken = [k for k in keys if k in METRICS or k in _ALIASES]
    if taken:
        owner = _ALIASES.get(taken[0], taken[0])
        raise MetricError(f"metric name {taken[0]!r} is already registered (by {owner!r}); "
                          "unregister_metric it first to replace it")
    entry = MetricEntry(key, needs, compute, label or key, tuple(keys[1:]), identity_p, description)
    METRICS[key] = entry
    _ALIASES.update({alias: key for alias in entry.aliases})
    return entry


def unregister_metric(name: str) -> MetricEntry:
    """Remove a metric (by its name or an alias) and its aliases; returns the entry removed."""
    entry = get_metric(name)
    del METRICS[entry.name]
    for alias in entry.aliases:
        _ALIASES.pop(alias, None)
    return entry


def get_metric(name: str) -> MetricEntry:
    """The entry of ``name`` (or of an alias; case and surrounding blanks ignored).

    Raises:
        MetricError: no metric of that name, naming the registered ones.
    """
    key = _key(name)
    entry = METRICS.get(_ALIASES.get(key, key))
    if entry is None:
        raise MetricError(f"unknown metric {name!r}; registered: {', '.join(METRICS)}")
    return entry


def metric_names(needs: str | Iterable[str] | None = None) -> tuple[str, ...]:
    """Registered names in registration order, only those with one of ``needs`` when given."""
    wanted = None if needs is None else {needs} if isinstance(needs, str) else set(needs)
    unknown = sorted(wanted - set(NEEDS)) if wanted else []
    if unknown:
        raise MetricError(f"unknown needs {', '.join(unknown)}; choose from {', '.join(NEEDS)}")
    return tuple(name for name, e in METRICS.items() if wanted is None or e.needs in wanted)


def compute_sample_metrics(names: Iterable[str], fake: Any, real: Any, **options: Any) -> dict[str, Any]:
    """The ``samples`` metrics ``names`` of ``fake`` against ``real``: one ``compute`` call per distinct compute
    function, with the wanted names that share it as ``metrics`` (in the order given); the results merged."""
    groups: dict[Callable[..., Any], list[str]] = {}
    for name in names:
        entry = get_metric(name)
        if entry.needs != "samples":
            raise MetricError(f"metric {entry.name!r} needs {entry.needs}, not samples")
        groups.setdefault(entry.compute, []).append(entry.name)
    result: dict[str, Any] = {}
    for compute, group in groups.items():
        result.update(compute(fake, real, metrics=group, **options))
    return result


def _register_builtins() -> None:
    from dagan_gn.metrics.builtin_metrics import BUILTIN_METRICS

    for entry in BUILTIN_METRICS:
        register_metric(**entry)


_register_builtins()
