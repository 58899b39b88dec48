"""Self-supervised pretraining: ``meta_arch`` (student, teacher, heads, losses), ``step``, ``loop``, ``schedules``,
``param_groups``, ``checkpointer``, ``health``, ``plots``, ``loggers``, ``distill``; ``cli`` is ``dinolab train``.

The package is also callable: ``dinolab.train(data=..., output=...)`` is :func:`dinolab.api.train` (a package and
a function cannot share the name ``dinolab.train`` otherwise: importing ``dinolab.train.loop`` rebinds it).
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from dinolab.api import train

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
