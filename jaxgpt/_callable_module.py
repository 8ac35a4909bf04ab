"""Let a command-line module also be called as the function it is named after.

`python -m jaxgpt.generate` needs a module `jaxgpt.generate`, and the API needs a function
`jaxgpt.generate(...)`. Importing the module would replace the package attribute with it, so
the module is made callable: both spellings then work whichever was imported last.
"""

import sys
import types


def make_callable(module_name: str, target) -> None:
    class _CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return target(*args, **kwargs)

    sys.modules[module_name].__class__ = _CallableModule
