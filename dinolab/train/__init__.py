"""Self-supervised pretraining. The model and its step: ``meta_arch`` (student, teacher, heads, losses), ``step``,
``schedules``, ``param_groups``, ``distill``, ``adapt``. A run: ``preflight`` (input checks), ``build`` (the parts a
config describes), ``run_dir`` (config, run log, folder), ``checkpointer`` (TrainState, save/resume), ``signals``,
``loop`` (setup -> resume -> loop -> finish), ``monitor`` (k-NN), ``health``, ``plots``, ``loggers``; ``cli`` is
``dinolab train``.

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
