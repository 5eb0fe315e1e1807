"""timm `ResNet` (resnet18-style basic and resnet50-style bottleneck blocks): the family's adapter
(`arch.py`), its weight layout (`layout.py`) and its recipe section (`recipe.py`)."""

from weit_cli.arch.resnet.arch import ResNetAdapter
from weit_cli.arch.resnet.layout import ResNetArch
from weit_cli.arch.resnet.recipe import ResNetModelSection

__all__ = ["ResNetAdapter", "ResNetArch", "ResNetModelSection"]
