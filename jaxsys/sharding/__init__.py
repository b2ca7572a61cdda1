"""Sharding strategies over multi-level meshes."""

from jaxsys.sharding.rules import STRATEGIES, ShardingRules, constrain, make_rules, use_rules

__all__ = ["STRATEGIES", "ShardingRules", "constrain", "make_rules", "use_rules"]
