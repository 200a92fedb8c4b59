"""Optimizer and scheduler registries, parameter groups and schedule-free modes (pure torch).

Importing this package registers the built-in optimizers (AdamW, Adam, SGD, Adagrad, RMSprop,
Adafactor, Lion, schedule-free AdamW/SGD, Muon and every name of transformers' ``OptimizerNames``)
and schedulers (every ``SchedulerType``, ``cosine_min_lr``, ``wsd``). transformers is imported only
when an entry that delegates to it is built.
"""

from hf_optcore.optim.builtin import register_builtin_optimizers
from hf_optcore.optim.composite import CompositeOptimizer, build_muon
from hf_optcore.optim.lion import Lion
from hf_optcore.optim.modes import has_train_eval_modes, optimizer_eval_mode, unwrap_optimizer
from hf_optcore.optim.param_groups import ParamGroup, build_param_groups, format_param_groups
from hf_optcore.optim.registry import (
    OptimizerInfo,
    OptimizerUnavailableError,
    UnknownNameError,
    get_optimizer_info,
    list_optimizers,
    register_alias,
    register_optimizer,
)
from hf_optcore.optim.schedulers import (
    SchedulerInfo,
    create_scheduler,
    get_scheduler_info,
    list_schedulers,
    register_builtin_schedulers,
    register_scheduler,
    resolve_warmup_steps,
)

register_builtin_optimizers()
register_builtin_schedulers()

__all__ = [
    "CompositeOptimizer",
    "Lion",
    "OptimizerInfo",
    "OptimizerUnavailableError",
    "ParamGroup",
    "SchedulerInfo",
    "UnknownNameError",
    "build_muon",
    "build_param_groups",
    "create_scheduler",
    "format_param_groups",
    "get_optimizer_info",
    "get_scheduler_info",
    "has_train_eval_modes",
    "list_optimizers",
    "list_schedulers",
    "optimizer_eval_mode",
    "register_alias",
    "register_optimizer",
    "register_scheduler",
    "resolve_warmup_steps",
    "unwrap_optimizer",
]
