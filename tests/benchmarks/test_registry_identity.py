"""What identifies a registry entry's runs in the results store, and the search space a tuned run draws from.

The store reuses a result when the key of the run is unchanged. Beside the code digests (which change with any
edit, by design), a key holds the entry's part (``benchmarks.plan.sources.entry_key``): its name, classes and
hyper-parameters. Those are pinned here for every entry of the built-in registry at its defaults, so that a change
of a name, a default or a NAMR configuration that would orphan stored results fails here instead of passing
silently.
"""

from __future__ import annotations

import math

import pytest

from benchmarks.losses.registry import REGISTRY, Param
from benchmarks.plan.sources import entry_key, key_of

# key_of(entry_key(entry, entry.defaults())) without the class digests, for the entries at their defaults
PINNED = {
    "rll": "ccc9ddbdb812620e850a3703616f6419",
    "rll-autograd": "dc4a8a81243d1baf6576990dd6c87f4e",
    "pml-rll": "2f5c54deab6935cc08afca7af5fc436f",
    "triplet": "a994cd8a4f6e310c0ffa503c027f9b7e",
    "multi-similarity": "97dac881ecd4f25a0b2b0100b92eb18a",
    "contrastive": "c49a0e25b423e8731288309d2c01a273",
    "circle": "98e7d6fe06b66607b13b6c9381d87172",
    "ntxent": "059be64b792944b34839ac07117e6b81",
    "generalized-lifted": "89cc58c0918093bb4b65d6421dedc7d4",
    "margin": "fa5a331b2de182d9c1684ded98e06277",
    "proxy-anchor": "14a82901a384931e86680229812583f6",
    "namr-triplet": "d1dd034dd615ef2b6a97ce8c9dee4d7e",
    "namr-multi-similarity": "bb5f0bda7462a8f4a10484c61361c7c2",
    "namr-contrastive": "6b713a27941afca46712436698f933e1",
    "namr-rll": "da1ba637c0345a122bfae34f3d4fba7f",
}


def _identity(name: str) -> str:
    entry = REGISTRY[name]
    key = entry_key(entry, entry.defaults())
    assert set(key["class_code"]) >= {entry.loss_class}  # the digests are there, and left out of the pin
    del key["class_code"]
    return key_of(key)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_an_entry_keeps_the_identity_of_its_stored_runs(name):
    assert _identity(name) == PINNED[name]


def test_a_namr_entry_key_holds_its_validated_configuration():
    from pml_rll.losses import namr_config

    hp = REGISTRY["namr-multi-similarity"].defaults()
    cfg = namr_config("multi-similarity")
    assert hp["structure_weight"] == cfg["structure_weight"] == 0.25
    assert {k: hp[f"retrieval.{k}"] for k in cfg["retrieval"]} == cfg["retrieval"]
    assert hp["loss.miner.epsilon"] == REGISTRY["multi-similarity"].defaults()["miner.epsilon"]


def test_param_contains_is_the_search_space():
    # what trial 0 checks before it tries the defaults: inside the range, a whole number where integer, a choice
    linear = Param(0.4, 0.1, 1.0)
    assert linear.contains(0.1) and linear.contains(1.0) and linear.contains(1) and linear.contains(0.4)
    assert not linear.contains(0.0999) and not linear.contains(1.0001) and not linear.contains(math.nan)
    assert not linear.contains(True) and not linear.contains("0.4") and not linear.contains(None)
    integer = Param(1000, 0, 2000, integer=True)
    assert integer.contains(1000) and integer.contains(1000.0) and not integer.contains(1000.5)
    log = Param(10.0, 1.0, 50.0, log=True)
    assert log.contains(1.0) and log.contains(50) and not log.contains(0.5)
    choice = Param("paper", choices=("paper", "autograd"))
    assert choice.contains("autograd") and not choice.contains("Paper") and not choice.contains(None)
    fixed = Param("semihard")
    assert fixed.contains("semihard") and not fixed.contains("all")
    # every registered default lies in its own search space (trial 0 tries it)
    for entry in REGISTRY.values():
        for name, p in entry.search_space().items():
            assert p.contains(p.default), (entry.name, name)
