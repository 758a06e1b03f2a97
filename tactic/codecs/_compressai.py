"""Import CompressAI without its point-cloud half.

`import compressai` runs `compressai/__init__`, which imports its point-cloud datasets and
transforms, and with them torch_geometric, which imports torch._dynamo: about 3 s of every stage
process (a third of a small stage's wall time) for code this project never calls. When compressai
is not imported yet, those three modules are registered empty before it is; the image codecs,
entropy models, ops and zoo loaders we use do not touch them. Import this module before compressai.
"""
import sys
import types

_POINT_CLOUD = {
    "compressai.datasets": {},
    "compressai.transforms": {},
    # compressai.registry re-exports these two; its image registries are untouched.
    "compressai.registry.transforms": {"TRANSFORMS": {}, "register_transform": lambda name: (lambda cls: cls)},
}

if "compressai" not in sys.modules:
    for name, attrs in _POINT_CLOUD.items():
        module = types.ModuleType(name, "left out by tactic.models._compressai (point-cloud code, unused)")
        module.__dict__.update(attrs)
        sys.modules[name] = module
