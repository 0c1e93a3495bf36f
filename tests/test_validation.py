"""Config validation: every field of every config, method and network has a rule, and absurd values stop at start.

The walk over every registered method and network is what keeps new fields
honest: a field without a rule, or a rule that validation does not apply
(e.g. a method's check_config that skips the registry), fails here.
"""

import dataclasses
import math
import os
import re
import sys

import jax
import ml_collections
import numpy as np
import pytest

from consistency_jax import config_rules, experiment, methods, models, samplers
from tests.helpers import tiny_config

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))


def config_for(method_name: str) -> ml_collections.ConfigDict:
    config = tiny_config()
    config.method = methods.method_config(method_name)
    if method_name == "act":  # a discriminator that fits tiny_config's 8x8 images
        config.method.discriminator.channels = (16, 16, 16)
        config.method.discriminator.attn_resolutions = (4,)
    return config


def rule_tables(config):
    """(section, table) for every part of the config that has rules."""
    tables = list(experiment.GENERAL_RULES.items())
    tables.append(("model", models.model_rules(config.model.name)))
    tables.append(("method", methods.get_method(config.method.name).config_rules()))
    return tables


def all_field_paths(config, prefix=""):
    for name, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from all_field_paths(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


# ----------------------------------------------------------------------------
# Every field has a rule, and every rule is applied.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("method_name", methods.method_names())
def test_every_config_field_has_a_rule(method_name):
    config = config_for(method_name)
    covered = {f"{section}.{name}" if section else name for section, table in rule_tables(config) for name in table}
    missing = sorted(set(all_field_paths(config)) - covered)
    assert not missing, (f"config fields without a rule: {missing}; add them to experiment.GENERAL_RULES, "
                         f"models.model_rules or {method_name}'s config_rules()")
    stale = sorted(name for name in methods.get_method(method_name).config_rules()
                   if not config_rules.has_field(methods.method_config(method_name), name))
    assert not stale, f"{method_name}.config_rules() has rules for fields it does not have: {stale}"


@pytest.mark.parametrize("model_name", models.model_names())
def test_every_network_field_has_a_rule(model_name):
    cls = models._registry()[model_name]
    fields = {f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")}
    missing = sorted(fields - set(models.model_rules(model_name)))
    assert not missing, f"fields of network {model_name!r} without a rule in models.model_rules: {missing}"


def invalid_cases():
    """(method, field path, bad value) for every rule's invalid examples, in every method's config."""
    cases = []
    for method_name in methods.method_names():
        config = config_for(method_name)
        sections = rule_tables(config) if method_name == methods.method_names()[0] else \
            [("method", methods.get_method(method_name).config_rules())]
        for section, table in sections:
            for name, rule in table.items():
                path = f"{section}.{name}".lstrip(".")
                if not config_rules.has_field(config, path):
                    continue
                for bad in rule.invalid_examples(config_rules.field_value(config, path), config):
                    cases.append((method_name, path, bad))
    return cases


def test_the_walk_covers_the_absurd_values_of_the_issue():
    cases = {(path, str(bad)) for _, path, bad in invalid_cases()}
    assert ("optimizer.learning_rate", "0.0") in cases and ("optimizer.learning_rate", "nan") in cases
    assert ("parametrization.sigma_max", "0.002") in cases  # == sigma_min
    assert ("training.keep_checkpoints", "0") in cases and ("training.checkpoint_every", "-1") in cases
    assert ("method.p_std", "0.0") in cases and ("method.s1", "9") in cases  # s1 < s0 = 10


@pytest.mark.parametrize("method_name,path,bad", invalid_cases(), ids=lambda v: str(v))
def test_absurd_values_are_refused_naming_the_field(method_name, path, bad):
    config = config_for(method_name)
    parent, name = path.rsplit(".", 1) if "." in path else ("", path)
    (config_rules.field_value(config, parent) if parent else config)[name] = bad
    with pytest.raises(experiment.ConfigError, match=re.escape(f"config.{path}")) as error:
        experiment.check_fields(config)
    assert "must be" in str(error.value)  # and says what is valid


def test_defaults_and_every_config_file_pass(tmp_path):
    import glob
    import importlib

    for method_name in methods.method_names():
        experiment.check_fields(config_for(method_name))
    config_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    names = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(config_dir, "*.py")))
    names = [n for n in names if n not in ("__init__", "default")]  # default.py is the base the others refine
    assert "quickstart" in names and "cifar10_ect" in names and "quickstart_act" in names
    for name in names:
        config = importlib.import_module(name).get_config()
        if config.data.name in ("npz", "folder", "array_shards") and not config.data.get("path"):
            config.data.path = str(tmp_path)  # the user's preprocessed data (e.g. ILSVRC shards) goes here
        experiment.check_fields(config)


