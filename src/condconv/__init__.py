"""condconv: conditionally parameterized convolutions for PyTorch.

CondConv (Yang et al., "CondConv: Conditionally Parameterized Convolutions for Efficient Inference",
NeurIPS 2019, arXiv:1904.04971), DynamicConv (Chen et al., CVPR 2020, arXiv:1912.03458) and ODConv
(Li, Zhou, Yao, "Omni-Dimensional Dynamic Convolution", ICLR 2022, arXiv:2209.07947) on one execution engine.
"""

from condconv.functional import (
    STRATEGIES,
    dynamic_conv2d,
    get_default_strategy,
    mix_kernels,
    select_strategy,
    set_default_strategy,
    use_strategy,
)
from condconv.layers import CondConv2d, DynamicConv2d, ODConv2d, make_conv2d
from condconv.routing import (
    OmniRouter,
    SigmoidRouter,
    SoftmaxRouter,
    TemperatureSchedule,
    set_temperature,
)

__version__ = "0.2.0"

__all__ = [
    "STRATEGIES",
    "CondConv2d",
    "DynamicConv2d",
    "ODConv2d",
    "OmniRouter",
    "SigmoidRouter",
    "SoftmaxRouter",
    "TemperatureSchedule",
    "dynamic_conv2d",
    "get_default_strategy",
    "make_conv2d",
    "mix_kernels",
    "select_strategy",
    "set_default_strategy",
    "set_temperature",
    "use_strategy",
    "__version__",
]
# the model zoo, the counter and the library services
from condconv.analysis import routing_statistics  # noqa: E402
from condconv.checkpoint import load_checkpoint  # noqa: E402
from condconv.config import TrainConfig  # noqa: E402
from condconv.convert import convert, list_convs, select_convs  # noqa: E402
from condconv.data import EpochLoader, build_dataset  # noqa: E402
from condconv.evaluate import evaluate_checkpoint  # noqa: E402
from condconv.export import export_model, load_exported, verify_export  # noqa: E402
from condconv.models import create_model, list_models, register_model  # noqa: E402
from condconv.profile import count_macs  # noqa: E402
from condconv.sweep import sweep_grid  # noqa: E402
from condconv.train import TrainResult, train_model  # noqa: E402

__all__ += ["create_model", "list_models", "register_model", "count_macs", "convert", "list_convs", "select_convs",
            "load_checkpoint", "TrainConfig", "EpochLoader", "build_dataset", "evaluate_checkpoint",
            "routing_statistics", "TrainResult", "train_model", "sweep_grid", "export_model", "load_exported",
            "verify_export"]  # fmt: skip
