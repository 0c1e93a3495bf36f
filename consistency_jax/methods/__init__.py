"""Method registry: `config.method.name` picks a `Method` subclass (methods/base.py).

Each method owns its config fields: `method_config(name)` returns them with
their defaults, and experiment configs start from it (configs/default.py), so
a misspelt `--config.method.<field>` fails at start (the config is locked).
"""

import ml_collections

from consistency_jax.methods.base import Method


def _registry() -> dict[str, type[Method]]:
    from consistency_jax.methods import act, ct, ect, edm, ict, scm, sct, trigflow

    return {cls.name: cls for cls in (act.ACT, ct.CD, ct.CT, ect.ECT, edm.EDM, ict.ICT, scm.SCMCT, scm.SCMCD,
                                      sct.SCT, trigflow.TrigFlow)}


def method_names() -> list[str]:
    return sorted(_registry())


def get_method(name: str) -> type[Method]:
    registry = _registry()
    if name not in registry:
        raise ValueError(f"Unknown method name {name!r}; valid names: {', '.join(sorted(registry))}.")
    return registry[name]


def method_config(name: str) -> ml_collections.ConfigDict:
    """The config fields of method `name` with their defaults (config.method)."""
    return get_method(name).default_config()


def check_method_config(config: ml_collections.ConfigDict) -> None:
    """config.method has exactly the fields of the method it names, with valid values."""
    cls = get_method(config.method.name)
    expected, given = set(cls.default_config().keys()), set(config.method.keys())
    if expected != given:
        missing, extra = sorted(expected - given), sorted(given - expected)
        raise ValueError(
            f"config.method holds the fields of another method than {cls.name!r} "
            f"(missing: {missing or 'none'}; not {cls.name!r} fields: {extra or 'none'}). Switch methods by "
            f"starting from a config made for {cls.name!r} (configs/*.py set config.method = "
            f"methods.method_config({cls.name!r})), not with --config.method.name alone.")
    cls.check_config(config)