# ----------------------------------------------------------------------------
# The issue's cases, written out (messages give the valid range).
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("path,value,message", [
    ("parametrization.sigma_max", 0.001, "must be a finite number > config.parametrization.sigma_min (0.002)"),
    ("optimizer.learning_rate", 0.0, "must be a finite number > 0"),
    ("optimizer.learning_rate", -1e-3, "must be a finite number > 0"),
    ("optimizer.learning_rate", math.nan, "must be a finite number > 0"),
    ("sampling.sigmas", (0.5, 5.0), "strictly descending"),
    ("training.keep_checkpoints", 0, "an integer >= 1"),
    ("training.checkpoint_every", -5, "an integer >= 0 (0: only at the end"),
    ("sampling.ema_rate", 0.5, "this run keeps the EMAs config.training.ema_rates=(0.9,)"),
    ("seed", 2**32, "<= 4294967295"),
    ("model.attn_resolutions", (3,), "names resolutions the network does not have: [3]"),
    ("method.s1", 5, "must be an integer >= config.method.s0 (10)"),
])
def test_issue_examples_stop_with_the_valid_range(path, value, message):
    config = tiny_config()
    parent, name = path.rsplit(".", 1) if "." in path else ("", path)
    (config_rules.field_value(config, parent) if parent else config)[name] = value
    with pytest.raises(experiment.ConfigError, match=re.escape(message)):
        experiment.check_fields(config)


def test_zero_intervals_mean_off_and_pass():
    config = tiny_config()
    config.training.checkpoint_every = config.training.sample_every = config.training.keep_every = 0
    config.eval.every_steps = 0
    experiment.check_fields(config)


# ----------------------------------------------------------------------------
# Item 5: each sampler reads only its own settings; only the mode's samplers are checked.
# ----------------------------------------------------------------------------


def test_a_3_step_sampler_beside_the_2_step_evaluation_is_valid():
    config = tiny_config()
    config.sampling.num_steps, config.sampling.sigmas = 3, (5.0, 0.5)
    config.eval.steps = (1, 2)
    for mode in experiment.MODES:
        experiment.validate_config(config, mode)
    sigma_max = config.parametrization.sigma_max
    assert samplers.sampling_sigmas(config, 2) == (sigma_max, config.sampling.mid_sigma)
    assert samplers.sampling_sigmas(config, 3) == (sigma_max, 5.0, 0.5)


def test_only_the_samplers_of_the_mode_are_checked():
    config = tiny_config()
    config.sampling.num_steps, config.sampling.sigmas = 4, (5.0, 0.5)  # 4 steps need 3 sigmas
    config.training.sample_every = 0
    experiment.validate_config(config, "eval")  # evaluates eval.steps = (1, 2) only
    experiment.validate_config(config, "train")  # no sample grids
    with pytest.raises(experiment.ConfigError, match=re.escape("A 4-step sampler takes its 3 intermediate sigmas "
                                                               "from config.sampling.sigmas, which holds 2")):
        experiment.validate_config(config, "sample")
    config.training.sample_every = 100  # grids use sampling.num_steps
    with pytest.raises(experiment.ConfigError, match="4-step sampler"):
        experiment.validate_config(config, "train")


def test_one_intermediate_sigma_is_refused_pointing_at_mid_sigma():
    config = tiny_config()
    config.sampling.sigmas = (0.8,)
    with pytest.raises(experiment.ConfigError, match="from config.sampling.mid_sigma"):
        experiment.check_fields(config)


# ----------------------------------------------------------------------------
# Item 7: advice in errors is followable.
# ----------------------------------------------------------------------------


def test_data_num_classes_alone_makes_the_quickstart_class_conditional():
    import quickstart

    config = quickstart.get_config()
    config.data.num_classes = 10
    experiment.check_fields(config)  # no model.num_classes in this config: the model takes the data's
    assert models.create_model_for(config).num_classes == 10


def test_every_field_an_error_names_exists():
    """A sweep of bad values: every `config.<path>` in the messages is a field of the config the user has."""
    import cifar10_ict

    messages = []
    for method_name, path, bad in invalid_cases():
        config = config_for(method_name)
        parent, name = path.rsplit(".", 1) if "." in path else ("", path)
        (config_rules.field_value(config, parent) if parent else config)[name] = bad
        with pytest.raises(experiment.ConfigError) as error:
            experiment.check_fields(config)
        messages.append((config, str(error.value)))
    config = cifar10_ict.get_config()  # sets model.num_classes = 0 itself
    config.data.num_classes = 10
    with pytest.raises(experiment.ConfigError, match=r"--config.model.num_classes=10 --config.data.num_classes=10"):
        experiment.check_fields(config)
    messages.append((config, "--config.model.num_classes=10 --config.data.num_classes=10"))
    for config, message in messages:
        for path in re.findall(r"config\.([a-z_0-9]+(?:\.[a-z_0-9]+)*)", message):
            assert path in set(all_field_paths(config)), f"{message!r} names config.{path}, which does not exist"


def test_missing_inception_weights_stop_at_start_not_after_training(tmp_path, monkeypatch):
    from consistency_jax import errors
    from consistency_jax.evaluation import inception_weights

    def offline(url, destination):
        raise OSError("no network")

    monkeypatch.setattr(inception_weights, "_download", offline)
    config = tiny_config()
    config.eval.feature_extractor, config.eval.inception_dir = "inception", str(tmp_path)
    config.eval.at_end = True
    with pytest.raises(errors.MissingFileError, match=f"Inception weights not found in {tmp_path}"):
        experiment.validate_config(config, "train")
    experiment.validate_config(config, "sample")  # sampling needs no feature extractor
