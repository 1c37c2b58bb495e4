"""Configuration: schema, layered loading, validation, versions, hot reload.

Other components use `load_config` (or `load`) once at start, read the frozen
`ButterflyConfig` by attribute (`cfg.coordination.phi_suspect`), and subscribe to a
`ConfigManager` for runtime changes. The agreement layer drives cluster-wide changes with
`Proposal`, `ConfigManager.prepare` and `ConfigManager.apply_committed`.
"""

from butterfly.config.fields import FieldSpec, field_specs
from butterfly.config.issues import (
    ConfigInvalid,
    ConfigIssue,
    DeprecatedOption,
    UpdateRefused,
    UpdateRejected,
)
from butterfly.config.loader import Loaded, apply_patch, load, load_config
from butterfly.config.proposal import Proposal, check_proposal, propose_change, propose_update
from butterfly.config.reload import (
    ConfigManager,
    UpdateResult,
    Vote,
    follow_files,
    reload_files,
    rollback_target,
)
from butterfly.config.schema import ButterflyConfig, Mutability, Scope
from butterfly.config.template import dump_toml, template
from butterfly.config.validate import cluster_size, cross_check, largest_safe_f
from butterfly.config.versions import (
    Change,
    ConfigHistory,
    VersionRecord,
    cluster_hash,
    config_hash,
    diff_configs,
)

__all__ = [
    "ButterflyConfig",
    "Change",
    "ConfigHistory",
    "ConfigInvalid",
    "ConfigIssue",
    "ConfigManager",
    "DeprecatedOption",
    "FieldSpec",
    "Loaded",
    "Mutability",
    "Proposal",
    "Scope",
    "UpdateRefused",
    "UpdateRejected",
    "UpdateResult",
    "VersionRecord",
    "Vote",
    "apply_patch",
    "check_proposal",
    "cluster_hash",
    "cluster_size",
    "config_hash",
    "cross_check",
    "diff_configs",
    "dump_toml",
    "field_specs",
    "follow_files",
    "largest_safe_f",
    "load",
    "load_config",
    "propose_change",
    "propose_update",
    "reload_files",
    "rollback_target",
    "template",
]
